// Helpers of the tensor-core loops (this one and the lab's ldmatrix
// variant).

// d += a x b on m16n8k16 (bf16 in, f32 accumulate), the PTX register order.
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// x and y as packed bf16 (x in the low half), rounded to nearest even.
__device__ __forceinline__ u32 pack_bf16x2(float x, float y) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(y), "f"(x));
    return r;
}

// What rounding x and y to bf16 (giving hi) left over, packed: the lo halves.
__device__ __forceinline__ u32 pack_bf16x2_rest(float x, float y, u32 hi) {
    return pack_bf16x2(x - __uint_as_float(hi << 16), y - __uint_as_float(hi & 0xffff0000u));
}

// Two floats as packed bf16 (lower index in the low half), and what the
// rounding left over, also packed.
__device__ __forceinline__ void split2(float x, float y, u32& hi, u32& lo) {
    hi = pack_bf16x2(x, y);
    lo = pack_bf16x2_rest(x, y, hi);
}

// ---------------------------------------------------------------------------
// Tensor cores on fragments loaded straight from global memory (LOAD_FRAG).
// A warp takes a whole page (16 keys) at a time, as in the variant above,
// but with no ring and no ldmatrix: each lane loads its 16-byte pieces of
// K and V into registers, every load instruction of the warp reading four
// whole 128-byte lines (8 lanes x 16 bytes of one key each; half-lines
// measured 6 points slower), and the freedom in the order of a sum does
// the rest. Lane (r, c) = (lane / 4, lane % 4).
//   * S = Q K^T on m16n8k16, four 4-key tiles a page. Column 2j of a tile
//     is key j's dims d0 = {64h + 8c + 0..7, c < 4, h < 2}, column 2j + 1
//     the other half (d0 + 32): a key's line splits over the two quads of
//     lanes 8j..8j+7, and each quad is one column of the B fragment. The
//     rows are q with its dims in the matching order: rows 0-3 the G heads'
//     hi halves over d0, rows 4-7 over d0 + 32, rows 8-15 the lo halves
//     alike, so S[h][2j] + S[h + 4][2j + 1] (+ the lo rows) is head h's
//     score of key j, and lanes r and r ^ 4 add their halves with one
//     shuffle. A column carries half a key, so a tile takes 4 k-steps: the
//     same 16 mma a page as whole keys would, and q needs 16 registers.
//   * O^T += V^T P^T (rows: 16 head dims, columns: the hi parts of the G
//     heads' p in columns 0-3, the lo parts in 4-7, so the two halves of p
//     cost no extra mma). Lane (r, c) holds the scores of keys 4t + c of
//     head r & 3, which is, lane for lane, the B fragment P^T needs; V^T's
//     A fragment pairs two keys' values of one dim in a register, which
//     one PRMT per register makes out of the 16-byte loads of two keys
//     (lanes of equal c load key 4t + c's dims 8r + 64h .. +8).
// So a page costs a lane 16 loads of 16 bytes, 24 mma, 32 PRMT, 6 shuffles
// and the softmax of 4 scores: about a tenth of the SIMT loop's
// instructions, with a whole page of K and V (8 KiB a warp) in flight while
// the warp works. The next page's K is requested after this page's QK, its
// V after PV. At head size 64 a row is one line: 2 k-steps a tile, half the
// loads, and V^T's rows r and r + 8 are the even and odd dims of a lane's
// 16 bytes. 5-8 heads per CTA: WIDE, below.
#define LOAD_FRAG 3

__device__ __forceinline__ u32 word(const uint4& v, int w) { return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w; }

// A CTA is FRAG_WARPS warps: the loop for up to 4 heads takes up to 168
// registers, so that 4 CTAs (12 warps) fit on an SM, as many CTAs as the
// SIMT kernel's (sources.rs mirrors FRAG_THREADS).
#define FRAG_WARPS 3
#define FRAG_THREADS (FRAG_WARPS * 32)
// 5-8 heads (WIDE): 188 registers by NVRTC's ptxas, 2 CTAs per SM as the
// driver compiles it; bounded to 3, ptxas spills and the driver fits 4,
// measured slower (kernels/ATTENTION.md point 40).
#define FRAG_WIDE_MIN_CTAS 2

