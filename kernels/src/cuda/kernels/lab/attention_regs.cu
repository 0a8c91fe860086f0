// The first attention kernel, kept as the measured baseline of
// `tacflowd bench-attention` (kernels/ATTENTION.md): K and V loaded straight
// into registers (U keys per row group, no pipelining across iterations),
// the block table staged 64 pages at a time, and the splits merged by a
// second launch. Instantiated for the Llama-3 shape only (D 128, G 4).

#define REGS_THREADS 128
#define PAGE_CHUNK 64

struct RegsParams {
    const float* qkv;      // [rows, qkv_stride] f32; query head h at columns h*D
    const bf16* k;         // this layer's K: [num_blocks, kv_heads, 16, D]
    const bf16* v;
    const u32* kv_len;     // [rows]: keys row r sees
    const u32* table_off;  // [rows]: start of row r's block table in `tables`
    const u32* tables;
    float* out;            // [rows, num_heads * D]
    float* part_acc;       // [splits, rows, num_heads, D]
    float* part_ml;        // [splits, rows, num_heads, 2]
    u32 rows;
    u32 qkv_stride;
    u32 num_heads;
    u32 kv_heads;
    u32 group;             // query heads per KV head
    u32 chunks;            // group / G: CTAs per KV head
    u32 pages_per_split;
    u32 splits;
    float scale_log2;
};

