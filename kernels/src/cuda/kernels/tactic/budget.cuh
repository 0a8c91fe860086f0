// The fixed_budget baseline on the GPU (Quest: kernels/src/tactic/
// baselines.rs, PageBounds and fixed_budget; engine/sparse.rs feeds it the
// group's unscaled queries): per (sequence, KV head), every full page's
// per-dimension key minimum and maximum, each query head's upper bound
// sum_d max(q_d min_d, q_d max_d) per page, the pages sorted by it
// (descending, ties by page: tactic_oracle_sort_u64 on these keys), then
// the CPU's round-robin over the group's orders: the partial last page and
// the new tokens first, whole pages until the budget is spent.
//
// The bounds are computed from the keys at each step (the CPU keeps them
// and grows them as pages fill): the same minima and maxima, so the same
// selection, at the price of reading every full page's keys once a step.
//
// A problem is a SelProblem without a state: row, head, ctx_len, kbase and
// kpow (G x kpow page keys, kpow the full pages rounded up to a power of
// two), tkbase (a word per 32 pages), lbase and wbase.

#define BUDGET_THREADS 128

struct BudgetParams {
    const SelProblem* probs;
    const float* qkv;       // the step's fused rows, from row 0
    const bf16* k;          // this layer's K cache
    const u32* table_off;
    const u32* tables;
    const u32* budget;      // [problems] tokens
    u64* keys;              // [sum G kpow] page sort keys, then the order
    u32* taken;             // [sum page words] pages taken
    u32* bitmap;            // [sum words] selected slots
    u32* list;              // [sum ctx_len] selected slots, ascending
    u32* list_len;          // [problems]
    u32 problems;
    u32 qkv_stride;
    u32 kv_heads;
    u32 d;
    u32 group;
    u32 pad;
};

// One page of one problem: its bounds, each query head's upper bound as a
// sort key (~bits, page); padding keys ~0 past the full pages. grid (max
// kpow, problems), BUDGET_THREADS threads.
extern "C" __global__ void tactic_budget_bounds_bf16(const BudgetParams p) {
    const u32 page = blockIdx.x, pi = blockIdx.y, d = p.d, G = p.group, tid = threadIdx.x;
    const SelProblem& pr = p.probs[pi];
    if (page >= pr.kpow) return;
    __shared__ float lo[TAC_MAX_D], hi[TAC_MAX_D];
    const u32 pages = pr.ctx_len / BLOCK_TOKENS;
    u64* keys = p.keys + pr.kbase;
    if (page >= pages) {
        for (u32 g = tid; g < G; g += blockDim.x) keys[(u64)g * pr.kpow + page] = ~0ull;
        return;
    }
    const u32* table = p.tables + p.table_off[pr.row];
    for (u32 j = tid; j < d; j += blockDim.x) {
        float a = __int_as_float(0x7f800000), b = NEG_INF;
        for (u32 t = 0; t < BLOCK_TOKENS; t++) {
            const float x = bf2f(tac_row(p.k, table, p.kv_heads, pr.head, d, page * BLOCK_TOKENS + t)[j]);
            a = fminf(a, x);
            b = fmaxf(b, x);
        }
        lo[j] = a;
        hi[j] = b;
    }
    __syncthreads();
    for (u32 g = tid; g < G; g += blockDim.x) {
        const float* q = p.qkv + (u64)pr.row * p.qkv_stride + (u64)(pr.head * G + g) * d;
        float ub = -0.0f;  // Rust's f32 sum starts at -0.0
        for (u32 j = 0; j < d; j++)
            ub = __fadd_rn(ub, fmaxf(__fmul_rn(q[j], lo[j]), __fmul_rn(q[j], hi[j])));
        keys[(u64)g * pr.kpow + page] = ((u64)~tac_ordered(ub) << 32) | page;
    }
}

// The round-robin of fixed_budget over the sorted page orders (one
// thread: a few steps per page), the new tokens marked first, the slots
// listed in ascending order. grid (problems), BUDGET_THREADS threads.
extern "C" __global__ void tactic_budget_take_u32(const BudgetParams p) {
    const u32 pi = blockIdx.x, tid = threadIdx.x, bd = blockDim.x, G = p.group;
    const SelProblem& pr = p.probs[pi];
    const u32 ctx = pr.ctx_len, words = (ctx + 31) / 32;
    const u32 pages = ctx / BLOCK_TOKENS, covered = pages * BLOCK_TOKENS;
    __shared__ u32 scan[32];
    u32* bitmap = p.bitmap + pr.wbase;
    u32* taken = p.taken + pr.tkbase;
    for (u32 w = tid; w < words; w += bd) bitmap[w] = 0;
    for (u32 w = tid; w < (pages + 31) / 32; w += bd) taken[w] = 0;
    __syncthreads();
    for (u32 s = covered + tid; s < ctx; s += bd) atomicOr(&bitmap[s >> 5], 1u << (s & 31));
    __syncthreads();
    if (tid == 0) {
        const u32 budget = p.budget[pi];
        u32 count = ctx - covered, ptr[TAC_MAX_GROUP];
        for (u32 g = 0; g < G; g++) ptr[g] = 0;
        bool progress = true;
        while (count < budget && progress) {
            progress = false;
            for (u32 g = 0; g < G; g++) {
                const u64* order = p.keys + pr.kbase + (u64)g * pr.kpow;
                while (ptr[g] < pages && ((taken[(u32)order[ptr[g]] >> 5] >> ((u32)order[ptr[g]] & 31)) & 1u))
                    ptr[g]++;
                if (ptr[g] == pages || count >= budget) continue;
                const u32 pg = (u32)order[ptr[g]];
                taken[pg >> 5] |= 1u << (pg & 31);
                progress = true;
                count += BLOCK_TOKENS;
                // A page is 16 slots, 16-aligned: half of one bitmap word.
                bitmap[(pg * BLOCK_TOKENS) >> 5] |= 0xffffu << ((pg * BLOCK_TOKENS) & 31);
            }
        }
    }
    __syncthreads();
    bitmap_to_list(bitmap, words, p.list + pr.lbase, p.list_len + pi, scan);
}
