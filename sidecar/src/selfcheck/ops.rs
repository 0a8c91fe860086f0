//! Kernel checks: random weights, GEMM, the row-wise ops and the KV cache,
//! each on fresh random inputs against the CPU reference, outputs poisoned
//! (NaN) first. Sizes cross warp (32) and block (16 tokens) boundaries.

use super::report::{BF16_TOL, F32_TOL, Row, SPLIT_TOL, compare_row};
use super::{Ctx, case, one_seq_meta, round_bf16};
use crate::backend::{AttnDims, Backend, HostData, KvLayout};
use crate::error::Result;
use half::bf16;
use rayon::prelude::*;
use tacflow_kernels::cpu;
use tacflow_kernels::cuda::{RmsOut, Rows};
use tacflow_kernels::rng::random_weight;

/// Generated weights are bit-identical to the host's.
pub fn random(cx: &mut Ctx) -> Vec<Row> {
    let mut rows = vec![];
    let seed = cx.seed;
    for &(r, c, stream, mean, std) in &[
        (1000usize, 1003usize, 7u64, 0.0f32, 1.0f32),
        (3, 333_333, 2, 1.0, 0.1),
        (4096, 1024, 1 << 33, 0.0, 0.015_625),
    ] {
        case(
            &mut rows,
            "random",
            format!("{r}x{c} stream {stream}"),
            || {
                let m = cx.b.matrix(
                    r,
                    c,
                    HostData::Random {
                        seed,
                        stream,
                        mean,
                        std,
                    },
                )?;
                let got = cx.b.matrix_to_host(&m)?;
                let bad = (0..r * c)
                    .into_par_iter()
                    .filter(|&i| {
                        got[i] != bf16::from_f32(random_weight(seed, stream, i as u64, mean, std))
                    })
                    .count();
                Ok(Row::at_most("random", "", "mismatches", bad as f64, 0.0))
            },
        );
    }
    rows
}

/// `x · wᵀ` through cuBLAS against the CPU on the same bf16 values.
pub fn gemm(cx: &mut Ctx) -> Vec<Row> {
    let mut rows = vec![];
    for &(m, n, k, bf16_in) in &[
        (1usize, 4096usize, 4096usize, true),
        (17, 1000, 576, true),
        (33, 65, 129, true),
        (128, 6144, 4096, true),
        (257, 1536, 576, false),
        (1, 4096, 14_336, false),
        (33, 65, 129, false),
    ] {
        let name = format!(
            "{m}x{n}x{k} {}",
            if bf16_in {
                "bf16 in"
            } else {
                "f32 in (hi+lo halves)"
            }
        );
        case(&mut rows, "gemm", name, || {
            // bf16 inputs are bf16 values; f32 inputs are not (the GEMM
            // splits them into two bf16 halves).
            let raw = cx.rand(m * k, 0.0, 1.0);
            let x = if bf16_in { round_bf16(&raw) } else { raw };
            let w = cx.rand(n * k, 0.0, 1.0 / (k as f32).sqrt());
            let xa = cx.b.act_from_host(m, k, &x, bf16_in)?;
            let wm = cx.b.matrix(n, k, HostData::F32(&w))?;
            let mut out = cx.b.act_poisoned(m, n, false)?;
            cx.b.linear(&xa, &wm, &mut out, 0..m)?;
            let got = cx.b.act_to_host(&out)?;
            let mut want = vec![0.0; m * n];
            cpu::matmul_nt(&x, &round_bf16(&w), &mut want, m, n, k);
            let tol = if bf16_in { F32_TOL } else { SPLIT_TOL };
            Ok(compare_row("gemm", "", &got, &want, tol))
        });
    }
    rows
}

