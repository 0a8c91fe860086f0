// Prefill attention on tensor cores: a tile of up to 64 consecutive query
// tokens of one sequence x one query head per CTA, over that sequence's
// paged keys, FlashAttention-2 style (kernels/ATTENTION.md, "Prefill
// chunks"). The decode kernel of attention.cu reads every key once per
// query token; here a CTA stages 64 keys at a time in shared memory and
// every one of its 64 query tokens uses them, through mma.sync m16n8k16.
//
// Four warps, 16 query rows each. Per key tile (64 keys = 4 pages):
//   S = Q K^T   (q in two bf16 halves, hi + lo, as the decode kernels do,
//                so scores are f32-accurate; K exact bf16)
//   online softmax in the log2 domain (q pre-scaled by log2(e)/sqrt(D))
//   O += P V    (p in two bf16 halves; V exact bf16)
// K and V of the next tile are fetched with cp.async while this one is
// computed (two buffers). Shared-memory rows are 16-byte chunks XORed with
// the row's low 3 bits, so ldmatrix reads 8 rows without bank conflicts.
//
// Causality is a per-row key count, as in attention.cu: row r sees keys
// [0, kv_len[r]). Keys past the tile's last visible key are zero-filled in
// shared memory (the cache may hold anything there) and masked to -inf.
//
// HILO (the daemon's kernels, prefill.cu) keeps q and p to ~2^-17 as two
// bf16 halves each, two mma per product; without it (the lab's
// prefill_variants.cu) they are rounded to bf16 once, as FlashAttention
// does: half the mma, bf16-level error.
//
// The CPU stand-in (kernels/emu, example prefill_emu) runs this file with
// the `#else` branches below and compares it with the CPU reference.

#define PF_BM 64
#define PF_BN 64
#define PF_THREADS 128

struct PrefillParams {
    const float* qkv;      // [rows, qkv_stride] f32, RoPE applied; query head h at columns h*D
    const bf16* k;         // this layer's K: [num_blocks, kv_heads, 16, D]
    const bf16* v;
    const u32* kv_len;     // [rows]: keys row r sees
    const u32* table_off;  // [rows]: start of row r's block table in `tables`
    const u32* tables;
    const u32* tiles;      // [n_tiles, 4]: first row, rows (1..=64), keys (the largest kv_len), 0
    float* out;            // [rows, num_heads * D]
    u32 qkv_stride;
    u32 num_heads;
    u32 kv_heads;
    u32 group;             // query heads per KV head
    float scale_log2;      // log2(e) / sqrt(D)
};

// --- the warp-level primitives, with their CPU stand-ins ---

__device__ __forceinline__ void pf_ldsm_x4(const bf16* p, u32 (&r)[4]) {
#ifdef __CUDA_ARCH__
    const u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#else
    emu_ldsm_x4(p, false, r);
#endif
}

__device__ __forceinline__ void pf_ldsm_x4_t(const bf16* p, u32 (&r)[4]) {
#ifdef __CUDA_ARCH__
    const u32 a = (u32)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
#else
    emu_ldsm_x4(p, true, r);
#endif
}

// d += a x b on m16n8k16, bf16 in, f32 accumulate (PTX register order).
__device__ __forceinline__ void pf_mma(float (&d)[4], const u32 (&a)[4], u32 b0, u32 b1) {
#ifdef __CUDA_ARCH__
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    emu_mma_16816(d, a, b0, b1);
#endif
}

// 16 bytes from global memory into shared memory, asynchronously; zeros
// instead when !valid (src is then not read).
__device__ __forceinline__ void pf_cp16(bf16* dst, const bf16* src, bool valid) {
#ifdef __CUDA_ARCH__
    const u32 a = (u32)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(a), "l"(src), "r"(valid ? 16u : 0u)
                 : "memory");
#else
    if (valid) std::memcpy(dst, src, 16);
    else std::memset(dst, 0, 16);
#endif
}

