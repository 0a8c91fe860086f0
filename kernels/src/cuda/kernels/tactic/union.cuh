// The GQA union of one (sequence, KV head): the chunked greedy of
// kernels/src/tactic/union.rs (its module doc has the argument), a block
// per problem. The tail is selected first; then each query head in turn
// looks at the next UNION_WARPS clusters of its order, a warp computing one
// candidate's exact masses for every head of the group (lanes over its
// members), and thread 0 scans the chunk for where the sequential greedy
// stops and takes the clusters before it, updating every head's exact mass
// Z and estimate R with the CPU's arithmetic, in the same order. The
// selected slots are marked in a bitmap and written out in ascending order.

__device__ __forceinline__ bool union_taken(const u32* taken, u32 c) {
    return (taken[c >> 5] >> (c & 31)) & 1u;
}

// R without a cluster of relative log-estimate `lest`: the CPU's
// `(r - exp(lest) * margin).max(0)`, with nothing fused into an FMA.
__device__ __forceinline__ double union_less(double r, float lest, double margin) {
    return fmax(__dsub_rn(r, __dmul_rn(exp((double)lest), margin)), 0.0);
}

// Marks the members of cluster `c` (lanes of one warp).
__device__ __forceinline__ void union_mark(const TacHead& st, u32* bitmap, u32 c, u32 lane) {
    for (u32 m = st.offsets[c] + lane; m < st.offsets[c + 1]; m += 32) {
        const u32 s = st.members[m];
        atomicOr(&bitmap[s >> 5], 1u << (s & 31));
    }
}

