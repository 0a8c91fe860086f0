// Tactic on the GPU (kernels/TACTIC.md, "The algorithm"): what the
// clustering (tactic/kmeans.cuh), the selection (tactic/select.cuh) and the
// sparse attention (tactic/sparse.cuh) share.
//
// A sequence's clusterings of one layer live in one allocation laid out by
// kernels/src/tactic/layout.rs (TacLayout below is its mirror): every KV
// head's centroids, sizes, spreads, CSR members and pooled shape, and the
// number of clusters k-means kept. Keys are read from the paged bf16 cache
// through the step's block tables, exactly as the attention kernel reads
// them.
//
// Where the CPU reference fixes an order of arithmetic (its 8-lane dot
// product, sums in slot order, f64 where it uses f64), these kernels repeat
// it with rounded intrinsics (__fmul_rn, __fadd_rn: nothing contracted into
// an FMA), so that the GPU's scores equal the CPU's bit for bit on the same
// bf16 keys and the two selections differ only where k-means' assignment
// step rounds differently (the CPU sums it in a GEMM).

#define TAC_MAX_GROUP 8
#define TAC_MAX_D 256

// kernels/src/tactic/layout.rs: StateLayout, field for field.
struct TacLayout {
    u32 kv_heads;
    u32 head_dim;
    u32 cap;        // clusters a head has room for
    u32 len;        // clustered slots; the tail starts here
    u64 count;      // [H] u32: clusters kept
    u64 trace;      // [H] f64: trace of the unnormalised pooled scatter
    u64 centroids;  // [H][cap][D] f32
    u64 log_size;   // [H][cap] f32
    u64 spread;     // [H][cap] f32
    u64 offsets;    // [H][cap + 1] u32
    u64 members;    // [H][len] u32
    u64 shape;      // [H][D][D] f32
    u64 bytes;
};

// Typed views of one head's arrays in a state at `base`.
struct TacHead {
    u32* count;
    double* trace;
    float* centroids;
    float* log_size;
    float* spread;
    u32* offsets;
    u32* members;
    float* shape;
};

__device__ __forceinline__ TacHead tac_head(u64 base, const TacLayout& l, u32 h) {
    char* b = reinterpret_cast<char*>(base);
    const u64 cap = l.cap, d = l.head_dim;
    TacHead t;
    t.count = reinterpret_cast<u32*>(b + l.count) + h;
    t.trace = reinterpret_cast<double*>(b + l.trace) + h;
    t.centroids = reinterpret_cast<float*>(b + l.centroids) + h * cap * d;
    t.log_size = reinterpret_cast<float*>(b + l.log_size) + h * cap;
    t.spread = reinterpret_cast<float*>(b + l.spread) + h * cap;
    t.offsets = reinterpret_cast<u32*>(b + l.offsets) + h * (cap + 1);
    t.members = reinterpret_cast<u32*>(b + l.members) + h * (u64)l.len;
    t.shape = reinterpret_cast<float*>(b + l.shape) + h * d * d;
    return t;
}

// Key row `slot` of KV head `head` of a sequence whose block table starts
// at `table` (the cache is [blocks, kv_heads, 16, D]).
__device__ __forceinline__ const bf16* tac_row(const bf16* cache, const u32* table, u32 kv_heads,
                                               u32 head, u32 d, u32 slot) {
    const u64 blk = table[slot / BLOCK_TOKENS];
    return cache + ((blk * kv_heads + head) * BLOCK_TOKENS + slot % BLOCK_TOKENS) * d;
}

