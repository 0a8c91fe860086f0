// Token sampling, one CTA per logits row: the algorithm of
// kernels/src/cpu/sampling.rs without sorting the vocabulary.
//
// The CPU ranks tokens by (logit desc, id asc), cuts to top_k, then to the
// shortest prefix whose probability mass reaches top_p, and picks the first
// ranked token whose running mass exceeds u * kept. Each of those is "the
// first rank at which a running sum crosses X", which a radix select finds
// in four passes over the row: a 256-bucket histogram of the mass of the
// candidates whose order key matches the digits fixed so far, scanned from
// the top bucket down. Tokens with equal logits have equal mass, so the
// last step (ties, ranked by id) is arithmetic plus one ordered scan.
//
// Masses are integers, `sampling_exp(v / T - m) * 2^32` rounded, exactly
// as the CPU reference computes them (same f32 operations in the same
// order, nothing contracted), and histograms use integer atomics: the
// draw is deterministic and equals the CPU's bit for bit.
// Greedy is a plain arg-max (lowest id among ties, NaN never wins);
// log-probabilities are of the unscaled logits.

#define SAMPLE_THREADS 512
#define MAX_TOP 64
#define SAMPLING_STREAM 0x5a4d504c00000000ull

struct SampleRow {
    u64 seed;
    u64 position;
    float inv_temp;
    float top_p;
    u32 top_k;     // 0: no cut
    u32 logprobs;  // top log-probabilities to report, at most MAX_TOP
    u32 mode;      // 0: skip the row, 1: greedy, 2: sample
    u32 pad;
};

struct SampleOut {
    u32 token;
    float logprob;
    u32 n_top;
    u32 pad;
    u32 top_id[MAX_TOP];
    float top_lp[MAX_TOP];
};

struct SampleArgs {
    const float* logits;  // [rows, vocab]
    const SampleRow* params;
    SampleOut* out;
    u32 rows;
    u32 vocab;
};

// Rank order: larger key first, then lower id. `order_key` is monotone in
// the float's total order (the order of Rust's `f32::total_cmp`).
__device__ __forceinline__ u32 order_key(float v) {
    const u32 b = __float_as_uint(v);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_value(u32 k) {
    return __uint_as_float((k & 0x80000000u) ? (k ^ 0x80000000u) : ~k);
}

// Every token ranked at or before (key, idx).
struct Limit {
    u32 key;
    u32 idx;
};

__device__ __forceinline__ bool within(u32 key, u32 i, Limit lim) {
    return key > lim.key || (key == lim.key && i <= lim.idx);
}

// What a select found: the crossing token and the mass up to and including it.
struct Pick {
    u32 key;
    u32 idx;
    u64 through;
};

struct Shared {
    u64 mass[256];
    u32 cnt[256];
    u64 u64s[32];
    u32 u32s[32];
    float f32s[32];
    u64 above;
    u32 bucket;
    u32 ntie;
    u32 found;
    u32 top_n;
    u32 top_key[MAX_TOP];
    u32 top_idx[MAX_TOP];
};

// How a token weighs in a select: 1 (counting ranks) or its unnormalised
// probability exp(v / T - m) in fixed point.
struct Weight {
    bool count;
    float inv_t;
    float m;
};

// The twin of `cpu::sampling::sampling_exp`: exp(x) for x <= 0 by Cody-Waite
// reduction, a degree-6 polynomial and scaling by 2^n, every step rounded
// as on the host.
__device__ __forceinline__ float sampling_exp(float x) {
    if (x != x) return x;
    if (x < -104.0f) return 0.0f;
    const float ln2_hi = __uint_as_float(0x3f317200u), ln2_lo = __uint_as_float(0x35bfbe8eu);
    const float n = rintf(__fmul_rn(x, __uint_as_float(0x3fb8aa3bu)));
    const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(n, ln2_hi)), __fmul_rn(n, ln2_lo));
    const u32 coeffs[6] = {0x3c088889u, 0x3d2aaaabu, 0x3e2aaaabu, 0x3f000000u, 0x3f800000u, 0x3f800000u};
    float p = __uint_as_float(0x3ab60b61u);
#pragma unroll
    for (int i = 0; i < 6; i++) p = __fadd_rn(__fmul_rn(p, r), __uint_as_float(coeffs[i]));
    const int ni = (int)n;
    if (ni >= -126) return __fmul_rn(p, __uint_as_float((u32)(ni + 127) << 23));
    return __fmul_rn(__fmul_rn(p, __uint_as_float((u32)(ni + 64 + 127) << 23)), __uint_as_float((u32)(127 - 64) << 23));
}

__device__ __forceinline__ u64 weigh(float v, Weight w) {
    if (w.count) return 1;
    const float pr = sampling_exp(__fsub_rn(__fmul_rn(v, w.inv_t), w.m));
    return __float2ull_rn(__fmul_rn(pr, 4294967296.0f));
}

