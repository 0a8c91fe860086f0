// A CPU stand-in for the CUDA features the Tactic kernels (tactic.cu) use,
// so that the kernels themselves run on a machine without a GPU
// (kernels/examples/tactic_emu: the comparison with the CPU reference).
//
// Each block runs as blockDim OS threads, blocks one after another, so that
// `__shared__` variables can be statics (one block lives at a time) and
// dynamic shared memory a buffer of the block (the driver rewrites each
// `extern __shared__ T name[];` into a pointer to it). `__syncthreads` is a
// barrier of the block's threads, a warp's shuffles and `__syncwarp` a
// barrier of its 32 lanes around an exchange buffer; a thread that returns
// drops out of both, as an exited thread leaves `__syncthreads` on a GPU.
// The rounded intrinsics are plain operations: compile with
// -ffp-contract=off. What this cannot show: the GPU's memory model beyond a
// barrier, lanes running apart, launch limits (registers, shared memory).
#pragma once
#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>
#include <memory>

struct dim3e { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3e threadIdx, blockIdx;
inline dim3e blockDim, gridDim;
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
#define __launch_bounds__(x)

struct EmuBlock {
    std::unique_ptr<std::barrier<>> bar;
    std::vector<std::unique_ptr<std::barrier<>>> warp;
    std::vector<uint64_t> xbuf;
    std::vector<char> dyn;
};
inline thread_local EmuBlock* emu_blk;

inline void __syncthreads() { emu_blk->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_blk->warp[threadIdx.x / 32]->arrive_and_wait(); }

template <class T> T emu_xchg(T v, int src) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    uint64_t* b = &emu_blk->xbuf[w * 32];
    uint64_t raw = 0;
    std::memcpy(&raw, &v, sizeof(T));
    b[lane] = raw;
    __syncwarp();
    T r;
    uint64_t got = b[src];
    std::memcpy(&r, &got, sizeof(T));
    __syncwarp();
    return r;
}
template <class T> T __shfl_xor_sync(unsigned, T v, int o) { return emu_xchg(v, (threadIdx.x & 31) ^ o); }
template <class T> T __shfl_sync(unsigned, T v, int src) { return emu_xchg(v, src & 31); }
template <class T> T __shfl_up_sync(unsigned, T v, unsigned o) {
    const int l = threadIdx.x & 31;
    return emu_xchg(v, l >= (int)o ? l - (int)o : l);
}
inline unsigned __match_any_sync(unsigned, unsigned v) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    uint64_t* b = &emu_blk->xbuf[w * 32];
    b[lane] = v;
    __syncwarp();
    unsigned m = 0;
    for (int l = 0; l < 32; l++) if (b[l] == v) m |= 1u << l;
    __syncwarp();
    return m;
}
inline int __ffs(unsigned x) { return __builtin_ffs(x); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline unsigned atomicOr(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_or(v); }
inline unsigned atomicMax(unsigned* p, unsigned v) {
    std::atomic_ref<unsigned> a(*p);
    unsigned old = a.load();
    while (old < v && !a.compare_exchange_weak(old, v)) {}
    return old;
}
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
template <class T> inline T min(T a, T b) { return a < b ? a : b; }
template <class T> inline T max(T a, T b) { return a < b ? b : a; }

template <class P>
void emu_launch(void (*k)(P), dim3e grid, dim3e block, size_t smem, const P& p) {
    blockDim = block;
    gridDim = grid;
    const unsigned n = block.x;
    for (unsigned z = 0; z < grid.z; z++)
        for (unsigned y = 0; y < grid.y; y++)
            for (unsigned x = 0; x < grid.x; x++) {
                EmuBlock b;
                b.bar = std::make_unique<std::barrier<>>(n);
                for (unsigned w = 0; w < (n + 31) / 32; w++)
                    b.warp.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - 32 * w)));
                b.xbuf.assign(n + 32, 0);
                b.dyn.assign(smem + 16, (char)0xcd);
                std::vector<std::thread> ts;
                ts.reserve(n);
                for (unsigned t = 0; t < n; t++)
                    ts.emplace_back([&, t] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {x, y, z};
                        emu_blk = &b;
                        k(p);
                        b.warp[t / 32]->arrive_and_drop();
                        b.bar->arrive_and_drop();
                    });
                for (auto& th : ts) th.join();
            }
}