// The CPU's `keys::dot` (kernels/src/tactic/keys.rs): eight accumulators,
// element j into accumulator j % 8, combined as ((0+4)+(1+5))+((2+6)+(3+7)).
// `a` is f32, `b` a bf16 row widened on the fly.
__device__ __forceinline__ float tac_dot8_bf16(const float* a, const bf16* b, u32 d) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (u32 j = 0; j < d; j += 8) {
        float x[8];
        unpack8(ld16(b + j), x);
#pragma unroll
        for (int i = 0; i < 8; i++) acc[i] = __fadd_rn(acc[i], __fmul_rn(a[j + i], x[i]));
    }
    return __fadd_rn(__fadd_rn(__fadd_rn(acc[0], acc[4]), __fadd_rn(acc[1], acc[5])),
                     __fadd_rn(__fadd_rn(acc[2], acc[6]), __fadd_rn(acc[3], acc[7])));
}

// The same over two f32 rows, `row` read 16 bytes at a time (16-byte
// aligned: a state's centroid and shape rows are). A product does not
// depend on the order of its factors, so the result is the same whichever
// of the two rows is the CPU's first argument.
__device__ __forceinline__ float tac_dot8(const float* a, const float* row, u32 d) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (u32 j = 0; j < d; j += 8) {
        const float4 x = *reinterpret_cast<const float4*>(row + j);
        const float4 y = *reinterpret_cast<const float4*>(row + j + 4);
        const float b[8] = {x.x, x.y, x.z, x.w, y.x, y.y, y.z, y.w};
#pragma unroll
        for (int i = 0; i < 8; i++) acc[i] = __fadd_rn(acc[i], __fmul_rn(a[j + i], b[i]));
    }
    return __fadd_rn(__fadd_rn(__fadd_rn(acc[0], acc[4]), __fadd_rn(acc[1], acc[5])),
                     __fadd_rn(__fadd_rn(acc[2], acc[6]), __fadd_rn(acc[3], acc[7])));
}

// f32 bits mapped so that unsigned order is Rust's `f32::total_cmp` order.
__device__ __forceinline__ u32 tac_ordered(float f) {
    const u32 b = __float_as_uint(f);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float tac_unordered(u32 o) {
    return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

// Sorts `n` keys (a power of two) ascending, bitonic, in `smem` (room for
// `smem_len` keys) when they fit, else in place in `keys` (global memory).
// Every thread of the block calls it.
__device__ void tac_sort_u64(u64* keys, u32 n, u64* smem, u32 smem_len) {
    const u32 tid = threadIdx.x, bd = blockDim.x;
    const bool shared = n <= smem_len;
    u64* a = shared ? smem : keys;
    if (shared) {
        for (u32 i = tid; i < n; i += bd) a[i] = keys[i];
        __syncthreads();
    }
    for (u32 k = 2; k <= n; k <<= 1) {
        for (u32 j = k >> 1; j > 0; j >>= 1) {
            for (u32 i = tid; i < n; i += bd) {
                const u32 o = i ^ j;
                if (o > i) {
                    const u64 x = a[i], y = a[o];
                    if ((x > y) == ((i & k) == 0)) {
                        a[i] = y;
                        a[o] = x;
                    }
                }
            }
            __syncthreads();
        }
    }
    if (shared)
        for (u32 i = tid; i < n; i += bd) keys[i] = a[i];
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block of f64 values in a fixed order; `scratch` holds 32
// doubles. Every thread gets the result. blockDim.x is a multiple of 32.
__device__ double block_sum_f64(double v, double* scratch) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    v = warp_sum_f64(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    double t = lane < nw ? scratch[lane] : 0.0;
    return warp_sum_f64(t);
}

// Exclusive prefix sum over the block of one u32 per thread; `scratch`
// holds 32 u32; returns the thread's prefix and writes the block's total.
__device__ u32 block_scan_u32(u32 v, u32* scratch, u32* total) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    u32 x = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u32 y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {
        u32 w = lane < nw ? scratch[lane] : 0;
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const u32 y = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += y;
        }
        if (lane < nw) scratch[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    const u32 before = warp > 0 ? scratch[warp - 1] : 0;
    *total = scratch[nw - 1];
    return before + x - v;
}
