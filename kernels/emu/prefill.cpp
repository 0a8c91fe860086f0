#include "emu.h"
#include "warp.h"
#include "prefill_all.inc"
#include <fstream>
#include <iterator>

// The prefill kernels of prefill.cu on the CPU stand-in of emu.h and
// warp.h, launched as kernels/src/cuda/prefill.rs launches them: one CTA
// per (query head, tile). kernels/examples/prefill_emu writes the inputs
// (argv[1]) and compares the output (argv[2]) with the CPU reference;
// argv[3] `bf16` runs the lab's variant (q and p rounded to bf16 once).
//
// Input: u32 d, num_heads, kv_heads, num_blocks, rows, qkv_stride,
// n_tiles, n_tables; u32 kv_len[rows], table_off[rows], tables[n_tables],
// tiles[4 n_tiles]; bf16 K and V [num_blocks, kv_heads, 16, d]; f32
// qkv[rows, qkv_stride]. Output: f32 out[rows, num_heads d] (rows no tile
// covers stay NaN).

int main(int argc, char** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: prefill_emu IN OUT [bf16]\n");
        return 2;
    }
    std::ifstream f(argv[1], std::ios::binary);
    std::vector<char> in((std::istreambuf_iterator<char>(f)), {});
    size_t at = 0;
    auto take = [&](void* dst, size_t bytes) {
        if (at + bytes > in.size()) {
            std::fprintf(stderr, "prefill_emu: input too short\n");
            std::exit(2);
        }
        std::memcpy(dst, &in[at], bytes);
        at += bytes;
    };
    u32 hdr[8];
    take(hdr, sizeof hdr);
    const u32 d = hdr[0], heads = hdr[1], kvh = hdr[2], blocks = hdr[3], rows = hdr[4], stride = hdr[5],
              n_tiles = hdr[6], n_tables = hdr[7];
    std::vector<u32> kv_len(rows), table_off(rows), tables(n_tables), tiles(4 * n_tiles);
    take(kv_len.data(), 4 * rows);
    take(table_off.data(), 4 * rows);
    take(tables.data(), 4 * n_tables);
    take(tiles.data(), 16 * n_tiles);
    const size_t cache = (size_t)blocks * kvh * 16 * d;
    std::vector<bf16> k(cache), v(cache);
    take(k.data(), 2 * cache);
    take(v.data(), 2 * cache);
    std::vector<float> qkv((size_t)rows * stride), out((size_t)rows * heads * d, NAN);
    take(qkv.data(), 4 * qkv.size());
    PrefillParams p{qkv.data(), k.data(), v.data(), kv_len.data(), table_off.data(), tables.data(),
                    tiles.data(), out.data(), stride, heads, kvh, heads / kvh,
                    1.4426950408889634f / std::sqrt((float)d)};
    const size_t smem = (2 * PF_BM + 4 * PF_BN) * d * 2;
    const dim3e grid{heads, n_tiles, 1}, block{PF_THREADS, 1, 1};
    const bool bf = argc > 3 && std::strcmp(argv[3], "bf16") == 0;
    if (d == 64) emu_launch(bf ? prefill_f32_d64_bf16 : prefill_f32_d64, grid, block, smem, p);
    else if (d == 128) emu_launch(bf ? prefill_f32_d128_bf16 : prefill_f32_d128, grid, block, smem, p);
    else {
        std::fprintf(stderr, "prefill_emu: no kernel for head size %u\n", d);
        return 2;
    }
    std::ofstream o(argv[2], std::ios::binary);
    o.write((const char*)out.data(), 4 * out.size());
    return o ? 0 : 1;
}
