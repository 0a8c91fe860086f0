//! Every row-wise op over a middle range of rows, on the backend's last
//! lane: the range's rows must be what the op over all rows writes there
//! (bit for bit where each row's kernel is the same; to a tolerance for a
//! GEMM and the attention, whose plans depend on the row count), and every
//! other row must be left as it was: poisoned (NaN) for an output, the
//! input for an op in place.

use super::lanes::step_meta;
use super::report::{ATTN_TOL, F32_TOL, Row, compare_row};
use super::{Ctx, case, one_seq_meta, round_bf16};
use crate::backend::cuda::{Act, CudaBackend};
use crate::backend::{AttnDims, Backend, HostData, KvLayout};
use crate::error::Result;
use std::ops::Range;
use tacflow_kernels::cpu;

/// Rows of every case, and the range the op runs over.
const T: usize = 10;
const RANGE: Range<usize> = 3..8;

/// The row-range cases of the group `lanes`.
pub fn ranges(cx: &mut Ctx) -> Vec<Row> {
    let lane = cx.b.lanes() - 1;
    type Case = fn(&mut Ctx, usize) -> Result<Row>;
    let cases: [(&str, Case); 10] = [
        ("embed", embed),
        ("rmsnorm", rmsnorm),
        ("linear (GEMM)", linear),
        ("add_bias", add_bias),
        ("add", add),
        ("silu_mul", silu_mul),
        ("rope", rope),
        ("kv_append", kv_append),
        ("attention, two sequences", attention),
        ("gather_rows (logit rows 1..3 of 4)", gather),
    ];
    let mut rows = vec![];
    for (name, f) in cases {
        let name = format!("rows {RANGE:?} of {T}, lane {lane}: {name}");
        case(&mut rows, "lanes", name, || f(cx, lane));
    }
    rows
}

/// Runs `f` on `lane`, which first waits for lane 0 (where the inputs were
/// made) and which lane 0 then waits for (where they are read back).
fn on_lane<R>(b: &CudaBackend, lane: usize, f: impl FnOnce() -> Result<R>) -> Result<R> {
    let fork = b.new_event()?;
    b.signal(&fork)?;
    b.use_lane(lane)?;
    b.wait(&fork)?;
    let r = f();
    let join = b.new_event()?;
    b.signal(&join)?;
    b.use_lane(0)?;
    b.wait(&join)?;
    r
}

/// Rows `rows` of `inside`, the others of `outside` (`cols` wide).
fn expect(inside: &[f32], outside: &[f32], rows: &Range<usize>, cols: usize) -> Vec<f32> {
    let mut v = outside.to_vec();
    let span = rows.start * cols..rows.end * cols;
    v[span.clone()].copy_from_slice(&inside[span]);
    v
}

/// An output op: all of `n` rows into a poisoned activation, then `range`
/// of them on `lane` into another.
fn out_case(
    b: &CudaBackend,
    lane: usize,
    (n, range): (usize, Range<usize>),
    cols: usize,
    tol: f64,
    op: impl Fn(&mut Act, Range<usize>) -> Result<()>,
) -> Result<Row> {
    let mut whole = b.act_poisoned(n, cols, false)?;
    op(&mut whole, 0..n)?;
    let mut part = b.act_poisoned(n, cols, false)?;
    on_lane(b, lane, || op(&mut part, range.clone()))?;
    let nan = vec![f32::NAN; n * cols];
    let want = expect(&b.act_to_host(&whole)?, &nan, &range, cols);
    Ok(compare_row("lanes", "", &b.act_to_host(&part)?, &want, tol))
}

/// An op in place on `x` (`T` rows of `cols`): all rows, then `RANGE`.
fn inplace_case(
    b: &CudaBackend,
    lane: usize,
    (x, cols): (&[f32], usize),
    op: impl Fn(&mut Act, Range<usize>) -> Result<()>,
) -> Result<Row> {
    let mut whole = b.act_from_host(T, cols, x, false)?;
    op(&mut whole, 0..T)?;
    let mut part = b.act_from_host(T, cols, x, false)?;
    on_lane(b, lane, || op(&mut part, RANGE))?;
    let want = expect(&b.act_to_host(&whole)?, x, &RANGE, cols);
    Ok(compare_row("lanes", "", &b.act_to_host(&part)?, &want, 0.0))
}

