// Token-granular attention over the selected slots: for each (sequence, KV
// head) its G query heads attend the slots the union listed, reading each
// slot's K and V row once for the group. The list is cut into `splits`
// equal parts (its length is known on the device only: each CTA reads it
// and takes its share), each CTA writes an unnormalised partial (acc, max,
// sum), and a second kernel merges them in split order. The reference is
// the CPU's paged attention with a selection (`AttnSeq::selection`).

#define SPARSE_WARPS 4

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
    float* part_ml;         // [problems][splits][G][2]: max and sum
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

// grid (splits, problems), SPARSE_WARPS warps; lane l holds dims
// [l * D / 32, (l + 1) * D / 32) of every row.
template <int D>
__device__ __forceinline__ void sparse_cta(const SparseParams& p) {
    constexpr int DPL = D / 32;
    const u32 s = blockIdx.x, pi = blockIdx.y, tid = threadIdx.x;
    const u32 warp = tid >> 5, lane = tid & 31, G = p.group;
    const SelProblem& pr = p.probs[pi];
    __shared__ float sq[TAC_MAX_GROUP][D];
    __shared__ float wml[SPARSE_WARPS][TAC_MAX_GROUP][2];
    __shared__ float wacc[SPARSE_WARPS][TAC_MAX_GROUP][D];
    const float scale = __fdiv_rn(1.0f, __fsqrt_rn((float)D));
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
    for (u32 i = b0 + warp; i < b1; i += SPARSE_WARPS) {
        const u32 slot = list[i];
        const u64 blk = table[slot / BLOCK_TOKENS];
        const u64 at = ((blk * p.kv_heads + pr.head) * BLOCK_TOKENS + slot % BLOCK_TOKENS) * D +
                       lane * DPL;
        float kx[DPL], vx[DPL];
#pragma unroll
        for (int t = 0; t < DPL; t++) {
            kx[t] = bf2f(p.k[at + t]);
            vx[t] = bf2f(p.v[at + t]);
        }
#pragma unroll
        for (int h = 0; h < TAC_MAX_GROUP; h++) {
            if (h >= (int)G) break;
            float sc = 0.0f;
#pragma unroll
            for (int t = 0; t < DPL; t++) sc = __fmaf_rn(sq[h][lane * DPL + t], kx[t], sc);
            sc = warp_sum(sc);
            const float mn = fmaxf(m[h], sc);
            const float corr = expf(m[h] - mn);
            const float w = expf(sc - mn);
            l[h] = __fmaf_rn(l[h], corr, w);
#pragma unroll
            for (int t = 0; t < DPL; t++) acc[h][t] = __fmaf_rn(acc[h][t], corr, __fmul_rn(w, vx[t]));
            m[h] = mn;
        }
    }
#pragma unroll
    for (int h = 0; h < TAC_MAX_GROUP; h++) {
        if (h >= (int)G) break;
        if (lane == 0) {
            wml[warp][h][0] = m[h];
            wml[warp][h][1] = l[h];
        }
#pragma unroll
        for (int t = 0; t < DPL; t++) wacc[warp][h][lane * DPL + t] = acc[h][t];
    }
    __syncthreads();
    // The CTA's partial: its warps merged at the largest max.
    const u64 part = ((u64)pi * p.splits + s) * G;
    for (u32 x = tid; x < G * D; x += blockDim.x) {
        const u32 h = x / D, j = x % D;
        float mx = NEG_INF;
        for (u32 w = 0; w < SPARSE_WARPS; w++) mx = fmaxf(mx, wml[w][h][0]);
        float a = 0.0f, sum = 0.0f;
        if (mx > NEG_INF) {
            for (u32 w = 0; w < SPARSE_WARPS; w++) {
                const float f = wml[w][h][0] > NEG_INF ? expf(wml[w][h][0] - mx) : 0.0f;
                a += f * wacc[w][h][j];
                sum += f * wml[w][h][1];
            }
        }
        p.part_acc[(part + h) * D + j] = a;
        if (j == 0) {
            p.part_ml[(part + h) * 2] = mx;
            p.part_ml[(part + h) * 2 + 1] = sum;
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
            const float f = expf(ms - mx);
            a += f * p.part_acc[(base + s * G + h) * d + j];
            sum += f * p.part_ml[(base + s * G + h) * 2 + 1];
        }
        out[j] = a / sum;
    }
}
