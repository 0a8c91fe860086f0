#include "emu.h"
#include "tactic_all.inc"
#include <fstream>

// The two baselines' kernels of tactic.cu on the CPU stand-in of emu.h,
// launched as kernels/src/cuda/tactic/{oracle,budget}.rs launch them:
// oracle_top_p (tactic/oracle.cuh), then fixed_budget (tactic/budget.cuh),
// each followed by the sparse attention and the diagnostics over its
// selection. kernels/examples/tactic_emu (its `baselines` module) writes
// the inputs (argv[1]) and reads the outputs (argv[2]).

struct In {
    std::vector<char> buf; size_t at = 0;
    template <class T> T get() { T v; std::memcpy(&v, &buf[at], sizeof(T)); at += sizeof(T); return v; }
    template <class T> std::vector<T> vec(size_t n) { std::vector<T> v(n); std::memcpy(v.data(), &buf[at], n * sizeof(T)); at += n * sizeof(T); return v; }
};

int main(int argc, char** argv) {
    (void)argc;
    In r;
    { std::ifstream f(argv[1], std::ios::binary); r.buf.assign(std::istreambuf_iterator<char>(f), {}); }
    const u32 d = r.get<u32>(), kvh = r.get<u32>(), G = r.get<u32>(), nblocks = r.get<u32>(), S = r.get<u32>();
    const float pm = r.get<float>();
    const u32 budget_tokens = r.get<u32>();
    std::vector<u32> ctx(S), table_off(S), tables;
    for (u32 s = 0; s < S; s++) {
        ctx[s] = r.get<u32>();
        const u32 nt = r.get<u32>(); table_off[s] = tables.size();
        auto t = r.vec<u32>(nt); tables.insert(tables.end(), t.begin(), t.end());
    }
    const size_t cache = (size_t)nblocks * kvh * 16 * d;
    auto K = r.vec<bf16>(cache), V = r.vec<bf16>(cache);
    const u32 qstride = kvh * G * d;
    auto Q = r.vec<float>((size_t)S * qstride);
    // The problems as oracle.rs lays them out.
    TacLayout lay{}; lay.kv_heads = kvh; lay.head_dim = d;
    std::vector<SelProblem> sp;
    u32 kb = 0, lb = 0, wb = 0, maxkpow = 1;
    for (u32 s = 0; s < S; s++) for (u32 h = 0; h < kvh; h++) {
        SelProblem q{}; q.state = 0; q.lay = lay; q.head = h; q.row = s; q.ctx_len = ctx[s];
        u32 kpow = 1; while (kpow < ctx[s]) kpow <<= 1;
        q.kbase = kb; kb += G * kpow; q.kpow = kpow; q.lbase = lb; lb += ctx[s]; q.wbase = wb; wb += (ctx[s] + 31) / 32;
        q.p = pm; q.margin = 1.0f; maxkpow = std::max(maxkpow, kpow); sp.push_back(q);
    }
    const u32 ns = sp.size();
    std::vector<float> scores(kb + 1, NAN);
    std::vector<u64> keys(kb + 1, 0x5a5a5a5a5a5a5a5aull);
    std::vector<u32> bitmap(wb + 1, 0xabababab), list(lb + 1, 0xffffffff), list_len(ns + 1, 0xffffffff);
    OracleParams op{};
    op.probs = sp.data(); op.qkv = Q.data(); op.k = K.data(); op.table_off = table_off.data(); op.tables = tables.data();
    op.scores = scores.data(); op.keys = keys.data(); op.bitmap = bitmap.data(); op.list = list.data(); op.list_len = list_len.data();
    op.problems = ns; op.qkv_stride = qstride; op.kv_heads = kvh; op.d = d; op.group = G; op.sort_smem = 256;
    auto g = [](u32 x, u32 y, u32 z = 1) { return dim3e{std::max(x, 1u), y, z}; };
    auto b = [](u32 x) { return dim3e{x, 1, 1}; };
    emu_launch(tactic_oracle_scores_bf16, g((maxkpow + 255) / 256, G, ns), b(256), 0, op);
    emu_launch(tactic_oracle_sort_u64, g(G, ns), b(1024), 8 * std::min(maxkpow, op.sort_smem), op);
    emu_launch(tactic_oracle_take_f64, g(ns, 1), b(32 * G), 0, op);
    std::ofstream f(argv[2], std::ios::binary);
    // The sparse attention and the diagnostics over the selection in
    // `list`, written out with it.
    auto attend_and_write = [&]() {
    const u32 splits = 2;
    std::vector<float> pacc((size_t)ns * splits * G * d + 1), pml((size_t)ns * splits * G * 2 + 1), out((size_t)S * qstride, NAN);
    SparseParams spp{};
    spp.probs = sp.data(); spp.qkv = Q.data(); spp.k = K.data(); spp.v = V.data(); spp.table_off = table_off.data(); spp.tables = tables.data();
    spp.list = list.data(); spp.list_len = list_len.data(); spp.part_acc = pacc.data(); spp.part_ml = pml.data(); spp.out = out.data();
    spp.problems = ns; spp.qkv_stride = qstride; spp.kv_heads = kvh; spp.group = G; spp.splits = splits; spp.out_row0 = 0; spp.out_stride = qstride;
    void (*att)(SparseParams) = d == 32 ? tactic_attention_d32_bf16 : d == 64 ? tactic_attention_d64_bf16 : d == 128 ? tactic_attention_d128_bf16 : tactic_attention_d256_bf16;
    emu_launch(att, g(splits, ns), b(128), 0, spp);
    emu_launch(tactic_attention_merge_f32, g(G, ns), b(128), 0, spp);
    std::vector<float> est(ns * G + 1, 0.0f);
    std::vector<double> diag((size_t)ns * (2 * G + 2), NAN);
    DiagParams dp{};
    dp.probs = sp.data(); dp.qkv = Q.data(); dp.k = K.data(); dp.table_off = table_off.data(); dp.tables = tables.data();
    dp.list = list.data(); dp.list_len = list_len.data(); dp.est = est.data(); dp.out = diag.data();
    dp.problems = ns; dp.qkv_stride = qstride; dp.kv_heads = kvh; dp.d = d; dp.group = G;
    emu_launch(tactic_diag_mass_bf16, g(G, ns), b(256), 0, dp);
    // Outputs: per problem its list; the attention's rows; the records.
    for (u32 i = 0; i < ns; i++) {
        f.write((const char*)&list_len[i], 4);
        f.write((const char*)&list[sp[i].lbase], 4 * (size_t)list_len[i]);
    }
    f.write((const char*)out.data(), 4 * out.size());
    f.write((const char*)diag.data(), 8 * diag.size());
    };
    attend_and_write();
    // --- fixed_budget: the problems as budget.rs lays them out.
    std::vector<SelProblem> bp = sp;
    u32 bkb = 0, btk = 0, bmax = 1;
    for (auto& q : bp) {
        const u32 pages = q.ctx_len / 16;
        u32 kpow = 1; while (kpow < pages) kpow <<= 1;
        q.kbase = bkb; bkb += G * kpow; q.kpow = kpow; q.tkbase = btk; btk += (pages + 31) / 32;
        bmax = std::max(bmax, kpow);
    }
    std::vector<u64> bkeys(bkb + 1, 0x5a5a5a5a5a5a5a5aull);
    std::vector<u32> taken(btk + 1, 0xabababab), budget(ns, budget_tokens);
    std::fill(bitmap.begin(), bitmap.end(), 0xabababab);
    std::fill(list.begin(), list.end(), 0xffffffff);
    BudgetParams bpp{};
    bpp.probs = bp.data(); bpp.qkv = Q.data(); bpp.k = K.data(); bpp.table_off = table_off.data(); bpp.tables = tables.data();
    bpp.budget = budget.data(); bpp.keys = bkeys.data(); bpp.taken = taken.data(); bpp.bitmap = bitmap.data(); bpp.list = list.data();
    bpp.list_len = list_len.data(); bpp.problems = ns; bpp.qkv_stride = qstride; bpp.kv_heads = kvh; bpp.d = d; bpp.group = G;
    emu_launch(tactic_budget_bounds_bf16, g(bmax, ns), b(128), 0, bpp);
    OracleParams sortp = op; sortp.probs = bp.data(); sortp.keys = bkeys.data();
    emu_launch(tactic_oracle_sort_u64, g(G, ns), b(1024), 8 * std::min(bmax, sortp.sort_smem), sortp);
    emu_launch(tactic_budget_take_u32, g(ns, 1), b(128), 0, bpp);
    sp = bp;
    attend_and_write();
    return 0;
}
