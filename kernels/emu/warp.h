// Stand-ins for the warp-wide matrix instructions of the tensor-core
// kernels (prefill.cu): mma.sync m16n8k16 (bf16 in, f32 accumulate) and
// ldmatrix (x4, plain and transposed), on top of emu.h's warps. Each
// instruction is an exchange among the warp's 32 lanes: every lane posts its
// operands, waits for the others, computes its own share of the result
// from the fragments the PTX ISA assigns to each lane, and waits again
// before the buffer is reused.
//
// Fragment layouts (g = lane / 4, t = lane % 4; two bf16 per register, the
// lower index in the low half):
//   A 16x16 row-major: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8 column-major: b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   C/D 16x8 f32: d0 (g, 2t), d1 (g, 2t+1), d2 (g+8, 2t), d3 (g+8, 2t+1)
// The tensor cores' order of summation is not specified; here the 16
// products are added to the accumulator in k order, in f32.
#pragma once
#include "emu.h"

// One block lives at a time (emu.h), so a static buffer per warp serves.
inline uint32_t emu_mma_buf[32][32][6];

inline float emu_bf_lo(uint32_t r) { return __uint_as_float(r << 16); }
inline float emu_bf_hi(uint32_t r) { return __uint_as_float(r & 0xffff0000u); }

inline void emu_mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    uint32_t* mine = emu_mma_buf[w][lane];
    for (int i = 0; i < 4; i++) mine[i] = a[i];
    mine[4] = b0;
    mine[5] = b1;
    __syncwarp();
    auto A = [&](int row, int k) {
        const uint32_t r = emu_mma_buf[w][(row % 8) * 4 + (k % 8) / 2][(row < 8 ? 0 : 1) + (k < 8 ? 0 : 2)];
        return (k & 1) ? emu_bf_hi(r) : emu_bf_lo(r);
    };
    auto B = [&](int k, int col) {
        const uint32_t r = emu_mma_buf[w][col * 4 + (k % 8) / 2][k < 8 ? 4 : 5];
        return (k & 1) ? emu_bf_hi(r) : emu_bf_lo(r);
    };
    const int g = lane >> 2, t = lane & 3;
    float out[4];
    for (int e = 0; e < 4; e++) {
        const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
        float acc = d[e];
        for (int k = 0; k < 16; k++) acc += A(row, k) * B(k, col);
        out[e] = acc;
    }
    __syncwarp();
    for (int e = 0; e < 4; e++) d[e] = out[e];
}

// ldmatrix.x4: lanes 8j..8j+7 give the rows of matrix j (8 bf16 each);
// lane l gets, of each matrix, row l/4's elements 2(l%4) and 2(l%4)+1, or
// with `trans` column l/4's elements of rows 2(l%4) and 2(l%4)+1.
inline void emu_ldsm_x4(const unsigned short* row, bool trans, uint32_t (&r)[4]) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    uint64_t* b = &emu_blk->xbuf[w * 32];
    b[lane] = (uint64_t)row;
    __syncwarp();
    for (int j = 0; j < 4; j++) {
        uint32_t lo, hi;
        if (!trans) {
            const unsigned short* p = (const unsigned short*)b[8 * j + lane / 4];
            lo = p[2 * (lane % 4)];
            hi = p[2 * (lane % 4) + 1];
        } else {
            lo = ((const unsigned short*)b[8 * j + 2 * (lane % 4)])[lane / 4];
            hi = ((const unsigned short*)b[8 * j + 2 * (lane % 4) + 1])[lane / 4];
        }
        r[j] = lo | (hi << 16);
    }
    __syncwarp();
}