__device__ u64 block_sum_u64(u64 v, Shared& sh) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) sh.u64s[warp] = v;
    __syncthreads();
    u64 t = lane < nw ? sh.u64s[lane] : 0;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    return t;
}

// Exclusive prefix sum over the block in thread order.
__device__ u32 block_exclusive_scan(u32 v, Shared& sh) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    u32 incl = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u32 t = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += t;
    }
    __syncthreads();
    if (lane == 31) sh.u32s[warp] = incl;
    __syncthreads();
    u32 before = 0;
    for (int w = 0; w < warp && w < nw; w++) before += sh.u32s[w];
    return before + incl - v;
}

// Thread 0: the first bucket (from the top) at which the running mass,
// starting at `above`, crosses X; falls back to the lowest non-empty one.
__device__ void pick_bucket(Shared& sh, u64 above, u64 x, bool strict) {
    u64 cum = above;
    int last = -1;
    u64 cum_last = above;
    for (int b = 255; b >= 0; b--) {
        if (sh.cnt[b] == 0) continue;
        const u64 next = cum + sh.mass[b];
        if (strict ? next > x : next >= x) {
            sh.bucket = b;
            sh.above = cum;
            sh.ntie = sh.cnt[b];
            return;
        }
        last = b;
        cum_last = cum;
        cum = next;
    }
    sh.bucket = last < 0 ? 0 : last;
    sh.above = cum_last;
    sh.ntie = last < 0 ? 0 : sh.cnt[last];
}

// The c-th (1-based) token, in id order, whose key is `key` within `lim`.
__device__ u32 nth_tie(const float* x, u32 n, u32 key, Limit lim, u32 c, Shared& sh) {
    const u32 per = (n + blockDim.x - 1) / blockDim.x;
    const u32 lo = min(n, threadIdx.x * per), hi = min(n, lo + per);
    u32 mine = 0;
    for (u32 i = lo; i < hi; i++) {
        const u32 k = order_key(x[i]);
        mine += (k == key && within(k, i, lim));
    }
    const u32 before = block_exclusive_scan(mine, sh);
    if (threadIdx.x == 0) sh.found = lim.idx;
    __syncthreads();
    if (c - 1 >= before && c - 1 < before + mine) {
        u32 seen = before;
        for (u32 i = lo; i < hi; i++) {
            const u32 k = order_key(x[i]);
            if (k == key && within(k, i, lim)) {
                if (seen == c - 1) {
                    sh.found = i;
                    break;
                }
                seen++;
            }
        }
    }
    __syncthreads();
    return sh.found;
}

// The first rank (within `lim`) at which the running weight crosses X:
// `>= X`, or `> X` when `strict`.
__device__ Pick select_rank(const float* x, u32 n, Limit lim, Weight w, u64 X, bool strict, Shared& sh) {
    u32 prefix = 0, mask = 0;
    u64 above = 0;
    for (int pass = 0; pass < 4; pass++) {
        const int shift = 24 - 8 * pass;
        for (int b = threadIdx.x; b < 256; b += blockDim.x) {
            sh.mass[b] = 0;
            sh.cnt[b] = 0;
        }
        __syncthreads();
        for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
            const float v = x[i];
            const u32 k = order_key(v);
            if ((k & mask) == prefix && within(k, i, lim)) {
                const u32 b = (k >> shift) & 255u;
                atomicAdd(&sh.mass[b], weigh(v, w));
                atomicAdd(&sh.cnt[b], 1u);
            }
        }
        __syncthreads();
        if (threadIdx.x == 0) pick_bucket(sh, above, X, strict);
        __syncthreads();
        prefix |= sh.bucket << shift;
        mask |= 255u << shift;
        above = sh.above;
    }
    const u32 ntie = sh.ntie;
    const u64 q = weigh(key_value(prefix), w);
    // Smallest c in [1, ntie] with above + c*q crossing X.
    u64 c = 1;
    const u64 need = strict ? (X >= above ? X - above + 1 : 0) : (X > above ? X - above : 0);
    if (need > 0) c = q > 0 ? (need + q - 1) / q : ntie;
    c = max((u64)1, min(c, (u64)max(ntie, 1u)));
    Pick r;
    r.key = prefix;
    r.idx = nth_tie(x, n, prefix, lim, (u32)c, sh);
    r.through = above + c * q;
    return r;
}