fn embed(cx: &mut Ctx, lane: usize) -> Result<Row> {
    let (vocab, dim) = (300, 64);
    let table = cx.rand(vocab * dim, 0.0, 1.0);
    let tokens = cx.rand_u32(T, vocab as u32);
    let b = &cx.b;
    let m = b.matrix(vocab, dim, HostData::F32(&table))?;
    let step = b.begin_step(&one_seq_meta(&tokens))?;
    out_case(b, lane, (T, RANGE), dim, 0.0, |o, r| {
        b.embed(&step, &m, o, r)
    })
}

fn rmsnorm(cx: &mut Ctx, lane: usize) -> Result<Row> {
    let dim = 96;
    let (x, w) = (cx.rand(T * dim, 0.5, 2.0), cx.rand(dim, 1.0, 0.1));
    let b = &cx.b;
    let (xa, wv) = (
        b.act_from_host(T, dim, &x, false)?,
        b.vector(dim, HostData::F32(&w))?,
    );
    out_case(b, lane, (T, RANGE), dim, 0.0, |o, r| {
        b.rmsnorm(&xa, &wv, 1e-5, o, r)
    })
}

fn linear(cx: &mut Ctx, lane: usize) -> Result<Row> {
    let (k, n) = (96, 80);
    let (x, w) = (cx.rand(T * k, 0.0, 1.0), cx.rand(n * k, 0.0, 0.1));
    let b = &cx.b;
    let xa = b.act_from_host(T, k, &x, false)?;
    let wm = b.matrix(n, k, HostData::F32(&w))?;
    out_case(b, lane, (T, RANGE), n, F32_TOL, |o, r| {
        b.linear(&xa, &wm, o, r)
    })
}

fn add_bias(cx: &mut Ctx, lane: usize) -> Result<Row> {
    let cols = 48;
    let (x, bias) = (cx.rand(T * cols, 0.0, 1.0), cx.rand(cols, 0.0, 1.0));
    let b = &cx.b;
    let bv = b.vector(cols, HostData::F32(&bias))?;
    inplace_case(b, lane, (&x, cols), |a, r| b.add_bias(a, &bv, r))
}

fn add(cx: &mut Ctx, lane: usize) -> Result<Row> {
    let cols = 48;
    let (x, y) = (cx.rand(T * cols, 0.0, 1.0), cx.rand(T * cols, 0.0, 1.0));
    let b = &cx.b;
    let ya = b.act_from_host(T, cols, &y, false)?;
    inplace_case(b, lane, (&x, cols), |a, r| b.add(a, &ya, r))
}

fn silu_mul(cx: &mut Ctx, lane: usize) -> Result<Row> {
    let inter = 40;
    let g = cx.rand(T * 2 * inter, 0.0, 2.0);
    let b = &cx.b;
    let ga = b.act_from_host(T, 2 * inter, &g, false)?;
    out_case(b, lane, (T, RANGE), inter, 0.0, |o, r| {
        b.silu_mul(&ga, o, r)
    })
}

fn dims() -> AttnDims {
    AttnDims {
        num_heads: 8,
        num_kv_heads: 2,
        head_dim: 64,
    }
}

fn rope(cx: &mut Ctx, lane: usize) -> Result<Row> {
    let d = dims();
    let cols = d.qkv_dim();
    let x = cx.rand(T * cols, 0.0, 1.0);
    let mut meta = one_seq_meta(&[0; T]);
    meta.positions = cx.rand_u32(T, 4096);
    let b = &cx.b;
    let inv = cpu::rope_inv_freq(d.head_dim, 10_000.0, None);
    let inv = b.constants(&inv)?;
    let step = b.begin_step(&meta)?;
    inplace_case(b, lane, (&x, cols), |a, r| b.rope(&step, a, &inv, d, r))
}

