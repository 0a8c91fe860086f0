// Seeded random weights, bit-identical to `tacflow_kernels::rng::random_weight`
// followed by the `half` crate's f32 -> bf16 rounding, so that a large random
// model is generated on the GPU with no host copy and the CPU regenerates the
// very same values. Every step is `_rn` so NVRTC cannot contract the
// multiply-add into an FMA (the host evaluates it as two rounded steps).

struct RandomParams {
    bf16* out;
    u64 n;
    u64 seed;
    u64 stream;
    float scale;  // std * sqrt(3), computed on the host in f32
    float mean;
};

extern "C" __global__ void random_bf16(const RandomParams p) {
    const u64 step = (u64)gridDim.x * blockDim.x;
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < p.n; i += step) {
        const float u = uniform01(p.seed, p.stream, i);
        const float w = __fadd_rn(__fmul_rn(__fsub_rn(__fmul_rn(u, 2.0f), 1.0f), p.scale), p.mean);
        p.out[i] = f2bf(w);
    }
}