// Arg-max (lowest id among equals, NaN never wins) and log-sum-exp.
__device__ void row_stats(const float* x, u32 n, Shared& sh, u32& arg, float& vmax, float& lse) {
    float bv = NEG_INF;
    u32 bi = 0;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = x[i];
        if (v > bv) {
            bv = v;
            bi = i;
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const u32 oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > bv || (ov == bv && oi < bi)) {
            bv = ov;
            bi = oi;
        }
    }
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    __syncthreads();
    if (lane == 0) {
        sh.f32s[warp] = bv;
        sh.u32s[warp] = bi;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < nw; w++) {
            if (sh.f32s[w] > bv || (sh.f32s[w] == bv && sh.u32s[w] < bi)) {
                bv = sh.f32s[w];
                bi = sh.u32s[w];
            }
        }
        sh.found = bi;
        sh.f32s[0] = bv;
    }
    __syncthreads();
    arg = sh.found;
    vmax = sh.f32s[0];
    float s = 0.0f;
    if (vmax != NEG_INF)
        for (u32 i = threadIdx.x; i < n; i += blockDim.x) s += expf(x[i] - vmax);
    s = block_sum(s, sh.f32s);
    lse = vmax == NEG_INF ? NEG_INF : vmax + logf(s);
}

// Temperature, top-k, top-p and a seeded draw.
__device__ u32 draw(const float* x, u32 n, const SampleRow& rp, float vmax, Shared& sh) {
    const Limit all = {0u, 0xffffffffu};
    Limit lim = all;
    if (rp.top_k > 0 && rp.top_k < n) {
        const Weight cw = {true, 0.0f, 0.0f};
        const Pick pk = select_rank(x, n, all, cw, rp.top_k, false, sh);
        lim.key = pk.key;
        lim.idx = pk.idx;
    }
    const Weight w = {false, rp.inv_temp, __fmul_rn(vmax, rp.inv_temp)};
    u64 z = 0;
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = x[i];
        if (within(order_key(v), i, lim)) z += weigh(v, w);
    }
    z = block_sum_u64(z, sh);
    const double top_p = fmin(fmax((double)rp.top_p, 0.0), 1.0);
    const u64 target = (u64)ceil(top_p * (double)z);
    const Pick pn = select_rank(x, n, lim, w, target, false, sh);
    lim.key = pn.key;
    lim.idx = pn.idx;
    const u64 kept = pn.through;
    // u * kept with u = u24 / 2^24, exactly: (u24 * kept) >> 24 over 128 bits.
    const u64 u24 = rng_bits(rp.seed, SAMPLING_STREAM, rp.position) >> 40;
    const u64 lo = u24 * kept, hi = __umul64hi(u24, kept);
    const u64 uk = (hi << 40) | (lo >> 24);
    return select_rank(x, n, lim, w, uk, true, sh).idx;
}

// The `count` best tokens, best first, as (id, logit - lse).
__device__ void top_logprobs(const float* x, u32 n, u32 count, float lse, SampleOut* o, Shared& sh) {
    const Limit all = {0u, 0xffffffffu};
    const Weight cw = {true, 0.0f, 0.0f};
    const Pick pl = select_rank(x, n, all, cw, count, false, sh);
    const Limit lim = {pl.key, pl.idx};
    if (threadIdx.x == 0) sh.top_n = 0;
    __syncthreads();
    for (u32 i = threadIdx.x; i < n; i += blockDim.x) {
        const u32 k = order_key(x[i]);
        if (within(k, i, lim)) {
            const u32 slot = atomicAdd(&sh.top_n, 1u);
            if (slot < MAX_TOP) {
                sh.top_key[slot] = k;
                sh.top_idx[slot] = i;
            }
        }
    }
    __syncthreads();
    // Exactly `count` tokens are within the limit; `got` only guards memory.
    const u32 got = min(sh.top_n, count);
    if (threadIdx.x == 0) o->n_top = got;
    if (threadIdx.x < got) {
        const u32 k = sh.top_key[threadIdx.x], id = sh.top_idx[threadIdx.x];
        u32 rank = 0;
        for (u32 j = 0; j < got; j++) {
            const u32 kj = sh.top_key[j], ij = sh.top_idx[j];
            rank += (kj > k || (kj == k && ij < id));
        }
        o->top_id[rank] = id;
        o->top_lp[rank] = x[id] - lse;
    }
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_f32(const SampleArgs a) {
    __shared__ Shared sh;
    const SampleRow rp = a.params[blockIdx.x];
    if (rp.mode == 0) return;
    const float* x = a.logits + (u64)blockIdx.x * a.vocab;
    const u32 n = a.vocab;
    SampleOut* o = a.out + blockIdx.x;
    u32 arg;
    float vmax, lse;
    row_stats(x, n, sh, arg, vmax, lse);
    const u32 token = rp.mode == 1 ? arg : draw(x, n, rp, vmax, sh);
    const u32 count = min(min(rp.logprobs, (u32)MAX_TOP), n);
    if (count > 0) {
        top_logprobs(x, n, count, lse, o, sh);
    } else if (threadIdx.x == 0) {
        o->n_top = 0;
    }
    if (threadIdx.x == 0) {
        o->token = token;
        o->logprob = x[token] - lse;
    }
}
