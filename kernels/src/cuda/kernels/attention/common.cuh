// Paged attention over the bf16 KV cache, for decode tokens and prefill
// chunks alike: what every key loop shares (kernels/ATTENTION.md has the
// design, its reasons and the measurements). The key loops are
// attention/simt.cuh and attention/frag.cuh; attention.cu instantiates the
// daemon's kernels from them.
//
// One CTA = one query row x one group of G query heads that share a KV head
// x one split of that row's visible keys. K and V rows are read once per
// CTA for all G heads (GQA).
//
// Causality is a per-row key count: a row sees keys [0, kv_len), which
// covers decode tokens and prefill chunks on top of an existing context.
//
// Splits (few rows, long contexts): every CTA of a (row, head group)
// writes an unnormalised partial (acc, max, sum) and counts it. With many
// splits in a cooperative launch every CTA waits for the count and merges
// a slice of the output (merge_cooperative); otherwise the LAST one to
// finish merges them all (an atomic counter per (row, head group), reset
// by that CTA). Either way no second launch is needed, and the summation
// order does not depend on timing.

#define ATT_THREADS 128
// Pages of the block table one CTA stages (4 KiB); the planner splits
// longer contexts.
#define MAX_SPLIT_PAGES 1024
// Most splits of a row the last-CTA merge takes (attention.rs: MAX_SPLITS):
// its weights fill the merge area, G x ATT_THREADS x 8 floats.
#define MERGE_MAX_SPLITS 1024

struct AttnParams {
    const float* qkv;      // [rows, qkv_stride] f32; query head h at columns h*D
    const bf16* k;         // this layer's K: [num_blocks, kv_heads, 16, D]
    const bf16* v;
    const u32* kv_len;     // [rows]: keys row r sees
    const u32* table_off;  // [rows]: start of row r's block table in `tables`
    const u32* tables;
    float* out;            // [rows, num_heads * D]
    float* part_acc;       // [rows, num_heads, splits, D]
    float* part_ml;        // [rows, num_heads, splits, 2]
    u32* counters;         // [rows, kv_heads * chunks, 2]: the cooperative merge's (a multiple of
                           // COOP_EPOCH between launches), the last-CTA merge's (zero between launches)
    u32 rows;
    u32 qkv_stride;
    u32 num_heads;
    u32 kv_heads;
    u32 group;             // query heads per KV head
    u32 chunks;            // group / G: CTAs per KV head
    u32 pages_per_split;
    u32 splits;
    u32 head_major;        // CTA order: the head groups of a row adjacent
    float scale_log2;
    u32 coop;              // splits merged by all CTAs (cooperative launch only)
    u32 long_splits;       // splits [0, long_splits) have pages_per_split pages, the rest one fewer
    u64* timeline;         // timeline variants: 8 timestamps per CTA (or null)
};

// The keys [t_begin, t_end) of split s of a row with kv_len keys: the first
// long_splits splits have pages_per_split pages, the others one fewer (so
// that any number of splits covers the pages with no CTA more than a page
// longer than another).
__device__ __forceinline__ void split_keys(const AttnParams& p, u32 s, u32 kv_len, u32& t_begin, u32& t_end) {
    const u32 first = s * p.pages_per_split - (s > p.long_splits ? s - p.long_splits : 0);
    const u32 count = s < p.long_splits ? p.pages_per_split : p.pages_per_split - 1;
    t_begin = first * BLOCK_TOKENS;
    t_end = min(kv_len, t_begin + count * BLOCK_TOKENS);
}

// Which row, head group and split a CTA computes (launch order: a row's
// head groups adjacent when p.head_major, else a head group's rows).
struct CtaJob {
    u32 ny;     // head groups per row
    u32 row;
    u32 yi;     // head group: KV head kvh, query heads h0 .. h0 + G
    u32 kvh;
    u32 h0;
    u32 split;
};

template <int G>
__device__ __forceinline__ CtaJob cta_job(const AttnParams& p) {
    CtaJob j;
    j.ny = gridDim.x / p.rows;
    j.row = p.head_major ? blockIdx.x / j.ny : blockIdx.x % p.rows;
    j.yi = p.head_major ? blockIdx.x % j.ny : blockIdx.x / p.rows;
    j.kvh = j.yi / p.chunks;
    j.h0 = j.kvh * p.group + (j.yi % p.chunks) * G;
    j.split = blockIdx.z;
    return j;
}