/// Embedding, RMSNorm, RoPE, SwiGLU, adds, gather, cast.
pub fn rowwise(cx: &mut Ctx) -> Vec<Row> {
    let mut rows = vec![];
    for &(t, vocab, dim) in &[
        (1usize, 1000usize, 4096usize),
        (33, 49_152, 576),
        (257, 512, 64),
    ] {
        case(&mut rows, "embed", format!("{t} rows of {dim}"), || {
            embed(cx, t, vocab, dim)
        });
    }
    for &(t, dim) in &[(1usize, 4096usize), (17, 576), (64, 100), (3, 4097)] {
        case(&mut rows, "rmsnorm", format!("bf16 out, {t}x{dim}"), || {
            rmsnorm(cx, t, dim, true)
        });
        case(&mut rows, "rmsnorm", format!("f32 out, {t}x{dim}"), || {
            rmsnorm(cx, t, dim, false)
        });
    }
    for &(t, heads, d, scaled) in &[
        (37usize, 6usize, 16usize, true),
        (5, 15, 64, false),
        (33, 48, 128, true),
    ] {
        case(
            &mut rows,
            "rope",
            format!(
                "{t} rows, {heads} heads of {d}{}",
                if scaled { ", llama3" } else { "" }
            ),
            || rope(cx, t, heads, d, scaled),
        );
    }
    for &(t, inter) in &[(1usize, 14_336usize), (31, 1536), (5, 100)] {
        case(&mut rows, "silu_mul", format!("{t}x{inter}"), || {
            silu(cx, t, inter)
        });
    }
    for &(t, cols) in &[(1usize, 4096usize), (65, 6144)] {
        case(&mut rows, "add", format!("{t}x{cols}"), || {
            add(cx, t, cols, false)
        });
        case(&mut rows, "add_bias", format!("{t}x{cols}"), || {
            add(cx, t, cols, true)
        });
    }
    case(&mut rows, "gather_rows", "5 of 40 rows of 4096", || {
        gather(cx)
    });
    case(&mut rows, "cast_bf16", "specials + 100003 randoms", || {
        cast(cx)
    });
    rows
}

fn embed(cx: &mut Ctx, t: usize, vocab: usize, dim: usize) -> Result<Row> {
    let table = cx.rand(vocab * dim, 0.0, 1.0);
    let mut tokens = cx.rand_u32(t, vocab as u32);
    tokens[0] = (vocab - 1) as u32;
    if t > 1 {
        tokens[1] = 0;
    }
    let m = cx.b.matrix(vocab, dim, HostData::F32(&table))?;
    let step = cx.b.begin_step(&one_seq_meta(&tokens))?;
    let mut out = cx.b.act_poisoned(t, dim, false)?;
    cx.b.embed(&step, &m, &mut out, 0..t)?;
    let mut want = vec![0.0; t * dim];
    cpu::embed(&round_bf16(&table), dim, &tokens, &mut want);
    Ok(compare_row(
        "embed",
        "",
        &cx.b.act_to_host(&out)?,
        &want,
        0.0,
    ))
}

fn rmsnorm(cx: &mut Ctx, t: usize, dim: usize, bf16_out: bool) -> Result<Row> {
    let x = cx.rand(t * dim, 0.5, 2.0);
    let w = cx.rand(dim, 1.0, 0.1);
    let mut want = vec![0.0; t * dim];
    cpu::rmsnorm(&x, &round_bf16(&w), 1e-5, &mut want);
    if !bf16_out {
        // The model's path: the backend (f32 out).
        let wv = cx.b.vector(dim, HostData::F32(&w))?;
        let xa = cx.b.act_from_host(t, dim, &x, false)?;
        let mut out = cx.b.act_poisoned(t, dim, false)?;
        cx.b.rmsnorm(&xa, &wv, 1e-5, &mut out, 0..xa.rows)?;
        return Ok(compare_row(
            "rmsnorm",
            "",
            &cx.b.act_to_host(&out)?,
            &want,
            F32_TOL,
        ));
    }
    // The bf16-output kernel is not on the model's path: call it directly.
    let gpu = cx.b.gpu();
    let xs = gpu.upload(&x)?;
    let ws = gpu.upload(&round_bf16(&w))?;
    let mut os = gpu.alloc_poisoned::<bf16>(t * dim)?;
    gpu.rmsnorm(
        &xs,
        &ws,
        1e-5,
        Rows { rows: t, cols: dim },
        RmsOut::from(&mut os),
    )?;
    let got: Vec<f32> = gpu
        .download(&os, t * dim)?
        .iter()
        .map(|v| v.to_f32())
        .collect();
    Ok(compare_row("rmsnorm", "", &got, &want, BF16_TOL))
}