__device__ __forceinline__ void pf_commit() {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most N groups of this thread's copies are in flight.
template <int N>
__device__ __forceinline__ void pf_wait() {
#ifdef __CUDA_ARCH__
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// x and y as packed bf16 (x in the low half), rounded to nearest even, and
// what the rounding left over, packed the same way.
__device__ __forceinline__ void pf_split2(float x, float y, u32& hi, u32& lo) {
#ifdef __CUDA_ARCH__
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(hi) : "f"(y), "f"(x));
    const float rx = x - __uint_as_float(hi << 16), ry = y - __uint_as_float(hi & 0xffff0000u);
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(lo) : "f"(ry), "f"(rx));
#else
    hi = (u32)f2bf(x) | ((u32)f2bf(y) << 16);
    const float rx = x - __uint_as_float(hi << 16), ry = y - __uint_as_float(hi & 0xffff0000u);
    lo = (u32)f2bf(rx) | ((u32)f2bf(ry) << 16);
#endif
}

// Element offset of 16-byte chunk c of row r in a [rows][D] bf16 tile:
// the chunk index XORed with the row's low 3 bits.
template <int D>
__device__ __forceinline__ u32 pf_at(u32 r, u32 c) {
    return r * D + ((c ^ (r & 7u)) << 3);
}

// The query tile: rows [first, first + n) of head h, scaled, as bf16 hi
// and lo halves (lo unused without HILO); rows past n are zeros.
template <int D>
__device__ void pf_load_q(const PrefillParams& p, u32 first, u32 n, u32 h, bf16* qh, bf16* ql) {
    constexpr u32 CPR = D / 8;  // chunks per row
    for (u32 it = threadIdx.x; it < PF_BM * CPR; it += PF_THREADS) {
        const u32 r = it / CPR, c = it % CPR;
        u32 hi[4] = {0, 0, 0, 0}, lo[4] = {0, 0, 0, 0};
        if (r < n) {
            const float* src = p.qkv + (u64)(first + r) * p.qkv_stride + h * D + c * 8;
            const float4 a = *reinterpret_cast<const float4*>(src);
            const float4 b = *reinterpret_cast<const float4*>(src + 4);
            const float s = p.scale_log2;
            pf_split2(a.x * s, a.y * s, hi[0], lo[0]);
            pf_split2(a.z * s, a.w * s, hi[1], lo[1]);
            pf_split2(b.x * s, b.y * s, hi[2], lo[2]);
            pf_split2(b.z * s, b.w * s, hi[3], lo[3]);
        }
        *reinterpret_cast<uint4*>(qh + pf_at<D>(r, c)) = uint4{hi[0], hi[1], hi[2], hi[3]};
        *reinterpret_cast<uint4*>(ql + pf_at<D>(r, c)) = uint4{lo[0], lo[1], lo[2], lo[3]};
    }
}

// Starts the copies of key tile kt (keys [64 kt, 64 kt + 64)) of KV head
// kvh into ks / vs; keys at or past n_keys become zeros.
template <int D>
__device__ void pf_load_kv(const PrefillParams& p, u32 toff, u32 kvh, u32 kt, u32 n_keys, bf16* ks, bf16* vs) {
    constexpr u32 CPR = D / 8;
    for (u32 it = threadIdx.x; it < PF_BN * CPR; it += PF_THREADS) {
        const u32 r = it / CPR, c = it % CPR;
        const u32 key = kt * PF_BN + r;
        const bool valid = key < n_keys;
        u64 at = 0;
        if (valid) {
            const u32 block = p.tables[toff + key / BLOCK_TOKENS];
            at = ((u64)(block * p.kv_heads + kvh) * BLOCK_TOKENS + key % BLOCK_TOKENS) * D + c * 8;
        }
        pf_cp16(ks + pf_at<D>(r, c), p.k + at, valid);
        pf_cp16(vs + pf_at<D>(r, c), p.v + at, valid);
    }
}

