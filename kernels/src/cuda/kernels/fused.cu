// Fused row-wise ops: each does in one launch what two launches of the
// unfused path do, with the same arithmetic in the same order (the same
// thread count, stride loops and `_rn` products), so that an f32 result is
// bit-identical to the composition. Rows are addressed from the pointers
// the host passes (already offset to the first row of the range), so one
// launch covers any range of rows. Names are `op_dtype` with the dtype of
// what the kernel writes.

struct AddRmsnormParams {
    float* x;        // [rows, dim]: the residual stream, x += y in place
    const float* y;  // [rows, dim]
    const float* w;  // [dim]
    void* out;       // [rows, dim]: rmsnorm(x + y), bf16 or f32
    u32 dim;
    float eps;
};

// `x += y; out = x / sqrt(mean(x^2) + eps) * w`, as `add_f32` then
// `rmsnorm_*` compute it. A thread reads back only the elements it wrote.
// grid: rows; block: 256.
template <bool BF16>
__device__ void add_rmsnorm_row(const AddRmsnormParams& p) {
    __shared__ float scratch[32];
    const u64 base = (u64)blockIdx.x * p.dim;
    float* x = p.x + base;
    const float* y = p.y + base;
    float s = 0.0f;
    for (u32 i = threadIdx.x; i < p.dim; i += blockDim.x) {
        const float v = x[i] + y[i];
        x[i] = v;
        s += v * v;
    }
    s = block_sum(s, scratch);
    const float r = 1.0f / sqrtf(s / (float)p.dim + p.eps);
    for (u32 i = threadIdx.x; i < p.dim; i += blockDim.x) {
        const float o = p.w[i] * (x[i] * r);
        if (BF16) {
            ((bf16*)p.out)[base + i] = f2bf(o);
        } else {
            ((float*)p.out)[base + i] = o;
        }
    }
}

extern "C" __global__ void add_rmsnorm_bf16(const AddRmsnormParams p) { add_rmsnorm_row<true>(p); }
extern "C" __global__ void add_rmsnorm_f32(const AddRmsnormParams p) { add_rmsnorm_row<false>(p); }

struct RopeKvParams {
    float* qkv;             // [rows, row_stride]: q | k | v heads from column 0
    const u32* positions;   // [rows]
    const u32* slots;       // [rows]: block * 16 + offset
    const float* inv_freq;  // [head_dim / 2]
    bf16* k;                // this layer's K, [num_blocks, kv_heads, 16, head_dim]
    bf16* v;
    u32 row_stride;
    u32 heads;              // query heads; kv_heads k heads follow them
    u32 kv_heads;
    u32 head_dim;
};

// `rope_f32` over the q and k heads of a row, then `kv_append_bf16` of its
// k and v: the rotated k goes to the cache from the registers that hold it
// (each thread writes the two elements of the pairs it rotated), v is
// copied. grid: rows; block: 256.
extern "C" __global__ void rope_kv_append_bf16(const RopeKvParams p) {
    const u32 half = p.head_dim / 2;
    const float pos = (float)p.positions[blockIdx.x];
    const u32 slot = p.slots[blockIdx.x];
    const u64 blk = slot / BLOCK_TOKENS, off = slot % BLOCK_TOKENS;
    float* row = p.qkv + (u64)blockIdx.x * p.row_stride;
    for (u32 i = threadIdx.x; i < (p.heads + p.kv_heads) * half; i += blockDim.x) {
        const u32 h = i / half, j = i % half;
        float s, c;
        sincosf(__fmul_rn(pos, p.inv_freq[j]), &s, &c);
        float* x = row + h * p.head_dim;
        const float lo = x[j], hi = x[j + half];
        const float a = __fsub_rn(__fmul_rn(lo, c), __fmul_rn(hi, s));
        const float b = __fadd_rn(__fmul_rn(hi, c), __fmul_rn(lo, s));
        x[j] = a;
        x[j + half] = b;
        if (h >= p.heads) {
            const u64 dst = ((blk * p.kv_heads + (h - p.heads)) * BLOCK_TOKENS + off) * p.head_dim;
            p.k[dst + j] = f2bf(a);
            p.k[dst + j + half] = f2bf(b);
        }
    }
    const u32 kvd = p.kv_heads * p.head_dim;
    const float* src = row + (p.heads + p.kv_heads) * p.head_dim;
    for (u32 i = threadIdx.x; i < kvd; i += blockDim.x) {
        const u32 h = i / p.head_dim, d = i % p.head_dim;
        p.v[((blk * p.kv_heads + h) * BLOCK_TOKENS + off) * p.head_dim + d] = f2bf(src[i]);
    }
}

struct SiluBf16Params {
    const float* gate_up;  // [rows, 2 * inter]: gate | up
    bf16* out;             // [rows, inter]
    u64 n;                 // rows * inter
    u32 inter;
};

// SwiGLU as `silu_mul_f32` computes it, rounded once to bf16: the input of
// the down projection's GEMM in bf16 activation mode.
extern "C" __global__ void silu_mul_bf16(const SiluBf16Params p) {
    const u64 step = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += step) {
        const u64 r = i / p.inter, c = i % p.inter;
        const float g = p.gate_up[r * 2 * p.inter + c];
        const float u = p.gate_up[r * 2 * p.inter + p.inter + c];
        p.out[i] = f2bf(g / (1.0f + expf(-g)) * u);
    }
}
