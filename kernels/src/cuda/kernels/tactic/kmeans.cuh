// Batched k-means over runs of cached keys (kernels/src/tactic/kmeans.rs
// and index.rs on the GPU). A problem is one (sequence, KV head) whose
// slots [start, start + n) are clustered into at most k clusters and
// appended to its state; every launch serves all problems of a layer.
//
// A clustering is: init, then rounds of (assign, csr, update), then
// compact, stats, shape, shape_norm. The host launches every round the
// CPU could run (iterations + 1: its iterations, then the final assignment
// and update) and never reads a flag back. A round whose assignment did
// not change is a fixed point (the update of an unchanged assignment gives
// the same centroids, bit for bit), so from there on each kernel of a
// problem returns at once: the same result as the CPU's early stop.

#define KM_STREAM 0x4b4d454100000000ull
// Centroids a block of the assignment holds in shared memory at a time.
#define KM_TILE 32
#define KM_ASSIGN_THREADS 128
// Warps of the update and stats kernels: a warp per cluster.
#define KM_WARPS 8
// Rows of the pooled scatter a block of the shape kernel accumulates, and
// members it stages at a time.
#define KM_SHAPE_ROWS 8
#define KM_SHAPE_STAGE 8
#define KM_SHAPE_THREADS 256
#define KM_CSR_THREADS 1024

// One (sequence, KV head) to cluster (kernels/src/cuda/tactic.rs: KmProblem).
struct KmProblem {
    u64 state;     // the sequence's state of this layer
    TacLayout lay;
    u32 head;      // KV head
    u32 row;       // a row of the sequence in the step (its block table)
    u32 start;     // first slot of the run
    u32 n;         // slots in the run
    u32 k;         // clusters to start from (ceil(n / cluster size), at most n)
    u32 work;      // its first entry in assign and members (n of them)
    u32 kwork;     // its first entry in cent, norms, counts, mu (k of them)
    u32 koff;      // its first entry in offs (k + 1 of them)
};

struct KmParams {
    const KmProblem* probs;
    const bf16* k;          // this layer's K cache
    const u32* table_off;   // the step's, per row
    const u32* tables;      // the step's block tables
    float* cent;            // [sum k][D] working centroids
    float* norms;           // [sum k] their squared norms
    u32* assign;            // [sum n] cluster of each key of a run
    u32* counts;            // [sum k] sizes, then scatter cursors, then compacted indices
    u32* offs;              // [sum (k + 1)] CSR offsets of the working clusters
    u32* members;           // [sum n] run-local key indices, grouped by cluster, ascending
    u32* changed;           // [rounds][problems] an assignment changed in that round
    double* mu;             // [sum k][D] final means in f64
    double* cov;            // [problems][D][D] the run's pooled scatter
    u64 seed;
    u32 problems;
    u32 kv_heads;
    u32 d;
    u32 round;
};

__device__ __forceinline__ const u32* km_table(const KmParams& p, const KmProblem& pr) {
    return p.tables + p.table_off[pr.row];
}

// The CPU's `row.iter().map(|x| x * x).sum()`: in order, nothing fused.
__device__ float km_sq_norm(const float* x, u32 d) {
    float s = 0.0f;
    for (u32 j = 0; j < d; j++) s = __fadd_rn(s, __fmul_rn(x[j], x[j]));
    return s;
}

// The f64 sum of the keys of members [a, b) of a run's working clusters,
// dimension `lane + 32 t` in s[t], in member order (as the CPU sums them).
__device__ __forceinline__ void km_member_sum(const KmParams& p, const KmProblem& pr,
                                              const u32* table, u32 a, u32 b, u32 lane,
                                              double* s) {
#pragma unroll
    for (int t = 0; t < TAC_MAX_D / 32; t++) s[t] = 0.0;
    for (u32 m = a; m < b; m++) {
        const bf16* row = tac_row(p.k, table, p.kv_heads, pr.head, p.d,
                                  pr.start + p.members[pr.work + m]);
#pragma unroll
        for (int t = 0; t < TAC_MAX_D / 32; t++) {
            const u32 j = lane + 32 * t;
            if (j < p.d) s[t] += (double)bf2f(row[j]);
        }
    }
}

