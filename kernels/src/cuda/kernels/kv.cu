// The paged KV cache in bf16: one layer's K (and V) is
// [num_blocks, kv_heads, 16, head_dim], so a head's rows of a block are one
// contiguous run of 16 * head_dim values.

struct KvAppendParams {
    const float* qkv;   // [rows, row_stride]: q | k | v
    bf16* k;            // this layer's K
    bf16* v;
    const u32* slots;   // [rows]: block * 16 + offset
    u32 rows;
    u32 row_stride;
    u32 k_col;          // first column of k; v follows at k_col + kv_heads * head_dim
    u32 kv_heads;
    u32 head_dim;
};

// grid: rows.
extern "C" __global__ void kv_append_bf16(const KvAppendParams p) {
    const u32 slot = p.slots[blockIdx.x];
    const u64 blk = slot / BLOCK_TOKENS, off = slot % BLOCK_TOKENS;
    const float* src = p.qkv + (u64)blockIdx.x * p.row_stride + p.k_col;
    const u32 kvd = p.kv_heads * p.head_dim;
    for (u32 i = threadIdx.x; i < kvd; i += blockDim.x) {
        const u32 h = i / p.head_dim, d = i % p.head_dim;
        const u64 dst = ((blk * p.kv_heads + h) * BLOCK_TOKENS + off) * p.head_dim + d;
        p.k[dst] = f2bf(src[i]);
        p.v[dst] = f2bf(src[kvd + i]);
    }
}

struct CopyBlocksParams {
    bf16* k;            // every layer's K, layer after layer
    bf16* v;
    const u32* pairs;   // [n_pairs, 2]: (src, dst)
    u32 n_pairs;
    u32 layers;
    u64 layer_stride;   // elements per layer (num_blocks * block_elems)
    u64 block_elems;    // kv_heads * 16 * head_dim (a multiple of 8)
};

// grid: (n_pairs, 2 * layers); 16-byte copies.
extern "C" __global__ void copy_blocks_bf16(const CopyBlocksParams p) {
    const u32 layer = blockIdx.y >> 1;
    bf16* base = ((blockIdx.y & 1) ? p.v : p.k) + layer * p.layer_stride;
    const uint4* src = (const uint4*)(base + (u64)p.pairs[2 * blockIdx.x] * p.block_elems);
    uint4* dst = (uint4*)(base + (u64)p.pairs[2 * blockIdx.x + 1] * p.block_elems);
    const u64 n = p.block_elems / 8;
    for (u64 i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}