fn rope(cx: &mut Ctx, t: usize, heads: usize, d: usize, scaled: bool) -> Result<Row> {
    let cols = heads * d + 2 * d; // a v part that must stay untouched
    let x = cx.rand(t * cols, 0.0, 1.0);
    let mut positions = cx.rand_u32(t, 131_072);
    positions[0] = 0;
    let scaling = scaled.then_some(cpu::RopeScaling {
        factor: 8.0,
        low_freq_factor: 1.0,
        high_freq_factor: 4.0,
        original_max_position_embeddings: 8192.0,
    });
    let inv = cpu::rope_inv_freq(d, 500_000.0, scaling);
    let mut meta = one_seq_meta(&vec![0; t]);
    meta.positions = positions.clone();
    let step = cx.b.begin_step(&meta)?;
    let mut qkv = cx.b.act_from_host(t, cols, &x, false)?;
    let inv_v = cx.b.constants(&inv)?;
    // Backend::rope rotates num_heads + num_kv_heads heads.
    let dims = AttnDims {
        num_heads: heads - 1,
        num_kv_heads: 1,
        head_dim: d,
    };
    cx.b.rope(&step, &mut qkv, &inv_v, dims, 0..t)?;
    let mut want = x.clone();
    cpu::rope(&mut want, cols, 0, heads, d, &positions, &inv);
    Ok(compare_row(
        "rope",
        "",
        &cx.b.act_to_host(&qkv)?,
        &want,
        F32_TOL,
    ))
}

fn silu(cx: &mut Ctx, t: usize, inter: usize) -> Result<Row> {
    let gu = cx.rand(t * 2 * inter, 0.0, 3.0);
    let a = cx.b.act_from_host(t, 2 * inter, &gu, false)?;
    let mut out = cx.b.act_poisoned(t, inter, false)?;
    cx.b.silu_mul(&a, &mut out, 0..t)?;
    let mut want = vec![0.0; t * inter];
    cpu::silu_mul(&gu, inter, &mut want);
    Ok(compare_row(
        "silu_mul",
        "",
        &cx.b.act_to_host(&out)?,
        &want,
        F32_TOL,
    ))
}

fn add(cx: &mut Ctx, t: usize, cols: usize, bias: bool) -> Result<Row> {
    let x = cx.rand(t * cols, 0.0, 1.0);
    let mut xa = cx.b.act_from_host(t, cols, &x, false)?;
    let mut want = x.clone();
    if bias {
        let b = cx.rand(cols, 0.0, 0.1);
        cx.b.add_bias(&mut xa, &cx.b.vector(cols, HostData::F32(&b))?, 0..t)?;
        cpu::add_bias(&mut want, &round_bf16(&b));
    } else {
        let y = cx.rand(t * cols, 0.0, 1.0);
        cx.b.add(&mut xa, &cx.b.act_from_host(t, cols, &y, false)?, 0..t)?;
        cpu::add_inplace(&mut want, &y);
    }
    let check = if bias { "add_bias" } else { "add" };
    Ok(compare_row(check, "", &cx.b.act_to_host(&xa)?, &want, 0.0))
}

fn gather(cx: &mut Ctx) -> Result<Row> {
    let (t, cols) = (40, 4096);
    let x = cx.rand(t * cols, 0.0, 1.0);
    let mut meta = one_seq_meta(&vec![0; t]);
    meta.logit_rows = vec![0, 15, 16, 17, 39];
    let step = cx.b.begin_step(&meta)?;
    let xa = cx.b.act_from_host(t, cols, &x, false)?;
    let mut out = cx.b.act_poisoned(5, cols, false)?;
    let n = out.rows;
    cx.b.gather_rows(&step, &xa, &mut out, 0..n)?;
    let want: Vec<f32> = meta
        .logit_rows
        .iter()
        .flat_map(|&r| x[r as usize * cols..(r as usize + 1) * cols].to_vec())
        .collect();
    Ok(compare_row(
        "gather_rows",
        "",
        &cx.b.act_to_host(&out)?,
        &want,
        0.0,
    ))
}