// grid (problems), UNION_WARPS warps.
extern "C" __global__ void tactic_sel_union_bf16(const SelParams p) {
    const u32 pi = blockIdx.x, tid = threadIdx.x, bd = blockDim.x;
    const u32 warp = tid >> 5, lane = tid & 31, d = p.d, G = p.group;
    const SelProblem& pr = p.probs[pi];
    const TacHead st = tac_head(pr.state, pr.lay, pr.head);
    const u32 count = *st.count, cap = pr.lay.cap, len = pr.lay.len, ctx = pr.ctx_len;
    const u32 tail = ctx - len;
    __shared__ float sq[TAC_MAX_GROUP][TAC_MAX_D];
    __shared__ float ref[TAC_MAX_GROUP];
    __shared__ double z[TAC_MAX_GROUP], r[TAC_MAX_GROUP];
    __shared__ double mass[UNION_WARPS][TAC_MAX_GROUP];
    __shared__ u32 cand[UNION_WARPS], take[UNION_WARPS];
    __shared__ u32 stop_at;
    __shared__ double red[32];
    __shared__ u32 scan[32];
    for (u32 x = tid; x < G * d; x += bd) sq[x / d][x % d] = p.qs[((u64)pi * G) * d + x];
    if (tid < G) ref[tid] = tac_unordered(p.refs[pi * G + tid]);
    u32* bitmap = p.bitmap + pr.wbase;
    u32* taken = p.taken + pr.tkbase;
    const u32 words = (ctx + 31) / 32;
    for (u32 w = tid; w < words; w += bd) bitmap[w] = 0;
    for (u32 w = tid; w < (cap + 31) / 32; w += bd) taken[w] = 0;
    __syncthreads();
    // The tail: selected, its exact mass in Z (f64 exponentials, as the CPU).
    for (u32 s = len + tid; s < ctx; s += bd) atomicOr(&bitmap[s >> 5], 1u << (s & 31));
    for (u32 g = 0; g < G; g++) {
        const float* ts = p.tail + pr.tbase + (u64)g * tail;
        double acc = 0.0;
        for (u32 t = tid; t < tail; t += bd) acc += exp((double)__fsub_rn(ts[t], ref[g]));
        acc = block_sum_f64(acc, red);
        if (tid == 0) z[g] = acc;
    }
    // Estimates relative to the reference; R is their sum times the margin.
    for (u32 g = 0; g < G; g++) {
        float* le = p.lest + pr.cbase + (u64)g * cap;
        double acc = 0.0;
        for (u32 c = tid; c < count; c += bd) {
            const float v = __fsub_rn(le[c], ref[g]);
            le[c] = v;
            acc += exp((double)v);
        }
        acc = block_sum_f64(acc, red);
        if (tid == 0) r[g] = __dmul_rn(acc, (double)pr.margin);
    }
    __syncthreads();
    const double target = (double)pr.p, margin = (double)pr.margin;
    for (u32 g = 0; g < G; g++) {
        const u64* order = p.keys + pr.kbase + (u64)g * pr.kpow;
        u32 ptr = 0;
        while (true) {
            __syncthreads();
            if (!(z[g] < target * (z[g] + r[g])) || ptr >= count) break;
            const u32 ncand = min((u32)UNION_WARPS, count - ptr);
            if (warp < ncand) {
                const u32 c = (u32)order[ptr + warp];
                if (lane == 0) cand[warp] = c;
                if (!union_taken(taken, c)) {
                    double acc[TAC_MAX_GROUP];
#pragma unroll
                    for (int h = 0; h < TAC_MAX_GROUP; h++) acc[h] = 0.0;
                    for (u32 m = st.offsets[c] + lane; m < st.offsets[c + 1]; m += 32) {
                        const bf16* row = tac_row(p.k, p.tables + p.table_off[pr.row], p.kv_heads,
                                                  pr.head, d, st.members[m]);
#pragma unroll
                        for (int h = 0; h < TAC_MAX_GROUP; h++) {
                            if (h < (int)G) {
                                const float s = tac_dot8_bf16(sq[h], row, d);
                                acc[h] += (double)(float)exp((double)__fsub_rn(s, ref[h]));
                            }
                        }
                    }
#pragma unroll
                    for (int h = 0; h < TAC_MAX_GROUP; h++) {
                        const double v = warp_sum_f64(acc[h]);
                        if (lane == 0 && h < (int)G) mass[warp][h] = v;
                    }
                }
            }
            __syncthreads();
            if (tid == 0) {
                // Where the sequential greedy stops in this chunk...
                double zz = z[g], rr = r[g];
                u32 stop = ncand;
                for (u32 i = 0; i < ncand; i++) {
                    if (!(zz < target * (zz + rr))) {
                        stop = i;
                        break;
                    }
                    if (!union_taken(taken, cand[i])) {
                        zz += mass[i][g];
                        rr = union_less(rr, p.lest[pr.cbase + (u64)g * cap + cand[i]], margin);
                    }
                }
                // ... and what it takes before the stop, every head updated.
                for (u32 i = 0; i < ncand; i++) {
                    const u32 c = cand[i];
                    take[i] = i < stop && !union_taken(taken, c);
                    if (!take[i]) continue;
                    taken[c >> 5] |= 1u << (c & 31);
                    for (u32 h = 0; h < G; h++) {
                        z[h] += mass[i][h];
                        r[h] = union_less(r[h], p.lest[pr.cbase + (u64)h * cap + c], margin);
                    }
                }
                stop_at = stop;
            }
            __syncthreads();
            const u32 stop = stop_at;
            if (warp < ncand && take[warp]) union_mark(st, bitmap, cand[warp], lane);
            ptr += stop;
            if (stop < ncand) break;
        }
    }
    __syncthreads();
    if (tid < G) p.est[pi * G + tid] = (float)(z[tid] / (z[tid] + r[tid]));
    // The bitmap as a list of slots, ascending: each thread a run of words.
    const u32 per = (words + bd - 1) / bd;
    const u32 a = min(tid * per, words), b = min(a + per, words);
    u32 n = 0;
    for (u32 w = a; w < b; w++) n += __popc(bitmap[w]);
    u32 total;
    u32 at = block_scan_u32(n, scan, &total);
    u32* list = p.list + pr.lbase;
    for (u32 w = a; w < b; w++) {
        u32 bits = bitmap[w];
        while (bits) {
            const u32 i = __ffs(bits) - 1;
            list[at++] = w * 32 + i;
            bits &= bits - 1;
        }
    }
    if (tid == 0) p.list_len[pi] = total;
}