// COMPUTE = false: the read-only twin (the same loads in the same order, no
// arithmetic); TL: the timeline variant (TL_* above). Benchmarks only.
template <int D, int G, bool COMPUTE = true, bool TL = false>
__device__ __forceinline__ void attention_frag_cta(const AttnParams& p) {
    static_assert((D == 64 || D == 128) && G <= 8, "a K or V row of one or two 128-byte lines; at most 8 heads");
    constexpr int LINES = D / 64;  // 128-byte lines of a K or V row
    constexpr int MT = D / 16;     // m-tiles of V^T (16 head dims each)
    // Up to 4 heads, a head's two halves of q share an mma (rows 0-3 and
    // 4-7, lo halves in 8-15) and its hi and lo p share one (columns 0-3
    // and 4-7). WIDE (5-8 heads): rows 0-7 are the heads' hi halves and
    // 8-15 their lo halves, over d0 in one mma and over d0 + 32 in a
    // second (each valid in the even or the odd columns), and p's hi and
    // lo halves go through PV in two mma into the same 8 columns.
    constexpr bool WIDE = G > 4;
    constexpr int NQ = WIDE ? 2 : 1;  // q's dim halves held by a lane
    typedef AttnSmem<G, 2, 1, LOAD_PREFETCH> Smem;  // the SIMT loop's: merge area, then the table slice
    extern __shared__ __align__(16) unsigned char smem[];
    u32* pages = (u32*)(smem + Smem::A);

    const CtaJob job = cta_job<G>(p);
    const u32 ny = job.ny, row = job.row, yi = job.yi, kvh = job.kvh, h0 = job.h0, split = job.split;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int r = lane >> 2, c = lane & 3;
    const int hh = WIDE ? r : r & 3;  // the head whose scores this lane holds
    u64* tl = TL && p.timeline != nullptr ? p.timeline + 8 * ((u64)blockIdx.z * gridDim.x + blockIdx.x) : nullptr;
    tl_mark(tl, TL_ENTRY);

    const u32 kv_len = p.kv_len[row];
    const u32 toff = p.table_off[row];
    // q of head hh as A fragments over dims 64h + 32f + 8c + 0..7, where f
    // is r >> 2 (up to 4 heads) or the q set (WIDE): word w of qh[set][h]
    // packs dims + 2w and + 2w + 1 (rows r: hi halves), ql the lo halves
    // (rows r + 8); heads past G are zero rows. K-step s uses words
    // 2 (s & 1) and + 1 of qh[set][s >> 1].
    u32 qh[NQ][LINES][4], ql[NQ][LINES][4];
    {
        const bool real = hh < G;
        const float* qp = p.qkv + (u64)row * p.qkv_stride + (h0 + (real ? hh : 0)) * D + 8 * c;
#pragma unroll
        for (int set = 0; set < NQ; set++)
#pragma unroll
            for (int h = 0; h < LINES; h++) {
                const float* src = qp + 64 * h + 32 * (WIDE ? set : r >> 2);
                float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f), b = a;
                if (real) {
                    a = *(const float4*)src;
                    b = *(const float4*)(src + 4);
                }
                const float x[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
                for (int w = 0; w < 4; w++)
                    split2(x[2 * w] * p.scale_log2, x[2 * w + 1] * p.scale_log2, qh[set][h][w], ql[set][h][w]);
            }
    }

    const u32 n_keys = stage_split<FRAG_THREADS>(p, split, kv_len, toff, pages);
    const u32 n_pages = (n_keys + BLOCK_TOKENS - 1) / BLOCK_TOKENS;
    tl_mark(tl, TL_LOOP);

    // This warp's pages: warp, warp + FRAG_WARPS, ...
    const u32 my_pages = n_pages > (u32)warp ? (n_pages - warp + FRAG_WARPS - 1) / FRAG_WARPS : 0;
    const u64 page_elems = (u64)p.kv_heads * BLOCK_TOKENS * D;
    const u64 head_off = (u64)kvh * BLOCK_TOKENS * D;
    auto page_base = [&](u32 j) { return (u64)pages[warp + j * FRAG_WARPS] * page_elems + head_off; };
    // kr[t][h]: key 4t + r / 2, 16 bytes at 128h + 16 (4 (r & 1) + c) of its
    // row; vr[t][h]: key 4t + c, 16 bytes at 128h + 16r.
    uint4 kr[4][LINES], vr[4][LINES];
    auto load_k = [&](u64 b) {
        const bf16* src = p.k + b + (r >> 1) * D + 8 * (4 * (r & 1) + c);
#pragma unroll
        for (int t = 0; t < 4; t++)
#pragma unroll
            for (int h = 0; h < LINES; h++) kr[t][h] = ld16_stream(src + 4 * t * D + 64 * h);
    };
    auto load_v = [&](u64 b) {
        const bf16* src = p.v + b + c * D + 8 * r;
#pragma unroll
        for (int t = 0; t < 4; t++)
#pragma unroll
            for (int h = 0; h < LINES; h++) vr[t][h] = ld16_stream(src + 4 * t * D + 64 * h);
    };
    if (my_pages > 0) {
        const u64 b = page_base(0);
        load_k(b);
        load_v(b);
    }

    float m = NEG_INF, l = 0.0f;  // head hh (replicated over the quad, and over r, r ^ 4 unless WIDE)
    // O^T: m-tile e holds, of columns 2c and 2c + 1, dims 8r + e (c0, c1)
    // and 64 + 8r + e (c2, c3) at head size 128, dims 8r + 2e and + 1 at 64.
    float acc[MT][4];
#pragma unroll
    for (int e = 0; e < MT; e++) acc[e][0] = acc[e][1] = acc[e][2] = acc[e][3] = 0.0f;
    u32 sink = 0;  // read-only twin

    for (u32 j = 0; j < my_pages; j++) {
        const bool more = j + 1 < my_pages;
        if constexpr (!COMPUTE) {
            const u64 next = more ? page_base(j + 1) : 0;
#pragma unroll
            for (int t = 0; t < 4; t++)
#pragma unroll
                for (int h = 0; h < LINES; h++) sink ^= kr[t][h].x ^ kr[t][h].y ^ kr[t][h].z ^ kr[t][h].w;
            if (more) load_k(next);
#pragma unroll
            for (int t = 0; t < 4; t++)
#pragma unroll
                for (int h = 0; h < LINES; h++) sink ^= vr[t][h].x ^ vr[t][h].y ^ vr[t][h].z ^ vr[t][h].w;
            if (more) load_v(next);
            continue;
        }
        // S, one 4-key tile (2 k-steps a line) at a time: independent
        // chains, one per tile and q set.
        float s[NQ][4][4];
#pragma unroll
        for (int set = 0; set < NQ; set++)
#pragma unroll
            for (int t = 0; t < 4; t++) {
                s[set][t][0] = s[set][t][1] = s[set][t][2] = s[set][t][3] = 0.0f;
#pragma unroll
                for (int k = 0; k < 2 * LINES; k++) {
                    const int h = k >> 1, w = 2 * (k & 1);
                    mma_bf16_16816(s[set][t], qh[set][h][w], ql[set][h][w], qh[set][h][w + 1], ql[set][h][w + 1],
                                   word(kr[t][h], w), word(kr[t][h], w + 1));
                }
            }
        if (more) load_k(page_base(j + 1));

        // Head hh's score of key 4t + c, hi row plus lo row: up to 4 heads,
        // this lane's half (column 2c over d0 for r < 4, 2c + 1 over d0 + 32
        // for r >= 4) plus lane r ^ 4's; WIDE, column 2c of the d0 set plus
        // column 2c + 1 of the d0 + 32 set, both in this lane.
        float sc[4];
#pragma unroll
        for (int t = 0; t < 4; t++) {
            if constexpr (WIDE) {
                sc[t] = (s[0][t][0] + s[0][t][2]) + (s[1][t][1] + s[1][t][3]);
            } else {
                const float half = r < 4 ? s[0][t][0] + s[0][t][2] : s[0][t][1] + s[0][t][3];
                sc[t] = half + __shfl_xor_sync(0xffffffffu, half, 16);
            }
        }
        const u32 valid = n_keys - (warp + j * FRAG_WARPS) * BLOCK_TOKENS;  // >= 1
        if (valid < BLOCK_TOKENS) {
            // The row's last page: keys past its end masked, their V rows
            // (stale or poisoned) zeroed so that 0 x NaN cannot reach O.
#pragma unroll
            for (int t = 0; t < 4; t++) {
                if (4 * t + c >= (int)valid) {
                    sc[t] = NEG_INF;
#pragma unroll
                    for (int h = 0; h < LINES; h++) vr[t][h] = make_uint4(0, 0, 0, 0);
                }
            }
        }
        float mx = fmaxf(fmaxf(sc[0], sc[1]), fmaxf(sc[2], sc[3]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // Rescale only when some head's max grows (a factor of exactly 1
        // otherwise). Columns 2c, 2c + 1 are heads 2c and 2c + 1 (& 3 unless
        // WIDE), whose factors lanes 4 x head hold.
        if (__any_sync(0xffffffffu, mx > m)) {
            const float mn = fmaxf(m, mx);
            const float corr = mn == NEG_INF ? 1.0f : exp2f(m - mn);
            m = mn;
            l *= corr;
            const int hm = WIDE ? 7 : 3;
            const float c0 = __shfl_sync(0xffffffffu, corr, 4 * ((2 * c) & hm));
            const float c1 = __shfl_sync(0xffffffffu, corr, 4 * ((2 * c + 1) & hm));
#pragma unroll
            for (int e = 0; e < MT; e++) {
                acc[e][0] *= c0;
                acc[e][2] *= c0;
                acc[e][1] *= c1;
                acc[e][3] *= c1;
            }
        }
        const float base = m == NEG_INF ? 0.0f : m;  // no key yet: p = 0
        float pr[4];
#pragma unroll
        for (int t = 0; t < 4; t++) {
            pr[t] = exp2f(sc[t] - base);
            l += pr[t];
        }
        // P^T as B fragment (k = 2c + e: key 4e + c; k = 2c + 8 + e: key
        // 4 (2 + e) + c): column r is head hh's hi half (r < 4) or lo half;
        // WIDE, head r's hi halves, then its lo halves in a second mma.
        u32 b0 = pack_bf16x2(pr[0], pr[1]), b1 = pack_bf16x2(pr[2], pr[3]);
        u32 b2 = 0, b3 = 0;
        if constexpr (WIDE) {
            b2 = pack_bf16x2_rest(pr[0], pr[1], b0);
            b3 = pack_bf16x2_rest(pr[2], pr[3], b1);
        } else if (r >= 4) {
            b0 = pack_bf16x2_rest(pr[0], pr[1], b0);
            b1 = pack_bf16x2_rest(pr[2], pr[3], b1);
        }
        // V^T's A fragments: rows r and r + 8 of m-tile e are element e of
        // the two lines (head size 128) or elements 2e and 2e + 1 of the one
        // line (64), of keys 4t + c (t = 0, 1 in a0 and a1, 2, 3 in a2, a3).
        constexpr u32 LO = 0x5410u, HI = 0x7632u;  // the low or the high halves of two words
#pragma unroll
        for (int e = 0; e < MT; e++) {
            const int w = LINES == 2 ? e / 2 : e;
            const int h1 = LINES == 2 ? 1 : 0;
            const u32 s0 = LINES == 2 ? ((e & 1) ? HI : LO) : LO;
            const u32 s1 = LINES == 2 ? s0 : HI;
            const u32 a0 = __byte_perm(word(vr[0][0], w), word(vr[1][0], w), s0);
            const u32 a1 = __byte_perm(word(vr[0][h1], w), word(vr[1][h1], w), s1);
            const u32 a2 = __byte_perm(word(vr[2][0], w), word(vr[3][0], w), s0);
            const u32 a3 = __byte_perm(word(vr[2][h1], w), word(vr[3][h1], w), s1);
            mma_bf16_16816(acc[e], a0, a1, a2, a3, b0, b1);
            if constexpr (WIDE) mma_bf16_16816(acc[e], a0, a1, a2, a3, b2, b3);
        }
        if (more) load_v(page_base(j + 1));  // the table slice again: two registers fewer across the page
    }
    tl_mark(tl, TL_LOOP_END);
    if constexpr (!COMPUTE) {
        if (sink == 0x9e3779b9u) p.out[0] = (float)sink;  // never for random data; keeps the loads
        return;
    }
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    // Columns 2c (hi) and 2c ^ 4 (lo) of a head: lanes c and c ^ 2 (WIDE:
    // the halves are summed already).
    if constexpr (!WIDE) {
#pragma unroll
        for (int e = 0; e < MT; e++)
#pragma unroll
            for (int k = 0; k < 4; k++) acc[e][k] += __shfl_xor_sync(0xffffffffu, acc[e][k], 2);
    }

    // The warps' results to shared memory as they are ([G][warp * D + d],
    // each relative to its warp's max; clear of the table slice, which
    // other warps may still read), then the SIMT kernel's end.
    __shared__ float sm_ml[2 * FRAG_WARPS * G];  // [warp][G] maxima, then sums
    float* sm_acc = (float*)smem;
    if (c == 0 && r < G) {
        sm_ml[warp * G + r] = m;
        sm_ml[FRAG_WARPS * G + warp * G + r] = l;
    }
    if (WIDE || c < 2) {
#pragma unroll
        for (int k = 0; k < 2; k++) {
            const int g = 2 * c + k;
            if (g >= G) continue;
            float* row_acc = sm_acc + g * FRAG_WARPS * D + warp * D + 8 * r;
            if constexpr (LINES == 2) {
#pragma unroll
                for (int half = 0; half < 2; half++) {
                    float4* dst = (float4*)(row_acc + 64 * half);
                    const int x = 2 * half + k;
                    dst[0] = make_float4(acc[0][x], acc[1][x], acc[2][x], acc[3][x]);
                    dst[1] = make_float4(acc[4][x], acc[5][x], acc[6][x], acc[7][x]);
                }
            } else {
                float4* dst = (float4*)row_acc;
                dst[0] = make_float4(acc[0][k], acc[0][2 + k], acc[1][k], acc[1][2 + k]);
                dst[1] = make_float4(acc[2][k], acc[2][2 + k], acc[3][k], acc[3][2 + k]);
            }
        }
    }
    __syncthreads();
    tl_mark(tl, TL_ALL_LOOPS);
    combine_rows<D, G, FRAG_WARPS, FRAG_THREADS>(p, row, yi, ny, h0, split, smem, sm_ml, tl);
    tl_mark(tl, TL_EXIT);
}

#define ATTN_FRAG(D, G, MINB)                                                                    \
    extern "C" __global__ void __launch_bounds__(FRAG_THREADS, MINB) attention_f32_d##D##_g##G##_frag( \
        const AttnParams p) {                                                                    \
        attention_frag_cta<D, G>(p);                                                             \
    }