// The number of keys of split `split` of a row (kv_len keys, block table
// at toff), whose slice of the block table the CTA's NT threads stage in
// `pages` (a barrier follows).
template <int NT>
__device__ __forceinline__ u32 stage_split(const AttnParams& p, u32 split, u32 kv_len, u32 toff, u32* pages) {
    u32 t_begin, t_end;
    split_keys(p, split, kv_len, t_begin, t_end);
    const u32 n_keys = t_end > t_begin ? t_end - t_begin : 0;
    const u32 n_pages = (n_keys + BLOCK_TOKENS - 1) / BLOCK_TOKENS;
    for (u32 i = threadIdx.x; i < n_pages; i += NT) pages[i] = p.tables[toff + t_begin / BLOCK_TOKENS + i];
    __syncthreads();
    return n_keys;
}

// Timeline variants (benchmarks only): thread 0 of each CTA records the
// global timer (ns) at the points of TL_* into p.timeline[cta * 8 + point],
// and its SM in slot 7.
#define TL_ENTRY 0
#define TL_LOOP 1       // the table slice staged, the key loop starts
#define TL_LOOP_END 2
#define TL_PUBLISHED 3  // the partial written and counted
#define TL_MERGE 4      // the merge starts (cooperative: every split arrived)
#define TL_EXIT 5
#define TL_ALL_LOOPS 6  // every warp of the CTA is out of the key loop

__device__ __forceinline__ void tl_mark(u64* tl, int point) {
    if (tl != nullptr && threadIdx.x == 0) {
        u64 t;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
        tl[point] = t;
        if (point == TL_ENTRY) {
            u32 sm;
            asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
            tl[7] = sm;
        }
    }
}

