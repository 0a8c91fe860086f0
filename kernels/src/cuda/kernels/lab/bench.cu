// Benchmark-only kernels: the read ceiling that decode attention is
// measured against, and a stream hold. Loaded only by the lab.

struct ReadParams {
    const uint4* src;
    u64 n;  // 16-byte words
    float* out;
};

// The read ceiling: every 16-byte word of a flat buffer read once, four
// loads in flight per thread, nothing written (unless the words' XOR hits
// a constant that random data never does).
extern "C" __global__ void __launch_bounds__(256) read_ceiling(const ReadParams p) {
    const u64 stride = (u64)gridDim.x * blockDim.x;
    u32 sink = 0;
    u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    for (; i + 3 * stride < p.n; i += 4 * stride) {
        const uint4 a = p.src[i], b = p.src[i + stride], c = p.src[i + 2 * stride], d = p.src[i + 3 * stride];
        sink ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^ d.w;
    }
    for (; i < p.n; i += stride) {
        const uint4 a = p.src[i];
        sink ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    if (sink == 0x9e3779b9u) p.out[0] = (float)sink;
}

struct SpinParams {
    u64 ns;
};

// Holds the stream for `ns` nanoseconds of the global timer (one thread):
// a benchmark enqueues a whole decode step behind it, so the step then runs
// back to back with no gap left by the host's launches.
extern "C" __global__ void spin_wait(const SpinParams p) {
    u64 t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        __nanosleep(1000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < p.ns);
}
