"""The card's ceilings, measured with torch in the benchmark's own run: the
device-to-device copy bandwidth, the read-only bandwidth (the best of two
read kernels), and the bf16 GEMM rate. Each is the median of many calls
timed by CUDA events after a warm-up, on random data (zeros run faster)
larger than L2."""

from __future__ import annotations

import statistics

READ_SRC = r"""
extern "C" __global__ void read_u4(const uint4* __restrict__ p, unsigned long long n, unsigned int* out) {
    unsigned int acc = 0;
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        uint4 v = __ldg(p + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x9e3779b9u) out[0] = acc;  // keeps the loads; almost never taken
}
"""


def time_calls(torch, fn, n: int, warmup: int = 5) -> list[float]:
    """Microseconds of each of `n` calls, timed by events (fn(i) rotates)."""
    for i in range(warmup):
        fn(i)
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for i, (a, b) in enumerate(ev):
        a.record()
        fn(i)
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) * 1e3 for a, b in ev]


def copy_bandwidth(torch, nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second (median)."""
    src = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)
    us = time_calls(torch, lambda i: dst.copy_(src), reps, warmup=3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / (statistics.median(us) * 1e-6)


def read_ceiling(torch, nbytes: int = 2 << 30, reps: int = 20) -> dict:
    """Bytes read per second by two read-only kernels over `nbytes`:
    torch's sum, and a CuPy kernel of 16-byte loads (when CuPy imports);
    ``best`` is the read-only ceiling."""
    x = torch.randn(nbytes // 2, dtype=torch.bfloat16, device="cuda")
    out: dict = {}
    us = time_calls(torch, lambda i: x.sum(dtype=torch.float32), reps, warmup=3)
    out["torch_sum"] = nbytes / (statistics.median(us) * 1e-6)
    try:
        import cupy

        k = cupy.RawKernel(READ_SRC, "read_u4")
        n16 = nbytes // 16
        sink = torch.zeros(1, dtype=torch.int32, device="cuda")
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        stream = cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream)

        def call(i: int) -> None:
            with stream:
                k((sms * 8,), (512,), (x.data_ptr(), cupy.uint64(n16), sink.data_ptr()))

        us = time_calls(torch, call, reps, warmup=3)
        out["cupy_u4"] = nbytes / (statistics.median(us) * 1e-6)
    except Exception as e:  # no CuPy, or it cannot compile here
        out["cupy_u4_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    del x
    torch.cuda.empty_cache()
    out["best"] = max(v for v in out.values() if isinstance(v, float))
    return out


def gemm_rate(torch, n: int = 8192, reps: int = 20) -> float:
    """bf16 FLOP/s of an n^3 matrix product on random data (median)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    us = time_calls(torch, lambda i: torch.matmul(a, b), reps, warmup=3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * n**3 / (statistics.median(us) * 1e-6)
