// Attention variants measured beside the daemon's kernels (benchmarks and
// the lab's self-check cases only; `tacflowd bench-attention`): the
// ldmatrix tensor-core loop, the SIMT loop's other load modes, the
// read-only twins and timeline variants. Compiled
// after the same headers as attention.cu, loaded only by the lab.

// ---------------------------------------------------------------------------
// Tensor-core variant. The SIMT loop above spends ~80 warp instructions per
// key (dot products, butterflies, a softmax per lane), which keeps it from
// the bandwidth; here a warp takes a whole page (16 keys) at a time and
// both products run on mma.sync m16n8k16 (bf16 in, f32 accumulate):
//   S[head][key] = Q (16 rows: the G heads, the rest zero) x K^T
//   O[head][dim] += P x V
// q and p enter as two bf16 halves each (hi = bf16(x), lo = bf16(x - hi)),
// so they are seen to ~2^-17 as in the f32 loop: K and V are exact bf16.
// Each warp streams its pages (w, w + 4, ...) through its own P-stage ring
// of cp.async copies (K and V rows swizzled by 16-byte chunk, so that
// ldmatrix reads 8 rows without bank conflicts); rows past the last key
// are zero-filled, so that masked keys contribute exactly nothing.

__device__ __forceinline__ void cp_async16_zfill(u32 dst, const void* src, u32 bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void ldsm_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

__device__ __forceinline__ void ldsm_x4_t(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// d = a x b + d for the rows 0-7 of the 16 x 8 tile that hold heads: a1 and
// a3 (rows 8-15) are zero and d2, d3 are discarded.
__device__ __forceinline__ void mma_rows8(float& d0, float& d1, u32 a0, u32 a2, u32 b0, u32 b1) {
    float d[4] = {d0, d1, 0.0f, 0.0f};
    mma_bf16_16816(d, a0, 0u, a2, 0u, b0, b1);
    d0 = d[0];
    d1 = d[1];
}

#define MMA_WARPS (ATT_THREADS / 32)

template <int D, int P>
struct MmaSmem {
    static constexpr int STAGE = 2 * BLOCK_TOKENS * D * 2;  // K and V of one page
    static constexpr int RING = MMA_WARPS * P * STAGE;
    static constexpr int MERGE = 8 * MMA_WARPS * D * 4;    // G <= 8
    static constexpr int A = RING > MERGE ? RING : MERGE;
    static constexpr int BYTES = A + MAX_SPLIT_PAGES * 4;
    static_assert(A >= 8 * MERGE_MAX_SPLITS * 4, "the last-CTA merge's weights fit before the table slice");
};

template <int D, int G, int P>
__device__ __forceinline__ void attention_mma_cta(const AttnParams& p) {
    constexpr int KSTEPS = D / 16;  // k-steps of QK, n-tile pairs of PV
    constexpr int RB = D * 2;       // bytes of a K or V row
    constexpr int CPR = D / 8;      // 16-byte chunks per row
    typedef MmaSmem<D, P> Smem;
    extern __shared__ __align__(16) unsigned char smem[];
    u32* pages = (u32*)(smem + Smem::A);

    const CtaJob job = cta_job<G>(p);
    const u32 ny = job.ny, row = job.row, yi = job.yi, kvh = job.kvh, h0 = job.h0, split = job.split;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int qr = lane >> 2, qc = lane & 3;  // fragment row (head) and column pair

    const u32 kv_len = p.kv_len[row];
    const u32 toff = p.table_off[row];
    // Q as A fragments: a0 = (q[qr][16s + 2qc], +1), a2 = the same + 8;
    // heads qr >= G are zero rows.
    u32 qa_hi[KSTEPS][2], qa_lo[KSTEPS][2];
    {
        const bool real = qr < G;
        const float* qp = p.qkv + (u64)row * p.qkv_stride + (h0 + (real ? qr : 0)) * D + 2 * qc;
#pragma unroll
        for (int ks = 0; ks < KSTEPS; ks++) {
#pragma unroll
            for (int half = 0; half < 2; half++) {
                const float2 v = real ? *(const float2*)(qp + 16 * ks + 8 * half) : make_float2(0.0f, 0.0f);
                split2(v.x * p.scale_log2, v.y * p.scale_log2, qa_hi[ks][half], qa_lo[ks][half]);
            }
        }
    }

    const u32 n_keys = stage_split<ATT_THREADS>(p, split, kv_len, toff, pages);
    const u32 n_pages = (n_keys + BLOCK_TOKENS - 1) / BLOCK_TOKENS;

    // This warp's pages: warp, warp + MMA_WARPS, ...
    const u32 my_pages = n_pages > (u32)warp ? (n_pages - warp + MMA_WARPS - 1) / MMA_WARPS : 0;
    const u32 ring = shared_addr(smem) + warp * P * Smem::STAGE;
    const u64 head_off = (u64)kvh * BLOCK_TOKENS * D;
    // Copies page j of this warp into slot j % P: lane takes chunks
    // lane + 32i, i.e. rows 32i/CPR.. of K and of V.
    auto issue = [&](u32 j) {
        const u32 pi = warp + j * MMA_WARPS;
        const u64 base = (u64)pages[pi] * p.kv_heads * BLOCK_TOKENS * D + head_off;
        const u32 valid = min(n_keys - pi * BLOCK_TOKENS, (u32)BLOCK_TOKENS);
        const u32 slot = ring + (j % P) * Smem::STAGE;
#pragma unroll
        for (int i = 0; i < BLOCK_TOKENS * CPR / 32; i++) {
            const int c = lane + 32 * i, r = c / CPR, cc = c % CPR;
            const u32 dst = slot + r * RB + ((cc ^ (r & 7)) << 4);
            const u32 bytes = (u32)r < valid ? 16u : 0u;
            const u64 off = base + r * D + cc * 8;
            cp_async16_zfill(dst, p.k + off, bytes);
            cp_async16_zfill(dst + BLOCK_TOKENS * RB, p.v + off, bytes);
        }
    };
#pragma unroll
    for (int j = 0; j < P - 1; j++) {
        if (j < (int)my_pages) issue(j);
        cp_async_commit();
    }

    float m = NEG_INF, l = 0.0f;  // head qr, replicated over the quad
    float acc[2 * KSTEPS][2];     // O[qr][8t + 2qc + {0,1}]
#pragma unroll
    for (int t = 0; t < 2 * KSTEPS; t++) acc[t][0] = acc[t][1] = 0.0f;

    for (u32 j = 0; j < my_pages; j++) {
        cp_async_wait<P - 2>();
        __syncwarp();  // every lane's copies of page j landed; slot (j-1) % P is read
        if (j + P - 1 < my_pages) issue(j + P - 1);
        cp_async_commit();
        const u32 kbase = ring + (j % P) * Smem::STAGE;
        const u32 vbase = kbase + BLOCK_TOKENS * RB;

        // S = Q K^T for keys 0-7 (n-tile 0) and 8-15 (n-tile 1).
        float s[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
        float sl[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
#pragma unroll
        for (int nt = 0; nt < 2; nt++) {
            const int key = 8 * nt + (lane & 7);
#pragma unroll
            for (int kq = 0; kq < KSTEPS / 2; kq++) {
                const int chunk = 4 * kq + (lane >> 3);
                u32 b0, b1, b2, b3;
                ldsm_x4(kbase + key * RB + ((chunk ^ (key & 7)) << 4), b0, b1, b2, b3);
                mma_rows8(s[nt][0], s[nt][1], qa_hi[2 * kq][0], qa_hi[2 * kq][1], b0, b1);
                mma_rows8(sl[nt][0], sl[nt][1], qa_lo[2 * kq][0], qa_lo[2 * kq][1], b0, b1);
                mma_rows8(s[nt][0], s[nt][1], qa_hi[2 * kq + 1][0], qa_hi[2 * kq + 1][1], b2, b3);
                mma_rows8(sl[nt][0], sl[nt][1], qa_lo[2 * kq + 1][0], qa_lo[2 * kq + 1][1], b2, b3);
            }
        }
        // Online softmax over the page's keys 8nt + 2qc + e.
        const u32 k0 = (warp + j * MMA_WARPS) * BLOCK_TOKENS;
        float mx = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                const bool ok = k0 + 8 * nt + 2 * qc + e < n_keys;
                s[nt][e] = ok ? s[nt][e] + sl[nt][e] : NEG_INF;
                mx = fmaxf(mx, s[nt][e]);
            }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mn = fmaxf(m, mx);
        const float base = mn == NEG_INF ? 0.0f : mn;  // no key yet: p = 0, no NaN
        const float corr = exp2f(m - base);
        m = mn;
        float pr[2][2];
        float psum = 0.0f;
#pragma unroll
        for (int nt = 0; nt < 2; nt++)
#pragma unroll
            for (int e = 0; e < 2; e++) {
                pr[nt][e] = exp2f(s[nt][e] - base);
                psum += pr[nt][e];
            }
        l = l * corr + psum;
#pragma unroll
        for (int t = 0; t < 2 * KSTEPS; t++) {
            acc[t][0] *= corr;
            acc[t][1] *= corr;
        }
        u32 pa_hi[2], pa_lo[2];  // P as A fragments: a0 keys 0-7, a2 keys 8-15
        split2(pr[0][0], pr[0][1], pa_hi[0], pa_lo[0]);
        split2(pr[1][0], pr[1][1], pa_hi[1], pa_lo[1]);
        // O += P V, two n-tiles (16 dims) per ldmatrix.
        const int vkey = (lane & 7) + 8 * ((lane >> 3) & 1);
#pragma unroll
        for (int dq = 0; dq < KSTEPS; dq++) {
            const int chunk = 2 * dq + (lane >> 4);
            u32 b0, b1, b2, b3;
            ldsm_x4_t(vbase + vkey * RB + ((chunk ^ (vkey & 7)) << 4), b0, b1, b2, b3);
            mma_rows8(acc[2 * dq][0], acc[2 * dq][1], pa_hi[0], pa_hi[1], b0, b1);
            mma_rows8(acc[2 * dq][0], acc[2 * dq][1], pa_lo[0], pa_lo[1], b0, b1);
            mma_rows8(acc[2 * dq + 1][0], acc[2 * dq + 1][1], pa_hi[0], pa_hi[1], b2, b3);
            mma_rows8(acc[2 * dq + 1][0], acc[2 * dq + 1][1], pa_lo[0], pa_lo[1], b2, b3);
        }
    }
    cp_async_wait<0>();
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);

    // The warps' partials to shared memory as they are ([G][warp * D + d],
    // each relative to its warp's max), then the same end as the SIMT
    // kernel.
    float* sm_acc = (float*)smem;
    float* sm_m = (float*)(smem + Smem::A);
    float* sm_l = sm_m + MMA_WARPS * G;
    __syncthreads();
    if (qr < G) {
        if (qc == 0) {
            sm_m[warp * G + qr] = m;
            sm_l[warp * G + qr] = l;
        }
#pragma unroll
        for (int t = 0; t < 2 * KSTEPS; t++)
            *(float2*)(sm_acc + qr * MMA_WARPS * D + warp * D + 8 * t + 2 * qc) = make_float2(acc[t][0], acc[t][1]);
    }
    __syncthreads();
    combine_rows<D, G, MMA_WARPS>(p, row, yi, ny, h0, split, smem, sm_m);
}

#define ATTN_MMA(D, G, P)                                                                     \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS, 2)                             \
        attention_f32_d##D##_g##G##_mma##P(const AttnParams p) {                             \
        attention_mma_cta<D, G, P>(p);                                                       \
    }
// Measured beside the default (Llama-3 shape); slower than the SIMT loop.
ATTN_MMA(128, 4, 3)

// Its read-only twin and its timeline variant (benchmarks only).
extern "C" __global__ void __launch_bounds__(FRAG_THREADS, 4) attention_f32_d128_g4_frag_read(
    const AttnParams p) {
    attention_frag_cta<128, 4, false>(p);
}
extern "C" __global__ void __launch_bounds__(FRAG_THREADS, 4) attention_f32_d128_g4_frag_tl(const AttnParams p) {
    attention_frag_cta<128, 4, true, true>(p);
}
// Alternatives measured by `tacflowd bench-attention` (Llama-3 shape); the
// first, the SIMT loop as the daemon runs it elsewhere, was its default here
// before the tensor-core loop.
ATTN_PF(128, 4, 4)
ATTN_RING(128, 4, 4, 3, 4)
ATTN_K(128, 4, 4, 1, LOAD_DIRECT, direct, true, , 4)
ATTN_K(128, 4, 4, 3, LOAD_RING, ring, false, _read, 4)
ATTN_K(128, 4, 2, 1, LOAD_PREFETCH, prefetch, true, , 4)
ATTN_KS(128, 4, 2, 1, LOAD_PREFETCH, prefetch, true, true, _nc, 4)
// The default with a timeline (bench-attention --timeline).
ATTN_KT(128, 4, 2, 1, LOAD_PREFETCH, prefetch, true, true, true, true, _nc_lean_tl, 4)