// S (this warp's 16 rows x 64 keys) = Q K^T, q as hi (+ lo).
template <int D, bool HILO>
__device__ __forceinline__ void pf_scores(const bf16* qh, const bf16* ql, const bf16* ks, u32 warp, u32 lane,
                                          float (&s)[8][4]) {
#pragma unroll
    for (int nt = 0; nt < 8; nt++) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
    const u32 j = lane >> 3;
    const u32 qrow = warp * 16 + (lane & 7) + 8 * (j & 1);
#pragma unroll
    for (u32 kstep = 0; kstep < D / 16; kstep++) {
        u32 ah[4], al[4];
        pf_ldsm_x4(qh + pf_at<D>(qrow, 2 * kstep + (j >> 1)), ah);
        if constexpr (HILO) pf_ldsm_x4(ql + pf_at<D>(qrow, 2 * kstep + (j >> 1)), al);
#pragma unroll
        for (u32 pair = 0; pair < 4; pair++) {
            u32 b[4];
            pf_ldsm_x4(ks + pf_at<D>(16 * pair + (lane & 7) + 8 * (j >> 1), 2 * kstep + (j & 1)), b);
            pf_mma(s[2 * pair], ah, b[0], b[1]);
            pf_mma(s[2 * pair + 1], ah, b[2], b[3]);
            if constexpr (HILO) {
                pf_mma(s[2 * pair], al, b[0], b[1]);
                pf_mma(s[2 * pair + 1], al, b[2], b[3]);
            }
        }
    }
}

// The online softmax of one key tile: masks keys at or past each row's
// count, raises the running max m (rows g and g + 8 of the warp), rescales
// the lane's partial sums l and the accumulator, and turns s into p.
template <int D>
__device__ __forceinline__ void pf_softmax(float (&s)[8][4], u32 key0, const u32 (&len)[2], float (&m)[2],
                                           float (&l)[2], float (&o)[D / 8][4], u32 lane) {
    const u32 t = lane & 3;
    float mx[2] = {m[0], m[1]};
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const u32 key = key0 + 8 * nt + 2 * t + (e & 1);
            if (key >= len[e >> 1]) s[nt][e] = NEG_INF;
            mx[e >> 1] = fmaxf(mx[e >> 1], s[nt][e]);
        }
    }
    float sc[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
        mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
        // Every row sees key 0 in the first tile, so mx is finite from then on.
        sc[i] = exp2f(m[i] - mx[i]);
        m[i] = mx[i];
        l[i] *= sc[i];
    }
#pragma unroll
    for (int nt = 0; nt < 8; nt++) {
#pragma unroll
        for (int e = 0; e < 4; e++) {
            s[nt][e] = exp2f(s[nt][e] - m[e >> 1]);
            l[e >> 1] += s[nt][e];
        }
    }
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++) {
        o[dn][0] *= sc[0];
        o[dn][1] *= sc[0];
        o[dn][2] *= sc[1];
        o[dn][3] *= sc[1];
    }
}

// O += P V over the tile's 64 keys, p as hi (+ lo) (the C fragments of
// two key n-tiles are, lane for lane, the A fragment of one 16-key step).
template <int D, bool HILO>
__device__ __forceinline__ void pf_pv(const float (&s)[8][4], const bf16* vs, u32 lane, float (&o)[D / 8][4]) {
    const u32 j = lane >> 3;
#pragma unroll
    for (u32 kk = 0; kk < 4; kk++) {
        u32 ah[4], al[4];
        pf_split2(s[2 * kk][0], s[2 * kk][1], ah[0], al[0]);
        pf_split2(s[2 * kk][2], s[2 * kk][3], ah[1], al[1]);
        pf_split2(s[2 * kk + 1][0], s[2 * kk + 1][1], ah[2], al[2]);
        pf_split2(s[2 * kk + 1][2], s[2 * kk + 1][3], ah[3], al[3]);
        const u32 vrow = 16 * kk + (lane & 7) + 8 * (j & 1);
#pragma unroll
        for (u32 dn = 0; dn < D / 8; dn += 2) {
            u32 b[4];
            pf_ldsm_x4_t(vs + pf_at<D>(vrow, dn + (j >> 1)), b);
            pf_mma(o[dn], ah, b[0], b[1]);
            pf_mma(o[dn + 1], ah, b[2], b[3]);
            if constexpr (HILO) {
                pf_mma(o[dn], al, b[0], b[1]);
                pf_mma(o[dn + 1], al, b[2], b[3]);
            }
        }
    }
}

