// Token-granular attention over the selected slots: for each (sequence, KV
// head) its G query heads attend the slots the union listed, reading each
// slot's K and V row once for the group. The list is cut into `splits`
// equal parts (its length is known on the device only: each CTA reads it
// and takes its share), each CTA writes an unnormalised partial (acc, max,
// sum), and a second kernel merges them in split order. The reference is
// the CPU's paged attention with a selection (`AttnSeq::selection`).

#define SPARSE_WARPS 4
// Keys a warp takes at a time: four lanes a key for the scores, every lane
// over a slice of the head dims for the values.
#define SPARSE_KEYS 8

struct SparseParams {
    const SelProblem* probs;
    const float* qkv;       // the step's fused rows, from row 0
    const bf16* k;          // this layer's cache
    const bf16* v;
    const u32* table_off;
    const u32* tables;
    const u32* list;        // the union's slots
    const u32* list_len;
    float* part_acc;        // [problems][splits][G][D]
    float* part_ml;         // [problems][splits][G][2]: max (log2 units) and sum
    float* out;             // the output rows from row out_row0 on
    u32 problems;
    u32 qkv_stride;
    u32 kv_heads;
    u32 group;
    u32 splits;
    u32 out_row0;
    u32 out_stride;
    u32 pad;
};

// N consecutive bf16 at `p` (aligned to N * 2 bytes) widened to f32.
template <int N>
__device__ __forceinline__ void sparse_load(const bf16* p, float (&x)[N]) {
    if constexpr (N == 8) {
        unpack8(ld16(p), x);
    } else if constexpr (N == 4) {
        const uint2 w = *reinterpret_cast<const uint2*>(p);
        x[0] = __uint_as_float(w.x << 16);
        x[1] = __uint_as_float(w.x & 0xffff0000u);
        x[2] = __uint_as_float(w.y << 16);
        x[3] = __uint_as_float(w.y & 0xffff0000u);
    } else if constexpr (N == 2) {
        const u32 w = *reinterpret_cast<const u32*>(p);
        x[0] = __uint_as_float(w << 16);
        x[1] = __uint_as_float(w & 0xffff0000u);
    } else {
        x[0] = bf2f(p[0]);
    }
}