template <int D, int G>
__device__ __forceinline__ void regs_cta(const RegsParams& p) {
    constexpr int LPR = D / 8;               // lanes per K/V row
    constexpr int RG = REGS_THREADS / LPR;    // row groups
    constexpr int U = (G <= 4) ? 4 : 2;      // keys per row group per step
    __shared__ u32 pages[PAGE_CHUNK];
    __shared__ float sm_m[RG][G];
    __shared__ float sm_l[RG][G];
    __shared__ float sm_acc[G][RG * D];

    const u32 row = blockIdx.x;
    const u32 kvh = blockIdx.y / p.chunks;
    const u32 h0 = kvh * p.group + (blockIdx.y % p.chunks) * G;
    const u32 split = blockIdx.z;
    const int lane = threadIdx.x % LPR, rg = threadIdx.x / LPR;

    const u32 kv_len = p.kv_len[row];
    const u32 t_begin = split * p.pages_per_split * BLOCK_TOKENS;
    const u32 t_end = min(kv_len, t_begin + p.pages_per_split * BLOCK_TOKENS);
    const u32* table = p.tables + p.table_off[row];

    float q[G][8], m[G], l[G], acc[G][8];
#pragma unroll
    for (int g = 0; g < G; g++) {
        const float4* qp = (const float4*)(p.qkv + (u64)row * p.qkv_stride + (h0 + g) * D + lane * 8);
        const float4 a = qp[0], b = qp[1];
        q[g][0] = a.x * p.scale_log2; q[g][1] = a.y * p.scale_log2;
        q[g][2] = a.z * p.scale_log2; q[g][3] = a.w * p.scale_log2;
        q[g][4] = b.x * p.scale_log2; q[g][5] = b.y * p.scale_log2;
        q[g][6] = b.z * p.scale_log2; q[g][7] = b.w * p.scale_log2;
        m[g] = NEG_INF;
        l[g] = 0.0f;
#pragma unroll
        for (int j = 0; j < 8; j++) acc[g][j] = 0.0f;
    }

    // Every loop bound below is uniform over the CTA, so the shuffles always
    // see whole warps.
    for (u32 c0 = t_begin; c0 < t_end; c0 += PAGE_CHUNK * BLOCK_TOKENS) {
        const u32 c1 = min(t_end, c0 + PAGE_CHUNK * BLOCK_TOKENS);
        __syncthreads();
        if (threadIdx.x < (c1 - c0 + BLOCK_TOKENS - 1) / BLOCK_TOKENS)
            pages[threadIdx.x] = table[c0 / BLOCK_TOKENS + threadIdx.x];
        __syncthreads();
        for (u32 base = c0; base < c1; base += RG * U) {
            uint4 kw[U], vw[U];
            bool ok[U];
#pragma unroll
            for (int u = 0; u < U; u++) {
                const u32 t = base + u * RG + rg;
                ok[u] = t < c1;
                kw[u] = make_uint4(0, 0, 0, 0);
                vw[u] = make_uint4(0, 0, 0, 0);
                if (ok[u]) {
                    const u32 page = pages[(t - c0) / BLOCK_TOKENS];
                    const u64 off =
                        (((u64)page * p.kv_heads + kvh) * BLOCK_TOKENS + t % BLOCK_TOKENS) * D + lane * 8;
                    kw[u] = ld16(p.k + off);
                    vw[u] = ld16(p.v + off);
                }
            }
            float s[U][G];
#pragma unroll
            for (int u = 0; u < U; u++) {
                float kf[8];
                unpack8(kw[u], kf);
#pragma unroll
                for (int g = 0; g < G; g++) {
                    float d = 0.0f;
#pragma unroll
                    for (int j = 0; j < 8; j++) d += q[g][j] * kf[j];
#pragma unroll
                    for (int o = LPR / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                    s[u][g] = ok[u] ? d : NEG_INF;
                }
            }
            float vf[U][8];
#pragma unroll
            for (int u = 0; u < U; u++) unpack8(vw[u], vf[u]);
#pragma unroll
            for (int g = 0; g < G; g++) {
                float mx = s[0][g];
#pragma unroll
                for (int u = 1; u < U; u++) mx = fmaxf(mx, s[u][g]);
                const float mn = fmaxf(m[g], mx);
                if (mn == NEG_INF) continue;
                const float corr = exp2f(m[g] - mn);
                l[g] *= corr;
#pragma unroll
                for (int j = 0; j < 8; j++) acc[g][j] *= corr;
#pragma unroll
                for (int u = 0; u < U; u++) {
                    const float pr = exp2f(s[u][g] - mn);
                    l[g] += pr;
#pragma unroll
                    for (int j = 0; j < 8; j++) acc[g][j] += pr * vf[u][j];
                }
                m[g] = mn;
            }
        }
    }

    // Merge the row groups: rescale each to the CTA's max, then sum.
    if (lane == 0) {
#pragma unroll
        for (int g = 0; g < G; g++) {
            sm_m[rg][g] = m[g];
            sm_l[rg][g] = l[g];
        }
    }
    __syncthreads();
#pragma unroll
    for (int g = 0; g < G; g++) {
        float mm = NEG_INF;
        for (int r = 0; r < RG; r++) mm = fmaxf(mm, sm_m[r][g]);
        const float f = m[g] == NEG_INF ? 0.0f : exp2f(m[g] - mm);
#pragma unroll
        for (int j = 0; j < 8; j++) sm_acc[g][rg * D + lane * 8 + j] = acc[g][j] * f;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * D; i += REGS_THREADS) {
        const int g = i / D, d = i % D;
        float mm = NEG_INF;
        for (int r = 0; r < RG; r++) mm = fmaxf(mm, sm_m[r][g]);
        float ll = 0.0f, a = 0.0f;
        for (int r = 0; r < RG; r++) {
            const float mr = sm_m[r][g];
            if (mr != NEG_INF) ll += sm_l[r][g] * exp2f(mr - mm);
            a += sm_acc[g][r * D + d];
        }
        const u32 h = h0 + g;
        if (p.splits == 1) {
            p.out[(u64)row * p.num_heads * D + h * D + d] = ll > 0.0f ? a / ll : 0.0f;
        } else {
            const u64 idx = ((u64)split * p.rows + row) * p.num_heads + h;
            p.part_acc[idx * D + d] = a;
            if (d == 0) {
                p.part_ml[2 * idx] = mm;
                p.part_ml[2 * idx + 1] = ll;
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(REGS_THREADS) attention_regs_f32_d128_g4(const RegsParams p) {
    regs_cta<128, 4>(p);
}

struct RegsMergeParams {
    const float* part_acc;  // [splits, rows, num_heads, head_dim]
    const float* part_ml;   // [splits, rows, num_heads, 2]
    float* out;             // [rows, num_heads * head_dim]
    u32 rows;
    u32 num_heads;
    u32 head_dim;
    u32 splits;
};

// grid: (rows, num_heads). Splits that saw no key carry max = -inf.
extern "C" __global__ void attention_regs_merge_f32(const RegsMergeParams p) {
    const u32 row = blockIdx.x, h = blockIdx.y;
    const u64 stride = (u64)p.rows * p.num_heads;
    const u64 idx0 = (u64)row * p.num_heads + h;
    float mm = NEG_INF;
    for (u32 s = 0; s < p.splits; s++) mm = fmaxf(mm, p.part_ml[2 * (s * stride + idx0)]);
    float ll = 0.0f;
    for (u32 s = 0; s < p.splits; s++) {
        const float ms = p.part_ml[2 * (s * stride + idx0)];
        if (ms != NEG_INF) ll += p.part_ml[2 * (s * stride + idx0) + 1] * exp2f(ms - mm);
    }
    for (u32 d = threadIdx.x; d < p.head_dim; d += blockDim.x) {
        float a = 0.0f;
        for (u32 s = 0; s < p.splits; s++) {
            const float ms = p.part_ml[2 * (s * stride + idx0)];
            if (ms != NEG_INF) a += p.part_acc[(s * stride + idx0) * p.head_dim + d] * exp2f(ms - mm);
        }
        p.out[idx0 * p.head_dim + d] = ll > 0.0f ? a / ll : 0.0f;
    }
}
