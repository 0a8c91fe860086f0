#include "emu.h"
#include "tactic_all.inc"
#include <fstream>

// The Tactic kernels of tactic.cu on the CPU stand-in of emu.h, launched as
// kernels/src/cuda/tactic/ launches them: k-means of every (sequence, KV
// head) in two runs (a first decode step's, then the rest appended into a
// grown copy: the re-clustering path), the selection on states the CPU
// clustered, the sparse attention over it and its diagnostics.
// kernels/examples/tactic_emu writes the inputs (argv[1]), reads the
// outputs (argv[2]) and compares them with the CPU reference; argv[3] is
// the longest sort kept in shared memory.

// Inputs written by the example, outputs read back by it.
struct Reader {
    std::vector<char> buf; size_t at = 0;
    template <class T> T get() { T v; std::memcpy(&v, &buf[at], sizeof(T)); at += sizeof(T); return v; }
    template <class T> std::vector<T> vec(size_t n) { std::vector<T> v(n); std::memcpy(v.data(), &buf[at], n * sizeof(T)); at += n * sizeof(T); return v; }
};
struct Writer {
    std::vector<char> buf;
    template <class T> void put(T v) { const char* p = (const char*)&v; buf.insert(buf.end(), p, p + sizeof(T)); }
    template <class T> void vec(const std::vector<T>& v) { const char* p = (const char*)v.data(); buf.insert(buf.end(), p, p + v.size() * sizeof(T)); }
};
static TacLayout read_layout(Reader& r) {
    TacLayout l;
    l.kv_heads = r.get<u32>(); l.head_dim = r.get<u32>(); l.cap = r.get<u32>(); l.len = r.get<u32>();
    l.count = r.get<u64>(); l.trace = r.get<u64>(); l.centroids = r.get<u64>(); l.log_size = r.get<u64>();
    l.spread = r.get<u64>(); l.offsets = r.get<u64>(); l.members = r.get<u64>(); l.shape = r.get<u64>(); l.bytes = r.get<u64>();
    return l;
}
template <class T> u64 P(std::vector<T>& v) { return (u64)v.data(); }

