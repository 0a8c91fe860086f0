// One decode step's selection for every (sequence, KV head) of a layer
// (kernels/src/tactic/select.rs and union.rs on the GPU): scaled queries,
// the shape's variance factor and the tail's exact scores (prep), every
// cluster's estimate and rank key (score), the ranking per query head
// (rank), and the GQA union in the chunked formulation of union.rs, which
// writes the sorted slots each KV head attends (union).

#define SEL_THREADS 128
#define RANK_THREADS 1024
// A warp per candidate cluster: UNION_CHUNK in kernels/src/tactic/union.rs.
#define UNION_WARPS 8

// One (sequence, KV head) of the step (kernels/src/cuda/tactic.rs: SelProblem).
struct SelProblem {
    u64 state;
    TacLayout lay;
    u32 head;      // KV head
    u32 row;       // the sequence's decode row in the step
    u32 ctx_len;   // tokens cached, this step's included
    u32 cbase;     // its first entry in lest: G x cap
    u32 kbase;     // its first sort key: G x kpow
    u32 kpow;      // sort length per query head: cap rounded up to a power of two
    u32 tbase;     // its first tail score: G x (ctx_len - len)
    u32 lbase;     // its first list entry: ctx_len
    u32 wbase;     // its first bitmap word: ceil(ctx_len / 32)
    u32 tkbase;    // its first taken word: ceil(cap / 32)
    float p;       // target mass
    float margin;
};

struct SelParams {
    const SelProblem* probs;
    const float* qkv;       // the step's fused rows, from row 0
    const bf16* k;          // this layer's K cache
    const u32* table_off;
    const u32* tables;
    float* qs;              // [problems][G][D] queries scaled by 1/sqrt(D)
    float* qvar;            // [problems][G] q^T shape q
    u32* refs;              // [problems][G] reference score, as tac_ordered bits
    float* lest;            // [sum G cap] log estimates (then relative to the reference)
    u64* keys;              // [sum G kpow] rank keys, then the order
    float* tail;            // [sum G tail] exact tail scores
    u32* bitmap;            // [sum words] selected slots
    u32* taken;             // [sum taken words] clusters taken
    u32* list;              // [sum ctx_len] selected slots, ascending
    u32* list_len;          // [problems]
    float* est;             // [problems][G] estimated mass of the selection
    u32 problems;
    u32 qkv_stride;
    u32 kv_heads;
    u32 d;
    u32 group;              // query heads per KV head (G)
    u32 sort_smem;          // longest sort done in shared memory (entries)
};

// Queries scaled by 1/sqrt(D), q^T shape q (the spread's variance factor),
// the tail's exact scores and the reference they start. grid (G, problems).
extern "C" __global__ void tactic_sel_prep_bf16(const SelParams p) {
    const u32 g = blockIdx.x, pi = blockIdx.y, d = p.d, tid = threadIdx.x;
    const SelProblem& pr = p.probs[pi];
    __shared__ float sq[TAC_MAX_D];
    __shared__ float sv[TAC_MAX_D];
    __shared__ float red[32];
    const float* q = p.qkv + (u64)pr.row * p.qkv_stride + (u64)(pr.head * p.group + g) * d;
    float* qs = p.qs + ((u64)pi * p.group + g) * d;
    const float scale = __fdiv_rn(1.0f, __fsqrt_rn((float)d));
    for (u32 j = tid; j < d; j += blockDim.x) {
        sq[j] = __fmul_rn(q[j], scale);
        qs[j] = sq[j];
    }
    __syncthreads();
    const TacHead st = tac_head(pr.state, pr.lay, pr.head);
    for (u32 i = tid; i < d; i += blockDim.x) sv[i] = tac_dot8(sq, st.shape + (u64)i * d, d);
    __syncthreads();
    if (tid == 0) {
        float v = 0.0f;
        for (u32 i = 0; i < d; i++) v = __fadd_rn(v, __fmul_rn(sq[i], sv[i]));
        p.qvar[pi * p.group + g] = v;
    }
    const u32 len = pr.lay.len, tail = pr.ctx_len - len;
    const u32* table = p.tables + p.table_off[pr.row];
    float* out = p.tail + pr.tbase + (u64)g * tail;
    float mx = NEG_INF;
    for (u32 t = tid; t < tail; t += blockDim.x) {
        const float s = tac_dot8_bf16(sq, tac_row(p.k, table, p.kv_heads, pr.head, d, len + t), d);
        out[t] = s;
        mx = fmaxf(mx, s);
    }
    mx = block_max(mx, red);
    if (tid == 0) p.refs[pi * p.group + g] = tac_ordered(mx);
}

// Per cluster and query head: the centroid's score m, the log-normal's half
// variance, the log estimate ln|c| + m + v/2 and the rank key m + v/2
// (descending, ties by index: sorted ascending as (~rank bits, index));
// raises the reference to the best rank key. grid (ceil(max kpow /
// SEL_THREADS), G, problems).
extern "C" __global__ void tactic_sel_score_f32(const SelParams p) {
    const u32 g = blockIdx.y, pi = blockIdx.z, d = p.d, tid = threadIdx.x;
    const SelProblem& pr = p.probs[pi];
    __shared__ float sq[TAC_MAX_D];
    __shared__ float red[32];
    const float* qs = p.qs + ((u64)pi * p.group + g) * d;
    for (u32 j = tid; j < d; j += blockDim.x) sq[j] = qs[j];
    __syncthreads();
    const TacHead st = tac_head(pr.state, pr.lay, pr.head);
    const u32 count = *st.count, cap = pr.lay.cap;
    const u32 c = blockIdx.x * blockDim.x + tid;
    float best = NEG_INF;
    if (c < pr.kpow) {
        u64 key = ~0ull;
        if (c < count) {
            const float m = tac_dot8(sq, st.centroids + (u64)c * d, d);
            const float half = __fmul_rn(__fmul_rn(0.5f, p.qvar[pi * p.group + g]), st.spread[c]);
            const float rank = __fadd_rn(m, half);
            p.lest[pr.cbase + (u64)g * cap + c] = __fadd_rn(__fadd_rn(st.log_size[c], m), half);
            key = ((u64)~tac_ordered(rank) << 32) | c;
            best = rank;  // fmaxf below ignores a NaN, as f32::max does
        }
        p.keys[pr.kbase + (u64)g * pr.kpow + c] = key;
    }
    best = block_max(best, red);
    if (tid == 0 && best > NEG_INF) atomicMax(&p.refs[pi * p.group + g], tac_ordered(best));
}

// Sorts each query head's rank keys ascending (bitonic, in shared memory
// when they fit, else in place in global memory), so that the low 32 bits
// of entry i are the head's i-th cluster. Only a power of two covering the
// kept clusters is sorted: the padding keys (~0) already sort last. grid
// (G, problems), RANK_THREADS threads, dynamic shared memory
// min(kpow, sort_smem) x 8 bytes.
extern "C" __global__ void tactic_sel_rank_u64(const SelParams p) {
    const u32 g = blockIdx.x, pi = blockIdx.y;
    const SelProblem& pr = p.probs[pi];
    const TacHead st = tac_head(pr.state, pr.lay, pr.head);
    const u32 count = *st.count;
    u32 n = 1;
    while (n < count) n <<= 1;
    u64* keys = p.keys + pr.kbase + (u64)g * pr.kpow;
    extern __shared__ u64 rank_smem[];
    tac_sort_u64(keys, n, rank_smem, p.sort_smem);
}
