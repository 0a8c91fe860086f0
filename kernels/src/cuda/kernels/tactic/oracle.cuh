// The oracle_top_p baseline on the GPU (kernels/src/tactic/baselines.rs:
// exact_scores and oracle_top_p; engine/sparse.rs takes the union over the
// group): per (sequence, KV head), each query head's exact scores of every
// cached key, sorted heaviest first (ties by slot), the shortest prefix of
// that order whose mass reaches P, and the union of the group's prefixes as
// the ascending slot list the sparse attention (tactic/sparse.cuh) reads.
//
// A problem is a SelProblem without a state (state 0): row, head, ctx_len,
// lay.head_dim, kbase and kpow (G x kpow scores and sort keys, kpow the
// context rounded up to a power of two), lbase, wbase and p are what these
// kernels read. The sums are the CPU's, in its order: the total over the
// slots in slot order, the prefix over the sorted order, each f64
// exponential computed by a lane and added by one thread.

#define ORACLE_THREADS 256
#define ORACLE_SORT_THREADS 1024

struct OracleParams {
    const SelProblem* probs;
    const float* qkv;       // the step's fused rows, from row 0
    const bf16* k;          // this layer's K cache
    const u32* table_off;
    const u32* tables;
    float* scores;          // [sum G kpow] exact scores, slot order
    u64* keys;              // [sum G kpow] sort keys, then the order
    u32* bitmap;            // [sum words] selected slots
    u32* list;              // [sum ctx_len] selected slots, ascending
    u32* list_len;          // [problems]
    u32 problems;
    u32 qkv_stride;
    u32 kv_heads;
    u32 d;
    u32 group;
    u32 sort_smem;          // longest sort done in shared memory (entries)
};

// Exact scores and sort keys (descending score, ties by slot: ascending as
// (~score bits, slot)), padding keys ~0 past the context. grid
// (ceil(max kpow / ORACLE_THREADS), G, problems).
extern "C" __global__ void tactic_oracle_scores_bf16(const OracleParams p) {
    const u32 g = blockIdx.y, pi = blockIdx.z, d = p.d, tid = threadIdx.x;
    const SelProblem& pr = p.probs[pi];
    __shared__ float sq[TAC_MAX_D];
    const float* q = p.qkv + (u64)pr.row * p.qkv_stride + (u64)(pr.head * p.group + g) * d;
    for (u32 j = tid; j < d; j += blockDim.x) sq[j] = q[j];
    __syncthreads();
    const float scale = __fdiv_rn(1.0f, __fsqrt_rn((float)d));
    const u32* table = p.tables + p.table_off[pr.row];
    const u32 t = blockIdx.x * blockDim.x + tid;
    if (t >= pr.kpow) return;
    const u64 at = pr.kbase + (u64)g * pr.kpow + t;
    u64 key = ~0ull;
    if (t < pr.ctx_len) {
        const float s = diag_score(sq, p.k, table, p.kv_heads, pr.head, d, t, scale);
        p.scores[at] = s;
        key = ((u64)~tac_ordered(s) << 32) | t;
    }
    p.keys[at] = key;
}

// Sorts each query head's kpow keys ascending (bitonic; in shared memory
// when they fit, else in place in global memory). grid (G, problems),
// ORACLE_SORT_THREADS threads, dynamic shared memory min(kpow, sort_smem) x 8.
extern "C" __global__ void tactic_oracle_sort_u64(const OracleParams p) {
    const u32 g = blockIdx.x, pi = blockIdx.y;
    const SelProblem& pr = p.probs[pi];
    const u32 n = pr.kpow;
    u64* keys = p.keys + pr.kbase + (u64)g * n;
    extern __shared__ u64 oracle_smem[];
    tac_sort_u64(keys, n, oracle_smem, p.sort_smem);
}

// The set bits of `words` bitmap words as an ascending list of slots, its
// length in `*len`: each thread a run of words, placed by a block scan.
// Every thread of the block calls it; `scan` holds 32 u32.
__device__ void bitmap_to_list(const u32* bitmap, u32 words, u32* list, u32* len, u32* scan) {
    const u32 tid = threadIdx.x, bd = blockDim.x;
    const u32 per = (words + bd - 1) / bd;
    const u32 a = min(tid * per, words), b = min(a + per, words);
    u32 n = 0;
    for (u32 w = a; w < b; w++) n += __popc(bitmap[w]);
    u32 total;
    u32 at = block_scan_u32(n, scan, &total);
    for (u32 w = a; w < b; w++) {
        u32 bits = bitmap[w];
        while (bits) {
            const u32 i = __ffs(bits) - 1;
            list[at++] = w * 32 + i;
            bits &= bits - 1;
        }
    }
    if (tid == 0) *len = total;
}

// Sum of exp(s - mx) over `n` scores read through `at(i)`, in order i =
// 0..n, as the CPU's sequential f64 sum: the lanes of one warp compute 32
// exponentials, lane 0 adds them in order. With `target` >= 0, stops
// before the first term at which the sum already reaches it and returns
// the terms taken in `*taken`. Every lane gets the sum.
template <class At>
__device__ double oracle_walk(At at, u32 n, float mx, double target, double* buf, u32* taken) {
    const u32 lane = threadIdx.x & 31;
    double acc = 0.0;
    u32 took = 0;
    bool stop = false;
    for (u32 c = 0; c < n && !stop; c += 32) {
        const u32 i = c + lane;
        buf[lane] = i < n ? exp((double)__fsub_rn(at(i), mx)) : 0.0;
        __syncwarp();
        if (lane == 0) {
            const u32 m = min(32u, n - c);
            for (u32 j = 0; j < m; j++) {
                if (target >= 0.0 && acc >= target) {
                    stop = true;
                    break;
                }
                acc += buf[j];
                took++;
            }
        }
        stop = __shfl_sync(0xffffffffu, stop, 0);
        __syncwarp();
    }
    *taken = __shfl_sync(0xffffffffu, took, 0);
    return __shfl_sync(0xffffffffu, acc, 0);
}

// Each query head's prefix (a warp per head), the union marked in the
// bitmap, written out as an ascending list. grid (problems), 32 x G threads.
extern "C" __global__ void tactic_oracle_take_f64(const OracleParams p) {
    const u32 pi = blockIdx.x, tid = threadIdx.x, bd = blockDim.x;
    const u32 g = tid >> 5, lane = tid & 31;
    const SelProblem& pr = p.probs[pi];
    const u32 ctx = pr.ctx_len, words = (ctx + 31) / 32;
    __shared__ double buf[TAC_MAX_GROUP][32];
    __shared__ u32 scan[32];
    u32* bitmap = p.bitmap + pr.wbase;
    for (u32 w = tid; w < words; w += bd) bitmap[w] = 0;
    __syncthreads();
    if (g < p.group) {
        const float* sc = p.scores + pr.kbase + (u64)g * pr.kpow;
        const u64* order = p.keys + pr.kbase + (u64)g * pr.kpow;
        const float mx = sc[(u32)order[0]];
        u32 taken;
        const double total = oracle_walk([&](u32 i) { return sc[i]; }, ctx, mx, -1.0, buf[g], &taken);
        const double target = (double)pr.p * total;
        oracle_walk([&](u32 i) { return sc[(u32)order[i]]; }, ctx, mx, target, buf[g], &taken);
        for (u32 i = lane; i < taken; i += 32) {
            const u32 s = (u32)order[i];
            atomicOr(&bitmap[s >> 5], 1u << (s & 31));
        }
    }
    __syncthreads();
    bitmap_to_list(bitmap, words, p.list + pr.lbase, p.list_len + pi, scan);
}