int main(int argc, char** argv) {
    Reader r;
    { std::ifstream f(argv[1], std::ios::binary); r.buf.assign(std::istreambuf_iterator<char>(f), {}); }
    const u32 d = r.get<u32>(), kvh = r.get<u32>(), G = r.get<u32>(), nblocks = r.get<u32>(), S = r.get<u32>(), iters = r.get<u32>();
    const u64 seed = r.get<u64>();
    const float pm = r.get<float>(), margin = r.get<float>();
    std::vector<u32> ctx(S), len(S), table_off(S), tables;
    for (u32 s = 0; s < S; s++) {
        ctx[s] = r.get<u32>(); len[s] = r.get<u32>();
        u32 nt = r.get<u32>(); table_off[s] = tables.size();
        auto t = r.vec<u32>(nt); tables.insert(tables.end(), t.begin(), t.end());
    }
    const size_t cache = (size_t)nblocks * kvh * 16 * d;
    auto K = r.vec<bf16>(cache), V = r.vec<bf16>(cache);
    const u32 qstride = kvh * G * d;
    auto Q = r.vec<float>((size_t)S * qstride);
    std::vector<TacLayout> la(S), la2(S), lb(S);
    std::vector<std::vector<char>> sa(S), sa2(S), sb(S);
    std::vector<u32> ks(S), ks2(S), start2(S), len1(S);
    std::vector<std::vector<u64>> copies(S);
    for (u32 s = 0; s < S; s++) {
        la[s] = read_layout(r); ks[s] = r.get<u32>(); len1[s] = r.get<u32>();
        sa[s].assign(la[s].bytes, (char)0xff);
        // count, trace and shape start zeroed (a fresh state), the rest poisoned.
        std::memset(&sa[s][la[s].count], 0, 4 * kvh);
        std::memset(&sa[s][la[s].trace], 0, 8 * kvh);
        std::memset(&sa[s][la[s].shape], 0, 4 * kvh * d * d);
        la2[s] = read_layout(r); ks2[s] = r.get<u32>(); start2[s] = r.get<u32>();
        u32 nc = r.get<u32>(); copies[s] = r.vec<u64>(3 * nc);
        sa2[s].assign(la2[s].bytes, (char)0xff);
        lb[s] = read_layout(r);
        sb[s] = r.vec<char>(lb[s].bytes);
    }
    auto g = [](u32 x, u32 y, u32 z = 1) { return dim3e{std::max(x, 1u), y, z}; };
    auto b = [](u32 x) { return dim3e{x, 1, 1}; };
    // --- k-means in two runs: slots 0..len1 into a fresh state, then the
    // rest appended into a grown copy (the re-clustering path).
    auto kmeans = [&](auto st_of, auto lay_of, auto start_of, auto n_of, auto k_of) {
    
    std::vector<KmProblem> kp;
    u32 work = 0, kwork = 0, koff = 0, maxn = 0, maxk = 0;
    for (u32 s = 0; s < S; s++) for (u32 h = 0; h < kvh; h++) {
        if (n_of(s) == 0) continue;
        KmProblem q{}; q.state = (u64)st_of(s); q.lay = lay_of(s); q.head = h; q.row = s; q.start = start_of(s); q.n = n_of(s); q.k = k_of(s);
        q.work = work; q.kwork = kwork; q.koff = koff; work += q.n; kwork += q.k; koff += q.k + 1;
        maxn = std::max(maxn, q.n); maxk = std::max(maxk, q.k); kp.push_back(q);
    }
    const u32 np = kp.size(), rounds = iters + 1;
    std::vector<float> cent((size_t)kwork * d + 1), norms(kwork + 1);
    std::vector<u32> assign(work + 1, 0xdeadbeef), counts(kwork + 1), offs(koff + 1), members(work + 1), changed(rounds * np + 1, 0);
    std::vector<double> mu((size_t)kwork * d + 1), cov((size_t)np * d * d + 1);
    KmParams kmp{};
    kmp.probs = kp.data(); kmp.k = K.data(); kmp.table_off = table_off.data(); kmp.tables = tables.data();
    kmp.cent = cent.data(); kmp.norms = norms.data(); kmp.assign = assign.data(); kmp.counts = counts.data();
    kmp.offs = offs.data(); kmp.members = members.data(); kmp.changed = changed.data(); kmp.mu = mu.data(); kmp.cov = cov.data();
    kmp.seed = seed; kmp.problems = np; kmp.kv_heads = kvh; kmp.d = d; kmp.round = 0;
    if (np > 0) {
        emu_launch(tactic_km_init_bf16, g(maxk, np), b(32), 0, kmp);
        for (u32 rr = 0; rr < rounds; rr++) {
            kmp.round = rr;
            emu_launch(tactic_km_assign_bf16, g((maxn + 127) / 128, np), b(128), 4 * 32 * (d + 1), kmp);
            emu_launch(tactic_km_csr_u32, g(np, 1), b(1024), 0, kmp);
            emu_launch(tactic_km_update_bf16, g((maxk + 7) / 8, np), b(256), 0, kmp);
        }
        emu_launch(tactic_km_compact_u32, g(np, 1), b(1024), 0, kmp);
        emu_launch(tactic_km_stats_bf16, g((maxk + 7) / 8, np), b(256), 0, kmp);
        emu_launch(tactic_km_shape_bf16, g(d / 8, np), b(256), 8 * 8 * d, kmp);
        emu_launch(tactic_km_shape_norm_f64, g(np, 1), b(256), 0, kmp);
    }
    u32 rounds_run = 0;
    for (u32 rr = 0; rr < rounds; rr++) for (u32 i = 0; i < np; i++) rounds_run += changed[rr * np + i];
    fprintf(stderr, "  k-means run: %u problems, %u (round, problem) assignments changed\n", np, rounds_run);
    };
    kmeans([&](u32 s) { return sa[s].data(); }, [&](u32 s) { return la[s]; }, [&](u32) { return 0u; },
           [&](u32 s) { return len1[s]; }, [&](u32 s) { return ks[s]; });
    for (u32 s = 0; s < S; s++)
        for (size_t c = 0; c < copies[s].size(); c += 3)
            std::memcpy(&sa2[s][copies[s][c + 1]], &sa[s][copies[s][c]], copies[s][c + 2]);
    kmeans([&](u32 s) { return sa2[s].data(); }, [&](u32 s) { return la2[s]; }, [&](u32 s) { return start2[s]; },
           [&](u32 s) { return len[s] - start2[s]; }, [&](u32 s) { return ks2[s]; });
    // --- selection on the given (CPU) states
    std::vector<SelProblem> sp;
    u32 cb = 0, kb = 0, tb = 0, lbase = 0, wb = 0, tkb = 0, maxkpow = 1;
    for (u32 s = 0; s < S; s++) for (u32 h = 0; h < kvh; h++) {
        SelProblem q{}; q.state = (u64)sb[s].data(); q.lay = lb[s]; q.head = h; q.row = s; q.ctx_len = ctx[s];
        u32 cap = lb[s].cap, kpow = 1; while (kpow < std::max(cap, 1u)) kpow <<= 1;
        q.cbase = cb; cb += G * cap; q.kbase = kb; kb += G * kpow; q.kpow = kpow; q.tbase = tb; tb += G * (ctx[s] - lb[s].len);
        q.lbase = lbase; lbase += ctx[s]; q.wbase = wb; wb += (ctx[s] + 31) / 32; q.tkbase = tkb; tkb += (cap + 31) / 32;
        q.p = pm; q.margin = margin; maxkpow = std::max(maxkpow, kpow); sp.push_back(q);
    }
    const u32 ns = sp.size();
    std::vector<float> qs((size_t)ns * G * d + 1), qvar(ns * G + 1), lest(cb + 1), tail(tb + 1), est(ns * G + 1);
    std::vector<u32> refs(ns * G + 1), bitmap(wb + 1, 0xabababab), taken(tkb + 1, 0xabababab), list(lbase + 1, 0xffffffff), list_len(ns + 1);
    std::vector<u64> keys(kb + 1);
    SelParams sel{};
    sel.probs = sp.data(); sel.qkv = Q.data(); sel.k = K.data(); sel.table_off = table_off.data(); sel.tables = tables.data();
    sel.qs = qs.data(); sel.qvar = qvar.data(); sel.refs = refs.data(); sel.lest = lest.data(); sel.keys = keys.data(); sel.tail = tail.data();
    sel.bitmap = bitmap.data(); sel.taken = taken.data(); sel.list = list.data(); sel.list_len = list_len.data(); sel.est = est.data();
    sel.problems = ns; sel.qkv_stride = qstride; sel.kv_heads = kvh; sel.d = d; sel.group = G; sel.sort_smem = argc > 3 ? atoi(argv[3]) : 4096;
    emu_launch(tactic_sel_prep_bf16, g(G, ns), b(128), 0, sel);
    emu_launch(tactic_sel_score_f32, g((maxkpow + 127) / 128, G, ns), b(128), 0, sel);
    emu_launch(tactic_sel_rank_u64, g(G, ns), b(1024), 8 * std::min(maxkpow, sel.sort_smem), sel);
    emu_launch(tactic_sel_union_bf16, g(ns, 1), b(256), 0, sel);
    // --- the diagnostics of that selection
    std::vector<double> diag((size_t)ns * (2 * G + 2), NAN);
    DiagParams dp{};
    dp.probs = sp.data(); dp.qkv = Q.data(); dp.k = K.data(); dp.table_off = table_off.data(); dp.tables = tables.data();
    dp.list = list.data(); dp.list_len = list_len.data(); dp.est = est.data(); dp.out = diag.data();
    dp.problems = ns; dp.qkv_stride = qstride; dp.kv_heads = kvh; dp.d = d; dp.group = G;
    emu_launch(tactic_diag_mass_bf16, g(G, ns), b(256), 0, dp);
    // --- sparse attention over the selection
    u32 splits = 3;
    std::vector<float> pacc((size_t)ns * splits * G * d + 1), pml((size_t)ns * splits * G * 2 + 1), out((size_t)S * qstride, NAN);
    SparseParams spp{};
    spp.probs = sp.data(); spp.qkv = Q.data(); spp.k = K.data(); spp.v = V.data(); spp.table_off = table_off.data(); spp.tables = tables.data();
    spp.list = list.data(); spp.list_len = list_len.data(); spp.part_acc = pacc.data(); spp.part_ml = pml.data(); spp.out = out.data();
    spp.problems = ns; spp.qkv_stride = qstride; spp.kv_heads = kvh; spp.group = G; spp.splits = splits; spp.out_row0 = 0; spp.out_stride = qstride;
    void (*att)(SparseParams) = d == 32 ? tactic_attention_d32_bf16 : d == 64 ? tactic_attention_d64_bf16 : d == 128 ? tactic_attention_d128_bf16 : tactic_attention_d256_bf16;
    emu_launch(att, g(splits, ns), b(128), 0, spp);
    emu_launch(tactic_attention_merge_f32, g(G, ns), b(128), 0, spp);
    // --- outputs
    Writer w;
    for (u32 s = 0; s < S; s++) { w.put<u64>(sa2[s].size()); w.vec(sa2[s]); }
    for (u32 i = 0; i < ns; i++) {
        w.put<u32>(list_len[i]);
        std::vector<u32> l(list.begin() + sp[i].lbase, list.begin() + sp[i].lbase + list_len[i]);
        w.vec(l);
        std::vector<float> e(est.begin() + i * G, est.begin() + (i + 1) * G);
        w.vec(e);
    }
    w.vec(out);
    w.vec(diag);
    std::ofstream f(argv[2], std::ios::binary);
    f.write(w.buf.data(), w.buf.size());
    return 0;
}
