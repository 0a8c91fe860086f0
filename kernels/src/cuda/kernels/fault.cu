// A kernel that faults on purpose, for the fail-fast tests only (feature
// `fault-injection`): it is in none of the daemon's modules and a release
// build does not embed it.
//
// One thread stores to `addr`, an address that the launcher has checked no
// allocation holds, so the context takes a genuine illegal-address fault
// (sticky: every later call on the context fails with it). The store is
// inline PTX in the global state space: the compiler can neither drop it
// nor turn it into a trap, as it may with a store through a pointer it can
// prove null, and a generic address cannot be routed into the shared or
// local window.

struct UnmappedParams {
    u64 addr;           // where the store goes: mapped by nothing
    u32 value;
};

// grid: 1 x 1.
extern "C" __global__ void write_unmapped_u32(const UnmappedParams p) {
    asm volatile("st.global.u32 [%0], %1;" ::"l"(p.addr), "r"(p.value) : "memory");
}