__device__ __forceinline__ u32 shared_addr(const void* p) {
    u32 a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void cp_async16(u32 dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// Loads that bypass L1: partials written by other CTAs of this launch.
__device__ __forceinline__ float ldcg(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}

__device__ __forceinline__ float4 ldcg4(const float* p) {
    float4 v;
    asm volatile("ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p));
    return v;
}

// Dynamic shared memory of one CTA: the ring (later the row-group merge and
// the split weights), then the block-table slice (later the row groups'
// max and sum). Mirrored by `attention_smem_bytes` in sources.rs.
// How the key loop loads K and V (sources.rs: `AttnLoad`).
#define LOAD_RING 0      // cp.async into a per-thread P-stage shared-memory ring
#define LOAD_DIRECT 1    // LDG.128 straight into registers, then compute (the first kernel's way)
#define LOAD_PREFETCH 2  // LDG.128 into registers, one stage ahead of the compute

template <int G, int U, int P, int MODE>
struct AttnSmem {
    static constexpr int RING = MODE == LOAD_RING ? P * U * 2 * ATT_THREADS * 16 : 0;
    static constexpr int MERGE = G * ATT_THREADS * 8 * 4;
    static constexpr int A = RING > MERGE ? RING : MERGE;
    static constexpr int BYTES = A + MAX_SPLIT_PAGES * 4;
    static_assert(A >= G * MERGE_MAX_SPLITS * 4, "the last-CTA merge's weights fit before the table slice");
};

// The last CTA of a (row, head group) combines every split's partial:
// M = max m_s, L = sum l_s 2^(m_s - M), out = sum acc_s 2^(m_s - M) / L.
// Splits that saw no key carry m = -inf, l = 0, acc = 0.
template <int D, int G, int NT>
__device__ void merge_splits(const AttnParams& p, u32 row, u32 h0, float* sm_w, float* sm_L) {
    const u32 S = gridDim.z;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    for (int g = warp; g < G; g += NT / 32) {
        const u64 base = ((u64)row * p.num_heads + h0 + g) * S;
        float mx = NEG_INF;
        for (u32 s = lane; s < S; s += 32) mx = fmaxf(mx, ldcg(p.part_ml + 2 * (base + s)));
        mx = warp_max(mx);
        float l = 0.0f;
        for (u32 s = lane; s < S; s += 32) {
            const float ms = ldcg(p.part_ml + 2 * (base + s));
            const float w = ms == NEG_INF ? 0.0f : exp2f(ms - mx);
            sm_w[g * S + s] = w;
            l += w * ldcg(p.part_ml + 2 * (base + s) + 1);
        }
        l = warp_sum(l);
        if (lane == 0) sm_L[g] = l;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < G * D / 4; i += NT) {
        const int g = i / (D / 4), d = (i % (D / 4)) * 4;
        const u32 h = h0 + g;
        const float* acc = p.part_acc + ((u64)row * p.num_heads + h) * S * D + d;
        float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll 16
        for (u32 s = 0; s < S; s++) {
            const float w = sm_w[g * S + s];
            const float4 x = ldcg4(acc + (u64)s * D);
            a.x += w * x.x;
            a.y += w * x.y;
            a.z += w * x.z;
            a.w += w * x.w;
        }
        const float L = sm_L[g];
        const float r = L > 0.0f ? 1.0f / L : 0.0f;
        *(float4*)(p.out + (u64)row * p.num_heads * D + h * D + d) = make_float4(a.x * r, a.y * r, a.z * r, a.w * r);
    }
}

// Most splits the cooperative merge takes: 8 per lane.
#define COOP_MAX_SPLITS 256  // at most COOP_EPOCH

// The cooperative merge (a cooperative launch: every CTA of the grid is
// resident, so a CTA may wait for the others). Every CTA of a (row, head
// group) publishes its partial, waits until all S have, then merges its
// share of the output: float4 items split, split + S, ..., one per warp,
// each a weighted sum over the S partials that the warp's lanes load at
// once (one round of loads) and sum in a fixed order (lane-local, then a
// butterfly), so the bits do not depend on timing.
//
// The counter is never reset: the S CTAs of a launch add COOP_EPOCH in all
// (split s adds its share), so it rests at a multiple of COOP_EPOCH between
// launches, whatever their split counts, and each CTA reads its launch's
// target off the value its own addition returns (wrapping is harmless:
// 2^32 is a multiple of COOP_EPOCH). The last CTA to add sees the target at
// once; the others poll.
#define COOP_EPOCH 1024u
template <int D, int G, int NT>
__device__ void merge_cooperative(const AttnParams& p, u32 row, u32 yi, u32 ny, u32 h0, u32 split, u64* tl) {
    const u32 S = gridDim.z;
    u32* arrived = p.counters + 2 * ((u64)row * ny + yi);
    __syncthreads();  // every thread's piece of the partial is written
    if (threadIdx.x == 0) {
        const u32 add = COOP_EPOCH / S + (split < COOP_EPOCH % S ? 1u : 0u);
        u32 n;
        // Release (cumulative over the barrier): the partial before the count.
        asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], %2;" : "=r"(n) : "l"(arrived), "r"(add) : "memory");
        tl_mark(tl, TL_PUBLISHED);
        const u32 target = (n & ~(COOP_EPOCH - 1)) + COOP_EPOCH;
        n += add;
        while ((int)(n - target) < 0) {
            __nanosleep(32);
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(n) : "l"(arrived) : "memory");
        }
        tl_mark(tl, TL_MERGE);
    }
    __syncthreads();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    constexpr u32 ITEMS = G * D / 4;
    constexpr int PER_LANE = COOP_MAX_SPLITS / 32;
    for (u32 i = split + warp * S; i < ITEMS; i += (NT / 32) * S) {
        const u32 g = i / (D / 4), d = (i % (D / 4)) * 4;
        const u64 base = ((u64)row * p.num_heads + h0 + g) * S;
        float ms[PER_LANE], ls[PER_LANE];
        float4 as[PER_LANE];
#pragma unroll
        for (int k = 0; k < PER_LANE; k++) {
            const u32 sp = lane + 32 * k;
            ms[k] = NEG_INF;
            ls[k] = 0.0f;
            as[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
            if (sp < S) {
                ms[k] = ldcg(p.part_ml + 2 * (base + sp));
                ls[k] = ldcg(p.part_ml + 2 * (base + sp) + 1);
                as[k] = ldcg4(p.part_acc + (base + sp) * D + d);
            }
        }
        float mx = NEG_INF;
#pragma unroll
        for (int k = 0; k < PER_LANE; k++) mx = fmaxf(mx, ms[k]);
        mx = warp_max(mx);
        float l = 0.0f;
        float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
        for (int k = 0; k < PER_LANE; k++) {
            const float w = ms[k] == NEG_INF ? 0.0f : exp2f(ms[k] - mx);
            l += w * ls[k];
            a.x += w * as[k].x;
            a.y += w * as[k].y;
            a.z += w * as[k].z;
            a.w += w * as[k].w;
        }
        l = warp_sum(l);
        a.x = warp_sum(a.x);
        a.y = warp_sum(a.y);
        a.z = warp_sum(a.z);
        a.w = warp_sum(a.w);
        if (lane == 0) {
            const float r = l > 0.0f ? 1.0f / l : 0.0f;
            *(float4*)(p.out + (u64)row * p.num_heads * D + (h0 + g) * D + d) =
                make_float4(a.x * r, a.y * r, a.z * r, a.w * r);
        }
    }
}

// The end of a CTA: the NR row groups' partial results, in shared memory
// as sm_acc [G][NR * D] (each relative to its own max), sm_m and sm_l
// [NR][G], are summed, one float4 item (head g, dims d..d+4) per thread at
// a time, each row group rescaled to the CTA's max of the head on the way;
// with one split the output is written, else the CTA's partial, which the
// cooperative merge or the last CTA of the (row, head group) merges. NT:
// threads of the CTA.
template <int D, int G, int NR, int NT = ATT_THREADS>
__device__ __forceinline__ void combine_rows(const AttnParams& p, u32 row, u32 yi, u32 ny, u32 h0, u32 split,
                                             unsigned char* smem, const float* sm_m, u64* tl = nullptr) {
    __shared__ int sm_last;
    constexpr u32 ITEMS = G * D / 4;
    const float* sm_acc = (const float*)smem;
    const float* sm_l = sm_m + NR * G;
    const int tid = threadIdx.x;
    const u32 S = gridDim.z;
    for (u32 i = tid; i < ITEMS; i += NT) {
        const u32 g = i / (D / 4), d = (i % (D / 4)) * 4;
        float mm = NEG_INF;
#pragma unroll
        for (int r = 0; r < NR; r++) mm = fmaxf(mm, sm_m[r * G + g]);
        float ll = 0.0f;
        float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
        for (int r = 0; r < NR; r++) {
            const float mr = sm_m[r * G + g];
            if (mr == NEG_INF) continue;  // saw no key: nothing to add
            const float f = exp2f(mr - mm);
            const float4 x = *(const float4*)(sm_acc + g * NR * D + r * D + d);
            ll += sm_l[r * G + g] * f;
            a.x += x.x * f;
            a.y += x.y * f;
            a.z += x.z * f;
            a.w += x.w * f;
        }
        const u32 h = h0 + g;
        if (S == 1) {
            const float rl = ll > 0.0f ? 1.0f / ll : 0.0f;
            *(float4*)(p.out + (u64)row * p.num_heads * D + h * D + d) = make_float4(a.x * rl, a.y * rl, a.z * rl, a.w * rl);
        } else {
            const u64 idx = ((u64)row * p.num_heads + h) * S + split;
            *(float4*)(p.part_acc + idx * D + d) = a;
            if (d == 0) {
                p.part_ml[2 * idx] = mm;
                p.part_ml[2 * idx + 1] = ll;
            }
        }
    }
    if (S == 1) return;
    if (p.coop) {
        merge_cooperative<D, G, NT>(p, row, yi, ny, h0, split, tl);
        return;
    }

    // The last CTA of this (row, head group) merges (threadFenceReduction:
    // publish the partial, count, and the one that completes the count
    // reads everyone's partial from L2).
    __threadfence();
    __syncthreads();
    u32* counter = p.counters + 2 * ((u64)row * ny + yi) + 1;  // [0] is the cooperative merge's
    if (tid == 0) sm_last = atomicAdd(counter, 1u) == S - 1;
    tl_mark(tl, TL_PUBLISHED);
    __syncthreads();
    if (!sm_last) return;
    __threadfence();
    tl_mark(tl, TL_MERGE);
    if (tid == 0) *counter = 0;  // ready for the next launch
    // Weights: G x S <= G x MERGE_MAX_SPLITS floats from the start (the
    // ring or merge area, at least that large); the G sums after them.
    merge_splits<D, G, NT>(p, row, h0, (float*)smem, (float*)smem + G * MERGE_MAX_SPLITS);
}

