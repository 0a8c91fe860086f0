// Row-wise and element-wise ops of the decoder. Activations are f32; a GEMM
// sees its f32 input as two bf16 halves (`split_bf16x2`). Names are
// `op_dtype` with the dtype of what the kernel writes.

struct EmbedParams {
    const bf16* table;  // [vocab, dim]
    const u32* tokens;  // [rows]
    float* out;         // [rows, dim]
    u32 rows;
    u32 dim;
};

// grid: rows.
extern "C" __global__ void embed_bf16(const EmbedParams p) {
    const bf16* src = p.table + (u64)p.tokens[blockIdx.x] * p.dim;
    float* dst = p.out + (u64)blockIdx.x * p.dim;
    for (u32 i = threadIdx.x; i < p.dim; i += blockDim.x) dst[i] = bf2f(src[i]);
}

struct RmsnormParams {
    const float* x;  // [rows, dim]
    const float* w;  // [dim]
    void* out;       // [rows, dim], bf16 or f32
    u32 rows;
    u32 dim;
    float eps;
};

// `x / sqrt(mean(x^2) + eps) * w`, as the CPU reference orders it. grid: rows.
template <bool BF16>
__device__ void rmsnorm_row(const RmsnormParams& p) {
    __shared__ float scratch[32];
    const u64 base = (u64)blockIdx.x * p.dim;
    const float* x = p.x + base;
    float s = 0.0f;
    for (u32 i = threadIdx.x; i < p.dim; i += blockDim.x) s += x[i] * x[i];
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

extern "C" __global__ void rmsnorm_bf16(const RmsnormParams p) { rmsnorm_row<true>(p); }
extern "C" __global__ void rmsnorm_f32(const RmsnormParams p) { rmsnorm_row<false>(p); }

struct AddParams {
    float* x;
    const float* y;
    u64 n;
};

// x += y.
extern "C" __global__ void add_f32(const AddParams p) {
    const u64 step = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += step) p.x[i] += p.y[i];
}

struct BiasParams {
    float* x;        // [n / cols, cols]
    const float* b;  // [cols]
    u64 n;
    u32 cols;
};

extern "C" __global__ void add_bias_f32(const BiasParams p) {
    const u64 step = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += step) p.x[i] += p.b[i % p.cols];
}

struct SiluParams {
    const float* gate_up;  // [rows, 2 * inter]: gate | up
    float* out;            // [rows, inter]
    u64 n;                 // rows * inter
    u32 inter;
};

extern "C" __global__ void silu_mul_f32(const SiluParams p) {
    const u64 step = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += step) {
        const u64 r = i / p.inter, c = i % p.inter;
        const float g = p.gate_up[r * 2 * p.inter + c];
        const float u = p.gate_up[r * 2 * p.inter + p.inter + c];
        p.out[i] = g / (1.0f + expf(-g)) * u;
    }
}

struct SplitParams {
    const float* x;  // [rows, cols]
    bf16* out;       // [2 * rows, cols]: hi rows, then lo rows
    u64 n;           // rows * cols
};

// f32 rows as two bf16 matrices, hi = bf16(x) and lo = bf16(x - hi) (x - hi
// is exact in f32), so that a bf16 GEMM of [hi; lo] summed over the halves
// sees the activation to ~2^-17 instead of bf16's 2^-9.
extern "C" __global__ void split_bf16x2(const SplitParams p) {
    const u64 step = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += step) {
        const float x = p.x[i];
        const bf16 hi = f2bf(x);
        p.out[i] = hi;
        p.out[p.n + i] = f2bf(__fsub_rn(x, bf2f(hi)));
    }
}

struct HalvesParams {
    const float* tmp;  // [2 * n]
    float* out;        // [n] = tmp[..n] + tmp[n..]
    u64 n;
};

extern "C" __global__ void sum_halves_f32(const HalvesParams p) {
    const u64 step = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += step) p.out[i] = p.tmp[i] + p.tmp[p.n + i];
}

struct GatherParams {
    const float* x;    // [.., cols]
    const u32* rows;   // [n]
    float* out;        // [n, cols]
    u32 n;
    u32 cols;
};

// grid: n.
extern "C" __global__ void gather_rows_f32(const GatherParams p) {
    const float* src = p.x + (u64)p.rows[blockIdx.x] * p.cols;
    float* dst = p.out + (u64)blockIdx.x * p.cols;
    for (u32 i = threadIdx.x; i < p.cols; i += blockDim.x) dst[i] = src[i];
}

struct CastParams {
    const float* x;
    bf16* out;
    u64 n;
};

extern "C" __global__ void cast_bf16(const CastParams p) {
    const u64 step = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += step) p.out[i] = f2bf(p.x[i]);
}