// grid (splits, problems), SPARSE_WARPS warps. A warp takes its split's
// listed slots SPARSE_KEYS at a time:
//   * scores: lane (kk, part) = (lane / 4, lane % 4) holds key kk's dims
//     32t + 8 part + 0..7 (t < D / 32), so each 16-byte load instruction
//     reads 64 contiguous bytes of each of the 8 keys' rows; its partial
//     dot products for the G heads are summed over the 4 lanes of the key
//     with two shuffles, and each head's tile maximum over the keys with
//     three: a few shuffles a key instead of a whole warp reduction;
//   * softmax in log2 units (q scaled by log2(e) / sqrt(D), exp2f), the
//     running maximum once per tile, each key's weight through shared
//     memory to every lane;
//   * values: lane l accumulates dims [l D / 32, (l + 1) D / 32) of the
//     tile's 8 rows (coalesced), whose cache rows come from the score lanes
//     by shuffle.
// Keys past the split's end score -inf and their values are zero.
template <int D>
__device__ __forceinline__ void sparse_cta(const SparseParams& p) {
    constexpr int DPL = D / 32;  // value dims of a lane
    constexpr int NP = D / 32;   // 16-byte pieces of a key row of a lane (D / 4 dims)
    const u32 s = blockIdx.x, pi = blockIdx.y, tid = threadIdx.x;
    const u32 warp = tid >> 5, lane = tid & 31, G = p.group;
    const u32 kk = lane >> 2, part = lane & 3;
    const SelProblem& pr = p.probs[pi];
    __shared__ float sq[TAC_MAX_GROUP][D];
    __shared__ float sp[SPARSE_WARPS][SPARSE_KEYS][TAC_MAX_GROUP];
    __shared__ float wml[SPARSE_WARPS][TAC_MAX_GROUP][2];
    __shared__ float wacc[SPARSE_WARPS][TAC_MAX_GROUP][D];
    const float scale = __fmul_rn(__fdiv_rn(1.0f, __fsqrt_rn((float)D)), 1.4426950408889634f);
    const float* q = p.qkv + (u64)pr.row * p.qkv_stride + (u64)pr.head * G * D;
    for (u32 x = tid; x < G * D; x += blockDim.x) sq[x / D][x % D] = q[x] * scale;
    __syncthreads();
    const u32 n = p.list_len[pi];
    const u32 per = (n + p.splits - 1) / p.splits;
    const u32 b0 = min(s * per, n), b1 = min(b0 + per, n);
    float m[TAC_MAX_GROUP], l[TAC_MAX_GROUP], acc[TAC_MAX_GROUP][DPL];
#pragma unroll
    for (int h = 0; h < TAC_MAX_GROUP; h++) {
        m[h] = NEG_INF;
        l[h] = 0.0f;
#pragma unroll
        for (int t = 0; t < DPL; t++) acc[h][t] = 0.0f;
    }
    const u32* list = p.list + pr.lbase;
    const u32* table = p.tables + p.table_off[pr.row];
    for (u32 i0 = b0 + warp * SPARSE_KEYS; i0 < b1; i0 += SPARSE_WARPS * SPARSE_KEYS) {
        // This lane's key: its cache row (K and V share the layout).
        const bool live = i0 + kk < b1;
        u64 row = 0;
        if (live) {
            const u32 slot = list[i0 + kk];
            row = ((u64)table[slot / BLOCK_TOKENS] * p.kv_heads + pr.head) * BLOCK_TOKENS + slot % BLOCK_TOKENS;
        }
        uint4 kr[NP];
        const bf16* krow = p.k + row * D + 8 * part;
#pragma unroll
        for (int t = 0; t < NP; t++) kr[t] = live ? ld16(krow + 32 * t) : uint4{0u, 0u, 0u, 0u};
        float vx[SPARSE_KEYS][DPL];
#pragma unroll
        for (int j = 0; j < SPARSE_KEYS; j++) {
            const u64 rj = __shfl_sync(0xffffffffu, row, 4 * j);
            if (i0 + j < b1) {
                sparse_load<DPL>(p.v + rj * D + lane * DPL, vx[j]);
            } else {
#pragma unroll
                for (int t = 0; t < DPL; t++) vx[j][t] = 0.0f;
            }
        }
        // This lane's share of each head's score of its key.
        float a[TAC_MAX_GROUP];
#pragma unroll
        for (int h = 0; h < TAC_MAX_GROUP; h++) a[h] = 0.0f;
#pragma unroll
        for (int t = 0; t < NP; t++) {
            float x[8];
            unpack8(kr[t], x);
#pragma unroll
            for (int h = 0; h < TAC_MAX_GROUP; h++) {
                if (h >= (int)G) break;
                const float* qq = &sq[h][32 * t + 8 * part];
#pragma unroll
                for (int e = 0; e < 8; e++) a[h] = __fmaf_rn(qq[e], x[e], a[h]);
            }
        }
#pragma unroll
        for (int h = 0; h < TAC_MAX_GROUP; h++) {
            if (h >= (int)G) break;
            float sc = a[h];
            sc += __shfl_xor_sync(0xffffffffu, sc, 1);
            sc += __shfl_xor_sync(0xffffffffu, sc, 2);
            if (!live) sc = NEG_INF;
            float mt = fmaxf(sc, __shfl_xor_sync(0xffffffffu, sc, 4));
            mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 8));
            mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 16));
            // Finite: the tile's first key is live. The first tile's
            // factor is exp2(-inf) = 0, over nothing yet.
            const float mn = fmaxf(m[h], mt);
            const float corr = exp2f(m[h] - mn);
            const float w = exp2f(sc - mn);
            m[h] = mn;
            l[h] = __fmaf_rn(l[h], corr, w);  // this key's, summed over the keys at the end
