// tacflow kernel prelude: prepended to every module before NVRTC compiles
// it. Header-free on purpose (no cuda_bf16.h, no include path anywhere):
// bf16 travels as raw 16-bit words and is converted with bit operations,
// which also makes the rounding explicit (round to nearest even, like the
// `half` crate on the host).

typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short bf16;

#define BLOCK_TOKENS 16
#define NEG_INF (__int_as_float(0xff800000))

__device__ __forceinline__ float bf2f(bf16 x) { return __uint_as_float(((u32)x) << 16); }

// Round to nearest even; NaN stays a quiet NaN with its sign (as `half`).
__device__ __forceinline__ bf16 f2bf(float f) {
    u32 b = __float_as_uint(f);
    if ((b & 0x7fffffffu) > 0x7f800000u) return (bf16)((b >> 16) | 0x40u);
    return (bf16)((b + 0x7fffu + ((b >> 16) & 1u)) >> 16);
}

// Eight bf16 in one 16-byte word, unpacked to f32.
__device__ __forceinline__ void unpack8(uint4 w, float* out) {
    u32 v[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        out[2 * i] = __uint_as_float(v[i] << 16);
        out[2 * i + 1] = __uint_as_float(v[i] & 0xffff0000u);
    }
}

__device__ __forceinline__ uint4 ld16(const bf16* p) { return *reinterpret_cast<const uint4*>(p); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block in a fixed order (deterministic). `scratch` holds 32
// floats; every thread gets the result. blockDim.x must be a multiple of 32.
__device__ float block_sum(float v, float* scratch) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nw ? scratch[lane] : 0.0f;
    return warp_sum(t);
}

__device__ float block_max(float v, float* scratch) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float t = lane < nw ? scratch[lane] : NEG_INF;
    return warp_max(t);
}

// --- the counter-based generator of kernels/src/rng.rs, bit for bit ---

__device__ __forceinline__ u64 mix64(u64 z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ u64 rng_bits(u64 seed, u64 stream, u64 index) {
    return mix64(seed ^ mix64(stream ^ mix64(index)));
}

// 24 random bits (exact in f32); `_rn` so nothing is contracted or reordered.
__device__ __forceinline__ float uniform01(u64 seed, u64 stream, u64 index) {
    return __fmul_rn((float)(rng_bits(seed, stream, index) >> 40), 1.0f / 16777216.0f);
}