fn kv_append(cx: &mut Ctx, lane: usize) -> Result<Row> {
    let d = dims();
    let layout = KvLayout {
        num_layers: 1,
        num_blocks: 4,
        block_size: 16,
        num_kv_heads: d.num_kv_heads,
        head_dim: d.head_dim,
    };
    let x = cx.rand(T * d.qkv_dim(), 0.0, 1.0);
    let mut meta = one_seq_meta(&[0; T]);
    // Slots in reverse, from the last block down.
    meta.slots = (0..T as u32).map(|i| 63 - 3 * i).collect();
    let b = &cx.b;
    let step = b.begin_step(&meta)?;
    let qkv = b.act_from_host(T, d.qkv_dim(), &x, false)?;
    let mut kv = b.kv_cache(&layout)?;
    b.kv_poison(&mut kv)?;
    on_lane(b, lane, || b.kv_append(&step, &qkv, &mut kv, 0, d, RANGE))?;
    let (gk, gv) = b.kv_to_host(&kv)?;
    let n = layout.num_blocks * layout.block_elems();
    let (mut wk, mut wv) = (vec![f32::NAN; n], vec![f32::NAN; n]);
    let w = d.qkv_dim();
    cpu::kv_append(
        &mut wk,
        &mut wv,
        (d.num_kv_heads, 16, d.head_dim),
        &round_bf16(&x[RANGE.start * w..RANGE.end * w]),
        w,
        d.q_dim(),
        &meta.slots[RANGE],
    );
    let got: Vec<f32> = gk.into_iter().chain(gv).collect();
    let want: Vec<f32> = wk.into_iter().chain(wv).collect();
    Ok(compare_row("lanes", "", &got, &want, 0.0))
}

/// Rows 0..6 end a 300-token context (blocks 0..19), rows 6..10 a 40-token
/// one (blocks 19..22); the cache is random but for the step's own keys,
/// and the range (3..8) takes rows of both.
fn attention(cx: &mut Ctx, lane: usize) -> Result<Row> {
    let d = dims();
    let layout = KvLayout {
        num_layers: 1,
        num_blocks: 24,
        block_size: 16,
        num_kv_heads: d.num_kv_heads,
        head_dim: d.head_dim,
    };
    let x = cx.rand(T * d.qkv_dim(), 0.0, 1.0);
    let (seed, b) = (cx.seed, &cx.b);
    let mut kv = b.kv_cache(&layout)?;
    let n = layout.num_blocks * layout.block_elems();
    b.gpu().random_bf16(&mut kv.k, n, seed, 31, 0.0, 1.0)?;
    b.gpu().random_bf16(&mut kv.v, n, seed, 32, 0.0, 1.0)?;
    let seqs = [
        (vec![0; 6], 294, (0..19).collect()),
        (vec![0; 4], 36, (19..22).collect()),
    ];
    let step = b.begin_step(&step_meta(&seqs, vec![]))?;
    let qkv = b.act_from_host(T, d.qkv_dim(), &x, false)?;
    b.kv_append(&step, &qkv, &mut kv, 0, d, 0..T)?;
    out_case(b, lane, (T, RANGE), d.q_dim(), ATTN_TOL, |o, r| {
        b.attention(&step, &qkv, &kv, 0, d, o, r)
    })
}

fn gather(cx: &mut Ctx, lane: usize) -> Result<Row> {
    let cols = 64;
    let x = cx.rand(T * cols, 0.0, 1.0);
    let mut meta = one_seq_meta(&[0; T]);
    meta.logit_rows = vec![1, 4, 6, 9];
    let b = &cx.b;
    let step = b.begin_step(&meta)?;
    let xa = b.act_from_host(T, cols, &x, false)?;
    out_case(b, lane, (4, 1..3), cols, 0.0, |o, r| {
        b.gather_rows(&step, &xa, o, r)
    })
}