fn cast(cx: &mut Ctx) -> Result<Row> {
    let mut x = vec![
        0.0f32,
        -0.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-40,
        -3e-39,
        f32::MAX,
        1.0 + 1.0 / 256.0, // a tie: rounds to even (1.0)
        1.0 + 3.0 / 256.0, // a tie: rounds to even (1 + 1/64)
        f32::from_bits(0x3f80_8001),
    ];
    x.extend(cx.rand(100_003, 0.0, 1e3));
    let gpu = cx.b.gpu();
    let xs = gpu.upload(&x)?;
    let mut os = gpu.alloc_poisoned::<bf16>(x.len())?;
    gpu.cast_bf16(&xs, &mut os, x.len())?;
    let got = gpu.download(&os, x.len())?;
    let bad = got
        .iter()
        .zip(&x)
        .filter(|(g, v)| g.to_bits() != bf16::from_f32(**v).to_bits())
        .count();
    Ok(Row::at_most("cast_bf16", "", "mismatches", bad as f64, 0.0))
}

/// KV append into a poisoned cache, then copy-on-write block copies.
pub fn kv(cx: &mut Ctx) -> Vec<Row> {
    let mut rows = vec![];
    for &(kvh, d, t) in &[(2usize, 16usize, 37usize), (8, 128, 100), (3, 64, 1)] {
        case(
            &mut rows,
            "kv",
            format!("append + copy, {t} tokens, {kvh} heads of {d}"),
            || kv_case(cx, kvh, d, t),
        );
    }
    rows
}

fn kv_case(cx: &mut Ctx, kvh: usize, d: usize, t: usize) -> Result<Row> {
    let nh = kvh * 2;
    let dims = AttnDims {
        num_heads: nh,
        num_kv_heads: kvh,
        head_dim: d,
    };
    let layout = KvLayout {
        num_layers: 2,
        num_blocks: 24,
        block_size: 16,
        num_kv_heads: kvh,
        head_dim: d,
    };
    let mut kv = cx.b.kv_cache(&layout)?;
    cx.b.kv_poison(&mut kv)?;
    // Slots scattered over blocks 3.. in reverse order.
    let slots: Vec<u32> = (0..t)
        .map(|i| ((20 - i / 16) * 16 + i % 16) as u32)
        .collect();
    let mut meta = one_seq_meta(&vec![0; t]);
    meta.slots = slots.clone();
    let step = cx.b.begin_step(&meta)?;
    let x = cx.rand(t * dims.qkv_dim(), 0.0, 1.0);
    let qkv = cx.b.act_from_host(t, dims.qkv_dim(), &x, false)?;
    cx.b.kv_append(&step, &qkv, &mut kv, 1, dims, 0..t)?;
    let pairs = [(20u32, 2u32), (20 - (t as u32 - 1) / 16, 23)];
    cx.b.copy_blocks(&mut kv, &pairs)?;
    let (gk, gv) = cx.b.kv_to_host(&kv)?;
    let per_layer = layout.num_blocks * layout.block_elems();
    let mut wk = vec![f32::NAN; 2 * per_layer];
    let mut wv = wk.clone();
    cpu::kv_append(
        &mut wk[per_layer..],
        &mut wv[per_layer..],
        (kvh, 16, d),
        &round_bf16(&x),
        dims.qkv_dim(),
        dims.q_dim(),
        &slots,
    );
    let be = layout.block_elems();
    for layer in wk
        .chunks_exact_mut(per_layer)
        .chain(wv.chunks_exact_mut(per_layer))
    {
        for &(s, dst) in &pairs {
            layer.copy_within(s as usize * be..(s as usize + 1) * be, dst as usize * be);
        }
    }
    let got: Vec<f32> = gk.into_iter().chain(gv).collect();
    let want: Vec<f32> = wk.into_iter().chain(wv).collect();
    Ok(compare_row("kv", "", &got, &want, 0.0))
}
