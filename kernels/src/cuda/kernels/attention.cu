// The daemon's attention kernels: the loops of attention/simt.cuh and
// attention/frag.cuh instantiated for the shapes it serves
// (sources.rs: AttnVariant::default_for chooses among them; the module is
// compiled as the prelude, attention/common.cuh, simt.cuh, frag.cuh,
// then this file).

ATTN_FRAG(128, 1, 4)
ATTN_FRAG(128, 2, 4)
ATTN_FRAG(128, 3, 4)
ATTN_FRAG(128, 4, 4)
ATTN_FRAG(128, 5, FRAG_WIDE_MIN_CTAS)
ATTN_FRAG(128, 6, FRAG_WIDE_MIN_CTAS)
ATTN_FRAG(128, 7, FRAG_WIDE_MIN_CTAS)
ATTN_FRAG(128, 8, FRAG_WIDE_MIN_CTAS)
ATTN_FRAG(64, 5, FRAG_WIDE_MIN_CTAS)
ATTN_FRAG(64, 6, FRAG_WIDE_MIN_CTAS)
ATTN_FRAG(64, 7, FRAG_WIDE_MIN_CTAS)
ATTN_FRAG(64, 8, FRAG_WIDE_MIN_CTAS)
// The SIMT loop wherever the tensor-core loop does not serve: head sizes
// 16, 32 and 256, and 64 with up to 4 heads per CTA.
#define ATTN_PF_D(D) ATTN_PF(D, 1, 4) ATTN_PF(D, 2, 4) ATTN_PF(D, 3, 4) ATTN_PF(D, 4, 4) \
    ATTN_PF(D, 5, 2) ATTN_PF(D, 6, 2) ATTN_PF(D, 7, 2) ATTN_PF(D, 8, 2)
ATTN_PF_D(16)
ATTN_PF_D(32)
ATTN_PF(64, 1, 4)
ATTN_PF(64, 2, 4)
ATTN_PF(64, 3, 4)
ATTN_PF(64, 4, 4)
ATTN_PF_D(256)
