// Rotary embeddings, Llama's "rotate half" convention: element i of a head
// pairs with i + head_dim/2. The inverse frequencies (Llama-3 scaling
// included) come from the host, where the CPU reference computes them.

struct RopeParams {
    float* qkv;              // [rows, row_stride]; heads of head_dim from column 0
    const u32* positions;    // [rows]
    const float* inv_freq;   // [head_dim / 2]
    u32 rows;
    u32 row_stride;
    u32 heads;               // q heads + k heads, adjacent in the fused row
    u32 head_dim;
};

// grid: rows. The products are `_rn` so the rotation rounds like the host's.
extern "C" __global__ void rope_f32(const RopeParams p) {
    const u32 half = p.head_dim / 2;
    const float pos = (float)p.positions[blockIdx.x];
    float* row = p.qkv + (u64)blockIdx.x * p.row_stride;
    for (u32 i = threadIdx.x; i < p.heads * half; i += blockDim.x) {
        const u32 h = i / half, j = i % half;
        float s, c;
        sincosf(__fmul_rn(pos, p.inv_freq[j]), &s, &c);
        float* x = row + h * p.head_dim;
        const float lo = x[j], hi = x[j + half];
        x[j] = __fsub_rn(__fmul_rn(lo, c), __fmul_rn(hi, s));
        x[j + half] = __fadd_rn(__fmul_rn(hi, c), __fmul_rn(lo, s));
    }
}
