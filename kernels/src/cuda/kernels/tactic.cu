// Tactic's decode path on the GPU (kernels/TACTIC.md, "On the GPU"): the
// kernels live in the headers this module compiles first, in the order of
// a step:
//
//   tactic/common.cuh   the state layout, key rows, the CPU's dot product
//   tactic/kmeans.cuh   clustering at a sequence's first decode step and
//                       when the tail is re-clustered
//   tactic/select.cuh   scores, estimates and the ranking per query head
//   tactic/union.cuh    the GQA union (the chunked greedy)
//   tactic/sparse.cuh   attention over the selected slots, split and merged
//   tactic/diag.cuh     the true mass of each selection (diagnostics only)
//   tactic/oracle.cuh   the oracle_top_p baseline's selection
//   tactic/budget.cuh   the fixed_budget (Quest) baseline's selection
//
// Here: the sparse attention instantiated for each head size it serves
// (a multiple of 32, at most TAC_MAX_D).

#define SPARSE_KERNEL(D)                                                    \
    extern "C" __global__ void __launch_bounds__(SPARSE_WARPS * 32)         \
        tactic_attention_d##D##_bf16(const SparseParams p) {                \
        sparse_cta<D>(p);                                                   \
    }

SPARSE_KERNEL(32)
SPARSE_KERNEL(64)
SPARSE_KERNEL(128)
SPARSE_KERNEL(256)