#pragma unroll
            for (int t = 0; t < DPL; t++) acc[h][t] = __fmul_rn(acc[h][t], corr);
            if (part == 0) sp[warp][kk][h] = w;
        }
        __syncwarp();
#pragma unroll
        for (int j = 0; j < SPARSE_KEYS; j++) {
#pragma unroll
            for (int h = 0; h < TAC_MAX_GROUP; h++) {
                if (h >= (int)G) break;
                const float w = sp[warp][j][h];
#pragma unroll
                for (int t = 0; t < DPL; t++) acc[h][t] = __fmaf_rn(w, vx[j][t], acc[h][t]);
            }
        }
        __syncwarp();  // the next tile writes sp again
    }
#pragma unroll
    for (int h = 0; h < TAC_MAX_GROUP; h++) {
        if (h >= (int)G) break;
        // The four lanes of a key hold the same sum: one of each key.
        float sum = l[h];
        sum += __shfl_xor_sync(0xffffffffu, sum, 4);
        sum += __shfl_xor_sync(0xffffffffu, sum, 8);
        sum += __shfl_xor_sync(0xffffffffu, sum, 16);
        if (lane == 0) {
            wml[warp][h][0] = m[h];
            wml[warp][h][1] = sum;
        }
#pragma unroll
        for (int t = 0; t < DPL; t++) wacc[warp][h][lane * DPL + t] = acc[h][t];
    }
    __syncthreads();
    // The CTA's partial: its warps merged at the largest max.
    const u64 part_at = ((u64)pi * p.splits + s) * G;
    for (u32 x = tid; x < G * D; x += blockDim.x) {
        const u32 h = x / D, j = x % D;
        float mx = NEG_INF;
        for (u32 w = 0; w < SPARSE_WARPS; w++) mx = fmaxf(mx, wml[w][h][0]);
        float a = 0.0f, sum = 0.0f;
        if (mx > NEG_INF) {
            for (u32 w = 0; w < SPARSE_WARPS; w++) {
                const float f = wml[w][h][0] > NEG_INF ? exp2f(wml[w][h][0] - mx) : 0.0f;
                a += f * wacc[w][h][j];
                sum += f * wml[w][h][1];
            }
        }
        p.part_acc[(part_at + h) * D + j] = a;
        if (j == 0) {
            p.part_ml[(part_at + h) * 2] = mx;
            p.part_ml[(part_at + h) * 2 + 1] = sum;
        }
    }
}


// The splits of each (problem, query head) merged in split order into the
// output row. grid (G, problems), 128 threads over the head's dimensions.
extern "C" __global__ void tactic_attention_merge_f32(const SparseParams p) {
    const u32 h = blockIdx.x, pi = blockIdx.y, G = p.group;
    const SelProblem& pr = p.probs[pi];
    const u32 d = pr.lay.head_dim;
    const u64 base = (u64)pi * p.splits * G;
    float mx = NEG_INF;
    for (u32 s = 0; s < p.splits; s++) mx = fmaxf(mx, p.part_ml[(base + s * G + h) * 2]);
    float* out = p.out + (u64)(pr.row - p.out_row0) * p.out_stride + (u64)(pr.head * G + h) * d;
    for (u32 j = threadIdx.x; j < d; j += blockDim.x) {
        float a = 0.0f, sum = 0.0f;
        for (u32 s = 0; s < p.splits; s++) {
            const float ms = p.part_ml[(base + s * G + h) * 2];
            if (!(ms > NEG_INF)) continue;
            const float f = exp2f(ms - mx);
            a += f * p.part_acc[(base + s * G + h) * d + j];
            sum += f * p.part_ml[(base + s * G + h) * 2 + 1];
        }
        out[j] = a / sum;
    }
}
