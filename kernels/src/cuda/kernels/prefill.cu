// The daemon's prefill attention kernels (prefill/tc.cuh has the design):
// q and p as bf16 hi + lo halves, head sizes 64 and 128.

extern "C" __global__ void __launch_bounds__(PF_THREADS) prefill_f32_d64(const PrefillParams p) {
    extern __shared__ uint4 pf_smem64[];
    prefill_cta<64, true>(p, reinterpret_cast<bf16*>(pf_smem64));
}

extern "C" __global__ void __launch_bounds__(PF_THREADS) prefill_f32_d128(const PrefillParams p) {
    extern __shared__ uint4 pf_smem128[];
    prefill_cta<128, true>(p, reinterpret_cast<bf16*>(pf_smem128));
}
