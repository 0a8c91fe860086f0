// Diagnostics of a step's selections, for the sequences that asked for
// them (the engine measures the same on the host: engine/sparse.rs): per
// (sequence, KV head) and query head, the true mass p(I) of the slots the
// selection left in its list, over the exact scores of every cached key
// (kernels/src/tactic/baselines.rs: exact_scores and true_mass, in the
// same arithmetic: the CPU's 8-lane dot product of the unscaled query,
// times 1/sqrt(D), the maximum in f32, exponentials and sums in f64),
// written beside the estimate the union made, the slots selected and the
// clusters the state kept (what the host needs for the tokens read).

#define DIAG_THREADS 256

// One record per problem, 2G + 2 doubles: the true mass of each query
// head, the estimate of each, the slots selected, the clusters kept.
struct DiagParams {
    const SelProblem* probs;
    const float* qkv;       // the step's fused rows, from row 0
    const bf16* k;          // this layer's K cache
    const u32* table_off;
    const u32* tables;
    const u32* list;        // the selection's slots, ascending (per problem at lbase)
    const u32* list_len;    // [problems]
    const float* est;       // [problems][G] estimated mass
    double* out;            // [problems][2G + 2]
    u32 problems;
    u32 qkv_stride;
    u32 kv_heads;
    u32 d;
    u32 group;
    u32 pad;
};

// The CPU's exact score of slot `slot`: dot(q, k) * (1 / sqrt(D)).
__device__ __forceinline__ float diag_score(const float* q, const bf16* k, const u32* table,
                                            u32 kv_heads, u32 head, u32 d, u32 slot, float scale) {
    return __fmul_rn(tac_dot8_bf16(q, tac_row(k, table, kv_heads, head, d, slot), d), scale);
}

// grid (G, problems), DIAG_THREADS threads: one query head of one problem.
extern "C" __global__ void tactic_diag_mass_bf16(const DiagParams p) {
    const u32 g = blockIdx.x, pi = blockIdx.y, d = p.d, G = p.group, tid = threadIdx.x;
    const SelProblem& pr = p.probs[pi];
    __shared__ float sq[TAC_MAX_D];
    __shared__ float red[32];
    __shared__ double dred[32];
    const float* q = p.qkv + (u64)pr.row * p.qkv_stride + (u64)(pr.head * G + g) * d;
    for (u32 j = tid; j < d; j += blockDim.x) sq[j] = q[j];
    __syncthreads();
    const float scale = __fdiv_rn(1.0f, __fsqrt_rn((float)d));
    const u32* table = p.tables + p.table_off[pr.row];
    const u32 ctx = pr.ctx_len;
    float mx = NEG_INF;
    for (u32 t = tid; t < ctx; t += blockDim.x)
        mx = fmaxf(mx, diag_score(sq, p.k, table, p.kv_heads, pr.head, d, t, scale));
    mx = block_max(mx, red);
    double total = 0.0;
    for (u32 t = tid; t < ctx; t += blockDim.x) {
        const float s = diag_score(sq, p.k, table, p.kv_heads, pr.head, d, t, scale);
        total += exp((double)__fsub_rn(s, mx));
    }
    total = block_sum_f64(total, dred);
    const u32 n = p.list_len[pi];
    const u32* list = p.list + pr.lbase;
    double part = 0.0;
    for (u32 i = tid; i < n; i += blockDim.x) {
        const float s = diag_score(sq, p.k, table, p.kv_heads, pr.head, d, list[i], scale);
        part += exp((double)__fsub_rn(s, mx));
    }
    part = block_sum_f64(part, dred);
    if (tid == 0) {
        double* o = p.out + (u64)pi * (2 * G + 2);
        o[g] = part / total;  // IEEE division in f64, as the CPU
        o[G + g] = (double)p.est[pi * G + g];
        if (g == 0) {
            o[2 * G] = (double)n;
            // A problem without a state (a baseline's) kept no clusters.
            o[2 * G + 1] = pr.state ? (double)*tac_head(pr.state, pr.lay, pr.head).count : 0.0;
        }
    }
}
