// Row-wise and element-wise ops of the decoder. The residual stream and
// every GEMM output are f32; the inputs of GEMMs are bf16. Names are
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
    bf16* out;             // [rows, inter]
    u64 n;                 // rows * inter
    u32 inter;
};

extern "C" __global__ void silu_mul_bf16(const SiluParams p) {
    const u64 step = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += step) {
        const u64 r = i / p.inter, c = i % p.inter;
        const float g = p.gate_up[r * 2 * p.inter + c];
        const float u = p.gate_up[r * 2 * p.inter + p.inter + c];
        p.out[i] = f2bf(g / (1.0f + expf(-g)) * u);
    }
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
