// The lab's prefill attention variant (prefill/tc.cuh): q and p rounded to
// bf16 once, as FlashAttention does, against the daemon's hi + lo halves;
// timed by `tacflowd bench-prefill`.

extern "C" __global__ void __launch_bounds__(PF_THREADS) prefill_f32_d64_bf16(const PrefillParams p) {
    extern __shared__ uint4 pf_smem64b[];
    prefill_cta<64, false>(p, reinterpret_cast<bf16*>(pf_smem64b));
}

extern "C" __global__ void __launch_bounds__(PF_THREADS) prefill_f32_d128_bf16(const PrefillParams p) {
    extern __shared__ uint4 pf_smem128b[];
    prefill_cta<128, false>(p, reinterpret_cast<bf16*>(pf_smem128b));
}