// Four floats from shared memory in one instruction, spelled out in PTX:
// left to it, NVRTC sometimes re-reads half of such a load from one
// compile to the next (the same numbers, but not the same PTX, which the
// PTX identity table cannot track).
__device__ __forceinline__ float4 km_lds4(const float* x) {
#ifdef __CUDA_ARCH__
    float4 v;
    const unsigned addr = (unsigned)__cvta_generic_to_shared(x);
    asm volatile("ld.shared.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "r"(addr));
    return v;
#else
    return *reinterpret_cast<const float4*>(x);  // the CPU stand-in (kernels/emu)
#endif
}

// Whether round `round` of problem `pi` does anything: round 0 always;
// later ones only after a round that changed an assignment.
__device__ __forceinline__ bool km_live(const KmParams& p, u32 round, u32 pi) {
    return round == 0 || p.changed[(round - 1) * p.problems + pi] != 0;
}

// Stratified initialisation with slot 0 pinned: centroid c is the key at
// lo + r of its range [c n / k, (c + 1) n / k), r a seeded draw (0 for c = 0).
// grid (max k, problems), one warp.
extern "C" __global__ void tactic_km_init_bf16(const KmParams p) {
    const KmProblem& pr = p.probs[blockIdx.y];
    const u32 c = blockIdx.x;
    if (c >= pr.k) return;
    const u64 n = pr.n, k = pr.k;
    const u64 lo = c * n / k, hi = (c + 1) * n / k;
    const u64 r = c == 0 ? 0 : rng_bits(p.seed, KM_STREAM + 2, c) % (hi - lo);
    const bf16* row =
        tac_row(p.k, km_table(p, pr), p.kv_heads, pr.head, p.d, pr.start + (u32)(lo + r));
    float* out = p.cent + (u64)(pr.kwork + c) * p.d;
    for (u32 j = threadIdx.x; j < p.d; j += 32) out[j] = bf2f(row[j]);
    __syncwarp();
    if (threadIdx.x == 0) p.norms[pr.kwork + c] = km_sq_norm(out, p.d);
}

// Each key to the centroid minimising ‖μ‖² − 2 k·μ, ties to the lower
// index. grid (ceil(max n / 128), problems), 128 threads (a key each),
// dynamic shared memory KM_TILE x (D + 1) floats.
extern "C" __global__ void tactic_km_assign_bf16(const KmParams p) {
    const u32 pi = blockIdx.y;
    const KmProblem& pr = p.probs[pi];
    if (!km_live(p, p.round, pi) || blockIdx.x * blockDim.x >= pr.n) return;
    extern __shared__ float km_smem[];
    float* sc = km_smem;              // [KM_TILE][D]
    float* sn = km_smem + KM_TILE * p.d;  // [KM_TILE]
    const u32 i = blockIdx.x * blockDim.x + threadIdx.x;
    const bool live = i < pr.n;
    const bf16* key = tac_row(p.k, km_table(p, pr), p.kv_heads, pr.head, p.d,
                              pr.start + (live ? i : 0));
    float best = __int_as_float(0x7f800000);
    u32 bc = 0;
    for (u32 c0 = 0; c0 < pr.k; c0 += KM_TILE) {
        const u32 tc = min((u32)KM_TILE, pr.k - c0);
        __syncthreads();
        const float* src = p.cent + (u64)(pr.kwork + c0) * p.d;
        for (u32 x = threadIdx.x; x < tc * p.d; x += blockDim.x) sc[x] = src[x];
        for (u32 x = threadIdx.x; x < tc; x += blockDim.x) sn[x] = p.norms[pr.kwork + c0 + x];
        __syncthreads();
        if (!live) continue;
        float acc[KM_TILE];
#pragma unroll
        for (int c = 0; c < KM_TILE; c++) acc[c] = 0.0f;
        for (u32 j = 0; j < p.d; j += 8) {
            float kx[8];
            unpack8(ld16(key + j), kx);
#pragma unroll
            for (int c = 0; c < KM_TILE; c++) {
                const float4 a = km_lds4(sc + c * p.d + j);
                const float4 b = km_lds4(sc + c * p.d + j + 4);
                // One FMA chain in dimension order, spelled out: left to
                // the compiler, a sum of products may be fused either way
                // round, and NVRTC does not always choose alike.
                float x = acc[c];
                x = __fmaf_rn(kx[0], a.x, x);
                x = __fmaf_rn(kx[1], a.y, x);
                x = __fmaf_rn(kx[2], a.z, x);
                x = __fmaf_rn(kx[3], a.w, x);
                x = __fmaf_rn(kx[4], b.x, x);
                x = __fmaf_rn(kx[5], b.y, x);
                x = __fmaf_rn(kx[6], b.z, x);
                acc[c] = __fmaf_rn(kx[7], b.w, x);
            }
        }
#pragma unroll
        for (int c = 0; c < KM_TILE; c++) {
            const float dd = sn[c] - 2.0f * acc[c];
            if (c < (int)tc && dd < best) {
                best = dd;
                bc = c0 + c;
            }
        }
    }
    if (!live) return;
    u32* a = p.assign + pr.work + i;
    if (p.round == 0 || *a != bc) {
        *a = bc;
        p.changed[p.round * p.problems + pi] = 1;
    }
}

// The assignment as CSR: counts, their exclusive scan into offs, and a
// stable scatter (ascending slots within a cluster, as the CPU's sums
// run). grid (problems), KM_CSR_THREADS threads.
extern "C" __global__ void tactic_km_csr_u32(const KmParams p) {
    const u32 pi = blockIdx.x;
    if (!p.changed[p.round * p.problems + pi]) return;
    const KmProblem& pr = p.probs[pi];
    const u32 n = pr.n, k = pr.k, tid = threadIdx.x, bd = blockDim.x;
    u32* counts = p.counts + pr.kwork;
    u32* offs = p.offs + pr.koff;
    const u32* assign = p.assign + pr.work;
    u32* members = p.members + pr.work;
    __shared__ u32 scan[32];
    for (u32 c = tid; c < k; c += bd) counts[c] = 0;
    __syncthreads();
    for (u32 i = tid; i < n; i += bd) atomicAdd(&counts[assign[i]], 1u);
    __syncthreads();
    const u32 per = (k + bd - 1) / bd;
    const u32 a = min(tid * per, k), b = min(a + per, k);
    u32 s = 0;
    for (u32 c = a; c < b; c++) s += counts[c];
    u32 total;
    u32 at = block_scan_u32(s, scan, &total);
    for (u32 c = a; c < b; c++) {
        const u32 x = counts[c];
        offs[c] = at;
        counts[c] = at;  // the scatter's cursor
        at += x;
    }
    if (tid == 0) offs[k] = n;
    __syncthreads();
    if (tid >= 32) return;
    // One warp, 32 keys at a time in slot order: keys of one cluster in a
    // batch take consecutive places in lane order.
    const u32 lane = tid;
    for (u32 i0 = 0; i0 < n; i0 += 32) {
        const u32 i = i0 + lane;
        const bool live = i < n;
        const u32 c = live ? assign[i] : 0xffffffffu;
        const u32 peers = __match_any_sync(0xffffffffu, c);
        const u32 leader = __ffs(peers) - 1;
        const u32 rank = __popc(peers & ((1u << lane) - 1u));
        u32 pos = 0;
        if (live && lane == leader) {
            pos = counts[c];
            counts[c] = pos + __popc(peers);
        }
        pos = __shfl_sync(0xffffffffu, pos, leader);
        if (live) members[pos + rank] = i;
        __syncwarp();
    }
}

// Each cluster's mean over its members, summed in slot order in f64 (an
// empty cluster keeps its centroid). grid (ceil(max k / KM_WARPS),
// problems), a warp per cluster, lanes over dimensions.
extern "C" __global__ void tactic_km_update_bf16(const KmParams p) {
    const u32 pi = blockIdx.y;
    if (!p.changed[p.round * p.problems + pi]) return;
    const KmProblem& pr = p.probs[pi];
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 c = blockIdx.x * KM_WARPS + warp;
    if (c >= pr.k) return;
    const u32* offs = p.offs + pr.koff;
    const u32 a = offs[c], b = offs[c + 1];
    if (a == b) return;
    const u32* table = km_table(p, pr);
    double s[TAC_MAX_D / 32];
    km_member_sum(p, pr, table, a, b, lane, s);
    const double inv = 1.0 / (double)(b - a);
    float* out = p.cent + (u64)(pr.kwork + c) * p.d;
#pragma unroll
    for (int t = 0; t < TAC_MAX_D / 32; t++) {
        const u32 j = lane + 32 * t;
        if (j < p.d) out[j] = (float)__dmul_rn(s[t], inv);
    }
    __syncwarp();
    if (lane == 0) p.norms[pr.kwork + c] = km_sq_norm(out, p.d);
}

// Drops the empty clusters, numbering the rest in index order after the
// clusters the head already has, and writes the run's offsets and members
// into the state (slots, not run-local indices). counts[c] becomes cluster
// c's index in the state (or ~0 when empty). grid (problems), KM_CSR_THREADS.
extern "C" __global__ void tactic_km_compact_u32(const KmParams p) {
    const KmProblem& pr = p.probs[blockIdx.x];
    const TacHead st = tac_head(pr.state, pr.lay, pr.head);
    const u32 k = pr.k, tid = threadIdx.x, bd = blockDim.x;
    const u32* offs = p.offs + pr.koff;
    u32* map = p.counts + pr.kwork;
    const u32 base = *st.count;
    __shared__ u32 scan[32];
    const u32 per = (k + bd - 1) / bd;
    const u32 a = min(tid * per, k), b = min(a + per, k);
    u32 s = 0;
    for (u32 c = a; c < b; c++) s += offs[c + 1] > offs[c] ? 1u : 0u;
    u32 total;
    u32 idx = base + block_scan_u32(s, scan, &total);
    for (u32 c = a; c < b; c++) {
        if (offs[c + 1] > offs[c]) {
            st.offsets[idx] = pr.start + offs[c];
            map[c] = idx++;
        } else {
            map[c] = 0xffffffffu;
        }
    }
    for (u32 i = tid; i < pr.n; i += bd) st.members[pr.start + i] = pr.start + p.members[pr.work + i];
    __syncthreads();
    if (tid == 0) {
        st.offsets[base + total] = pr.start + pr.n;
        *st.count = base + total;
    }
}

// Per kept cluster: its mean in f64 (kept for the shape), its centroid,
// ln |c| and spread (the mean squared distance of the members to the
// mean, in f64). grid (ceil(max k / KM_WARPS), problems), a warp per cluster.
extern "C" __global__ void tactic_km_stats_bf16(const KmParams p) {
    const u32 pi = blockIdx.y;
    const KmProblem& pr = p.probs[pi];
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 c = blockIdx.x * KM_WARPS + warp;
    if (c >= pr.k) return;
    const u32* offs = p.offs + pr.koff;
    const u32 a = offs[c], b = offs[c + 1];
    if (a == b) return;
    const TacHead st = tac_head(pr.state, pr.lay, pr.head);
    const u32 dst = p.counts[pr.kwork + c];
    const u32* table = km_table(p, pr);
    double mu[TAC_MAX_D / 32];
    km_member_sum(p, pr, table, a, b, lane, mu);
    const double inv = 1.0 / (double)(b - a);
    double* mu_out = p.mu + (u64)(pr.kwork + c) * p.d;
#pragma unroll
    for (int t = 0; t < TAC_MAX_D / 32; t++) {
        const u32 j = lane + 32 * t;
        mu[t] = __dmul_rn(mu[t], inv);
        if (j < p.d) {
            mu_out[j] = mu[t];
            st.centroids[(u64)dst * p.d + j] = (float)mu[t];
        }
    }
    double tr = 0.0;
    for (u32 m = a; m < b; m++) {
        const bf16* row = tac_row(p.k, table, p.kv_heads, pr.head, p.d,
                                  pr.start + p.members[pr.work + m]);
        double q = 0.0;
#pragma unroll
        for (int t = 0; t < TAC_MAX_D / 32; t++) {
            const u32 j = lane + 32 * t;
            if (j < p.d) {
                const double dev = __dsub_rn((double)bf2f(row[j]), mu[t]);
                q = __dadd_rn(q, __dmul_rn(dev, dev));
            }
        }
        tr += warp_sum_f64(q);
    }
    if (lane == 0) {
        st.log_size[dst] = (float)log((double)(b - a));
        st.spread[dst] = (float)__dmul_rn(tr, inv);
    }
}

// The run's pooled within-cluster scatter, rows [r0, r0 + KM_SHAPE_ROWS):
// every member's deviation from its cluster's mean, outer product summed
// in f64 in (cluster, slot) order, the CPU's order, nothing fused. grid
// (D / KM_SHAPE_ROWS, problems), KM_SHAPE_THREADS threads, dynamic shared
// memory KM_SHAPE_STAGE x D doubles.
extern "C" __global__ void tactic_km_shape_bf16(const KmParams p) {
    const u32 pi = blockIdx.y;
    const KmProblem& pr = p.probs[pi];
    const u32 d = p.d, tid = threadIdx.x, r0 = blockIdx.x * KM_SHAPE_ROWS;
    extern __shared__ double km_dev[];  // [KM_SHAPE_STAGE][D]
    const u32* offs = p.offs + pr.koff;
    const u32* table = km_table(p, pr);
    const u32 entries = KM_SHAPE_ROWS * d;
    // Each thread owns entries tid, tid + 256, ...: at most 8 at D = 256.
    double acc[KM_SHAPE_ROWS * TAC_MAX_D / KM_SHAPE_THREADS];
#pragma unroll
    for (int t = 0; t < KM_SHAPE_ROWS * TAC_MAX_D / KM_SHAPE_THREADS; t++) acc[t] = 0.0;
    for (u32 c = 0; c < pr.k; c++) {
        const u32 a = offs[c], b = offs[c + 1];
        const double* mu = p.mu + (u64)(pr.kwork + c) * d;
        for (u32 m0 = a; m0 < b; m0 += KM_SHAPE_STAGE) {
            const u32 cnt = min((u32)KM_SHAPE_STAGE, b - m0);
            __syncthreads();
            for (u32 x = tid; x < cnt * d; x += blockDim.x) {
                const u32 mm = x / d, j = x % d;
                const bf16* row = tac_row(p.k, table, p.kv_heads, pr.head, d,
                                          pr.start + p.members[pr.work + m0 + mm]);
                km_dev[mm * d + j] = __dsub_rn((double)bf2f(row[j]), mu[j]);
            }
            __syncthreads();
#pragma unroll
            for (int t = 0; t < KM_SHAPE_ROWS * TAC_MAX_D / KM_SHAPE_THREADS; t++) {
                const u32 e = tid + KM_SHAPE_THREADS * t;
                if (e < entries) {
                    const u32 i = r0 + e / d, j = e % d;
                    for (u32 mm = 0; mm < cnt; mm++)
                        acc[t] = __dadd_rn(acc[t], __dmul_rn(km_dev[mm * d + i], km_dev[mm * d + j]));
                }
            }
        }
    }
    double* cov = p.cov + (u64)pi * d * d;
#pragma unroll
    for (int t = 0; t < KM_SHAPE_ROWS * TAC_MAX_D / KM_SHAPE_THREADS; t++) {
        const u32 e = tid + KM_SHAPE_THREADS * t;
        if (e < entries) cov[(u64)(r0 + e / d) * d + e % d] = acc[t];
    }
}

// The head's shape re-weighted with the run's scatter: unnormalise the old
// one by its trace, add, renormalise by the new trace (index.rs: append).
// grid (problems), KM_SHAPE_THREADS threads.
extern "C" __global__ void tactic_km_shape_norm_f64(const KmParams p) {
    const u32 pi = blockIdx.x;
    const KmProblem& pr = p.probs[pi];
    const TacHead st = tac_head(pr.state, pr.lay, pr.head);
    const u32 d = p.d;
    const double* cov = p.cov + (u64)pi * d * d;
    const double old = *st.trace;
    __shared__ double trace;
    if (threadIdx.x == 0) {
        double tr = 0.0;
        for (u32 i = 0; i < d; i++)
            tr = __dadd_rn(tr, __dadd_rn(__dmul_rn((double)st.shape[i * d + i], old), cov[i * d + i]));
        trace = tr;
    }
    __syncthreads();
    const double tr = trace;
    const double inv = tr > 0.0 ? 1.0 / tr : 0.0;
    for (u32 e = threadIdx.x; e < d * d; e += blockDim.x) {
        const double v = __dadd_rn(__dmul_rn((double)st.shape[e], old), cov[e]);
        st.shape[e] = (float)__dmul_rn(v, inv);
    }
    __syncthreads();
    if (threadIdx.x == 0) *st.trace = tr;
}