// The normalised rows of this warp (those below n) to out.
template <int D>
__device__ __forceinline__ void pf_store(const PrefillParams& p, u32 first, u32 n, u32 h, u32 warp, u32 lane,
                                         const float (&o)[D / 8][4], float (&l)[2]) {
    const u32 g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
    }
#pragma unroll
    for (int i = 0; i < 2; i++) {
        const u32 r = warp * 16 + g + 8 * i;
        if (r >= n) continue;
        const float inv = 1.0f / l[i];
        float* dst = p.out + (u64)(first + r) * p.num_heads * D + h * D + 2 * t;
#pragma unroll
        for (int dn = 0; dn < D / 8; dn++) {
            float2 w;
            w.x = o[dn][2 * i] * inv;
            w.y = o[dn][2 * i + 1] * inv;
            *reinterpret_cast<float2*>(dst + 8 * dn) = w;
        }
    }
}

// Shared memory: q hi, q lo, then two buffers of K and V, each [64][D] bf16.
template <int D, bool HILO>
__device__ void prefill_cta(const PrefillParams& p, bf16* smem) {
    const u32 warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const u32 h = blockIdx.x, tile = blockIdx.y;
    const u32 first = p.tiles[4 * tile], n = p.tiles[4 * tile + 1], n_keys = p.tiles[4 * tile + 2];
    const u32 kvh = h / p.group, toff = p.table_off[first];
    bf16* qh = smem;
    bf16* ql = qh + PF_BM * D;
    bf16* kbuf = ql + PF_BM * D;  // [2][64][D] K, then [2][64][D] V
    bf16* vbuf = kbuf + 2 * PF_BN * D;
    pf_load_q<D>(p, first, n, h, qh, ql);
    // Rows past n see every key of the tile (their results are not written).
    const u32 g = lane >> 2;
    u32 len[2];
    for (int i = 0; i < 2; i++) {
        const u32 r = warp * 16 + g + 8 * i;
        len[i] = r < n ? p.kv_len[first + r] : n_keys;
    }
    u32 warp_keys = len[0] > len[1] ? len[0] : len[1];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const u32 other = __shfl_xor_sync(0xffffffffu, warp_keys, o);
        warp_keys = other > warp_keys ? other : warp_keys;
    }
    float o[D / 8][4];
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF}, l[2] = {0.0f, 0.0f};
    const u32 tiles = (n_keys + PF_BN - 1) / PF_BN;
    pf_load_kv<D>(p, toff, kvh, 0, n_keys, kbuf, vbuf);
    pf_commit();
    for (u32 kt = 0; kt < tiles; kt++) {
        const u32 buf = kt & 1;
        if (kt + 1 < tiles) {
            pf_load_kv<D>(p, toff, kvh, kt + 1, n_keys, kbuf + (buf ^ 1) * PF_BN * D, vbuf + (buf ^ 1) * PF_BN * D);
            pf_commit();
            pf_wait<1>();
        } else {
            pf_wait<0>();
        }
        __syncthreads();
        // A warp whose rows see none of this tile's keys skips it.
        if (kt * PF_BN < warp_keys) {
            float s[8][4];
            pf_scores<D, HILO>(qh, ql, kbuf + buf * PF_BN * D, warp, lane, s);
            pf_softmax<D>(s, kt * PF_BN, len, m, l, o, lane);
            pf_pv<D, HILO>(s, vbuf + buf * PF_BN * D, lane, o);
        }
        __syncthreads();  // the buffer is refilled by the next iteration's copies
    }
    pf_store<D>(p, first, n, h, warp, lane, o, l);
}

