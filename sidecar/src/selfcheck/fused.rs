//! The fused ops, bf16 activations and CUDA graphs: each fused op against
//! its CPU reference on fresh random inputs (outputs and the cache poisoned
//! first, a range of rows as well as all of them), a step captured as a
//! graph replayed against the same kernels run eagerly, and the tiny model
//! with bf16 activations against the CPU's twin and against the split mode.

use super::models::random_scenario;
use super::report::{BF16_TOL, F32_TOL, LOGITS_TOL, Row};
use super::{Ctx, case, one_seq_meta, round_bf16};
use crate::backend::cpu::CpuBackend;
use crate::backend::cuda::CudaBackend;
use crate::backend::{AttnDims, Backend, HostData, KvLayout};
use crate::config::GpuActivations;
use crate::error::Result;
use crate::model::config::ModelConfig;
use crate::model::weights::RandomSource;
use half::bf16;
use tacflow_kernels::cpu::{self, fused};
use tacflow_kernels::cuda::graph::{GraphStep, StepCapacity, StepLimits, pad_step};
use tacflow_kernels::cuda::{DeviceStep, RmsOut, Rows, StepArrays};

/// bf16 activations against split ones: the GEMM inputs' rounding alone
/// (SmolLM2's decode logits moved 3.5e-2 from the f32 reference when
/// emulated on the CPU).
const BF16_ACTS_TOL: f64 = 5e-2;

/// The fused kernels and graph replay.
pub fn fused(cx: &mut Ctx) -> Vec<Row> {
    let mut rows = vec![];
    for &(t, dim, r0, r1) in &[
        (1usize, 4096usize, 0, 1),
        (17, 576, 0, 17),
        (40, 100, 3, 35),
    ] {
        for bf16_out in [false, true] {
            let name = format!(
                "{} out, rows {r0}..{r1} of {t}x{dim}",
                if bf16_out { "bf16" } else { "f32" }
            );
            case(&mut rows, "add_rmsnorm", name, || {
                add_rmsnorm(cx, (t, dim), (r0, r1), bf16_out)
            });
        }
    }
    for &(h, kvh, d, t, r0) in &[
        (4usize, 2usize, 16usize, 37usize, 0usize),
        (32, 8, 128, 33, 5),
        (6, 1, 64, 1, 0),
    ] {
        let name = format!("{t} rows from {r0}, {h}+{kvh} heads of {d}");
        case(&mut rows, "rope_kv_append", name, || {
            rope_kv(cx, (h, kvh, d), t, r0)
        });
    }
    for &(t, inter, r0) in &[(1usize, 14_336usize, 0usize), (31, 1536, 7), (5, 100, 0)] {
        let name = format!("rows {r0}..{t} of {t}x{inter}");
        case(&mut rows, "silu_mul_bf16", name, || silu(cx, t, inter, r0));
    }
    case(
        &mut rows,
        "graph",
        "rope + rmsnorm + GEMM, 5 of 8 rows, 2 replays",
        || graph(cx),
    );
    rows
}

fn add_rmsnorm(
    cx: &mut Ctx,
    (t, dim): (usize, usize),
    (r0, r1): (usize, usize),
    bf16_out: bool,
) -> Result<Row> {
    let x = cx.rand(t * dim, 0.5, 2.0);
    let y = cx.rand(t * dim, 0.0, 2.0);
    let w = cx.rand(dim, 1.0, 0.1);
    let (mut wx, mut wo) = (x.clone(), vec![f32::NAN; t * dim]);
    let span = r0 * dim..r1 * dim;
    fused::add_rmsnorm(
        &mut wx[span.clone()],
        &y[span.clone()],
        &round_bf16(&w),
        1e-5,
        &mut wo[span],
    );
    let mut xa = cx.b.act_from_host(t, dim, &x, false)?;
    let ya = cx.b.act_from_host(t, dim, &y, false)?;
    let wv = cx.b.vector(dim, HostData::F32(&w))?;
    let got = if bf16_out {
        // The backend writes bf16 in bf16 mode only: the wrapper directly.
        let gpu = cx.b.gpu();
        let (mut xs, ys, ws) = (
            gpu.upload(&x)?,
            gpu.upload(&y)?,
            gpu.upload(&round_bf16(&w))?,
        );
        let mut os = gpu.alloc_poisoned::<bf16>(t * dim)?;
        let shape = Rows { rows: t, cols: dim };
        gpu.add_rmsnorm(
            (&mut xs, &ys),
            &ws,
            1e-5,
            shape,
            r0..r1,
            RmsOut::Bf16(tacflow_kernels::cuda::row_view_mut(
                &mut os,
                &(r0..r1),
                dim,
            )?),
        )?;
        let out: Vec<f32> = gpu
            .download(&os, t * dim)?
            .iter()
            .map(|v| v.to_f32())
            .collect();
        let xg = gpu.download(&xs, t * dim)?;
        (xg, out)
    } else {
        let mut out = cx.b.act_poisoned(t, dim, false)?;
        cx.b.add_rmsnorm(&mut xa, &ya, &wv, 1e-5, &mut out, r0..r1)?;
        (cx.b.act_to_host(&xa)?, cx.b.act_to_host(&out)?)
    };
    let tol = if bf16_out { BF16_TOL } else { F32_TOL };
    let xrow = super::report::compare_row("add_rmsnorm", "", &got.0, &wx, 0.0);
    let orow = super::report::compare_row("add_rmsnorm", "", &got.1, &wo, tol);
    Ok(worse(orow, xrow, "the residual stream"))
}

/// `a`, failing with `b`'s note when `b` fails.
fn worse(a: Row, b: Row, what: &str) -> Row {
    if b.status == super::report::Status::Fail {
        a.failing(format!("{what}: rel_err {:.2e} {}", b.value, b.note))
    } else {
        a
    }
}

fn rope_kv(cx: &mut Ctx, (h, kvh, d): (usize, usize, usize), t: usize, r0: usize) -> Result<Row> {
    let dims = AttnDims {
        num_heads: h,
        num_kv_heads: kvh,
        head_dim: d,
    };
    let cols = dims.qkv_dim();
    let layout = KvLayout {
        num_layers: 2,
        num_blocks: 8,
        block_size: 16,
        num_kv_heads: kvh,
        head_dim: d,
    };
    let x = cx.rand(t * cols, 0.0, 1.0);
    let mut meta = one_seq_meta(&vec![0; t]);
    meta.positions = cx.rand_u32(t, 131_072);
    // Slots scattered over blocks 1..7, in reverse, crossing block edges.
    meta.slots = (0..t).map(|i| (111 - i) as u32).collect();
    let inv = cpu::rope_inv_freq(d, 500_000.0, None);
    let step = cx.b.begin_step(&meta)?;
    let mut qkv = cx.b.act_from_host(t, cols, &x, false)?;
    let mut kv = cx.b.kv_cache(&layout)?;
    cx.b.kv_poison(&mut kv)?;
    let inv_v = cx.b.constants(&inv)?;
    cx.b.rope_kv_append(&step, &mut qkv, &inv_v, &mut kv, 1, dims, r0..t)?;
    let per_layer = layout.num_blocks * layout.block_elems();
    let (mut wk, mut wv) = (vec![f32::NAN; 2 * per_layer], vec![f32::NAN; 2 * per_layer]);
    let mut wq = x;
    let cache = fused::KvLayerMut {
        k: &mut wk[per_layer..],
        v: &mut wv[per_layer..],
        kv_heads: kvh,
        block_size: 16,
        head_dim: d,
    };
    let (pos, slots) = (&meta.positions[r0..], &meta.slots[r0..]);
    fused::rope_kv_append(&mut wq[r0 * cols..], cols, h, pos, slots, &inv, cache);
    let (gk, gv) = cx.b.kv_to_host(&kv)?;
    let got: Vec<f32> = gk.into_iter().chain(gv).collect();
    let want: Vec<f32> = round_bf16(&wk.into_iter().chain(wv).collect::<Vec<_>>());
    let cache_row = super::report::compare_row("rope_kv_append", "", &got, &want, BF16_TOL);
    let q_row =
        super::report::compare_row("rope_kv_append", "", &cx.b.act_to_host(&qkv)?, &wq, F32_TOL);
    Ok(worse(cache_row, q_row, "the rotated rows"))
}

fn silu(cx: &mut Ctx, t: usize, inter: usize, r0: usize) -> Result<Row> {
    let gu = cx.rand(t * 2 * inter, 0.0, 3.0);
    let gpu = cx.b.gpu();
    let gs = gpu.upload(&gu)?;
    let mut os = gpu.alloc_poisoned::<bf16>(t * inter)?;
    gpu.silu_mul_bf16(&gs, &mut os, (t, inter), r0..t)?;
    let got: Vec<f32> = gpu
        .download(&os, t * inter)?
        .iter()
        .map(|v| v.to_f32())
        .collect();
    let mut want = vec![f32::NAN; t * inter];
    fused::silu_mul_bf16(&gu[r0 * 2 * inter..], inter, &mut want[r0 * inter..]);
    Ok(super::report::compare_row(
        "silu_mul_bf16",
        "",
        &got,
        &want,
        BF16_TOL,
    ))
}

/// Persistent buffers of the graph case.
struct Bufs {
    qkv: tacflow_kernels::cuda::CudaSlice<f32>,
    h: tacflow_kernels::cuda::CudaSlice<bf16>,
    out: tacflow_kernels::cuda::CudaSlice<f32>,
}

const G_ROWS: usize = 8;
const G_HEADS: usize = 6;
const G_D: usize = 64;
const G_N: usize = 320;

/// The captured work: RoPE by the step's positions, RMSNorm into bf16,
/// a bf16 GEMM.
fn graph_work(
    gpu: &tacflow_kernels::cuda::Gpu,
    step: &DeviceStep,
    b: &mut Bufs,
    (inv, w, wm): (
        &tacflow_kernels::cuda::CudaSlice<f32>,
        &tacflow_kernels::cuda::CudaSlice<f32>,
        &tacflow_kernels::cuda::CudaSlice<bf16>,
    ),
) -> tacflow_kernels::Result<()> {
    let cols = G_HEADS * G_D;
    let shape = Rows { rows: G_ROWS, cols };
    gpu.rope(step, &mut b.qkv, shape, inv, G_HEADS, G_D)?;
    gpu.rmsnorm(&b.qkv, w, 1e-5, shape, RmsOut::from(&mut b.h))?;
    gpu.gemm_nt(&b.h, wm, &mut b.out, (G_ROWS, G_N, cols))
}

fn graph(cx: &mut Ctx) -> Result<Row> {
    let cols = G_HEADS * G_D;
    let inv = cpu::rope_inv_freq(G_D, 10_000.0, None);
    let (w, wm) = (
        cx.rand(cols, 1.0, 0.1),
        round_bf16(&cx.rand(G_N * cols, 0.0, 0.05)),
    );
    let xs: Vec<Vec<f32>> = (0..2).map(|_| cx.rand(G_ROWS * cols, 0.0, 1.0)).collect();
    let steps: Vec<StepArrays> = (0..2)
        .map(|_| StepArrays {
            tokens: vec![0; 5],
            positions: cx.rand_u32(5, 4096),
            slots: (0..5).collect(),
            kv_len: vec![1; 5],
            table_off: vec![0; 5],
            tables: vec![0],
            logit_rows: vec![],
        })
        .collect();
    let cap = StepCapacity {
        rows: G_ROWS,
        tables: 4,
    };
    let limits = StepLimits {
        vocab: 1,
        slots: 16 * 4,
        kv_len: 16,
        pad_slot: 16 * 3,
    };
    let sync = cx.b.gpu().sync_launches();
    cx.b.gpu_mut().set_sync_launches(false);
    let gpu = cx.b.gpu();
    let consts = (
        gpu.upload(&inv)?,
        gpu.upload(&w)?,
        gpu.upload(&to_bf16(&wm))?,
    );
    let c = (&consts.0, &consts.1, &consts.2);
    let new_bufs = || -> Result<Bufs> {
        Ok(Bufs {
            qkv: gpu.alloc_poisoned(G_ROWS * cols)?,
            h: gpu.alloc_poisoned(G_ROWS * cols)?,
            out: gpu.alloc_poisoned(G_ROWS * G_N)?,
        })
    };
    let mut gs = GraphStep::new(gpu, cap, limits)?;
    let mut pb = new_bufs()?;
    let mut worst = 0.0f64;
    let result = (|| -> Result<usize> {
        // An eager warm-up first, as the executor would run: cuBLAS sets
        // up for the shape outside the capture.
        graph_work(gpu, &gs.step, &mut new_bufs()?, c)?;
        gpu.synchronize()?;
        let g = gpu.capture(|gpu| graph_work(gpu, &gs.step, &mut pb, c))?;
        for (x, a) in xs.iter().zip(&steps) {
            gpu.upload_into(x, &mut pb.qkv)?;
            gs.refill(gpu, a)?;
            g.launch()?;
            let replayed = gpu.download(&pb.out, G_ROWS * G_N)?;
            let eager_step = DeviceStep::upload(gpu, &pad_step(a, &cap, limits.pad_slot)?)?;
            let mut eb = new_bufs()?;
            gpu.upload_into(x, &mut eb.qkv)?;
            graph_work(gpu, &eager_step, &mut eb, c)?;
            let eager = gpu.download(&eb.out, G_ROWS * G_N)?;
            let d = super::report::diff(&replayed, &eager);
            let bad = d.unwritten + d.nan_mismatch > 0;
            worst = worst.max(if bad { f64::NAN } else { d.rel });
        }
        Ok(g.kernels)
    })();
    cx.b.gpu_mut().set_sync_launches(sync);
    let kernels = result?;
    Ok(
        Row::at_most("graph", "", "rel_err", worst, 0.0).with_note(format!(
            "{kernels} kernel nodes; replay vs eager, bit for bit"
        )),
    )
}

fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// The tiny model with bf16 activations: against the CPU rounding GEMM
/// inputs the same way (its twin), and against the split mode.
pub fn model_bf16(b: CudaBackend, seed: u64) -> Vec<Row> {
    let config = ModelConfig::tiny();
    let src = RandomSource {
        config: config.clone(),
        seed,
    };
    let sc = random_scenario(seed, config.vocab_size, &[77, 20, 5], &[37, 20, 3], 32);
    let twin = CpuBackend {
        round_to_bf16: true,
        round_activations: true,
        device_tactic: None,
    };
    let mut rows = match b.with_activations(GpuActivations::Bf16) {
        Ok(bf) => {
            super::model::compare_with("bf16-acts", (bf, twin), &config, &src, &sc, 512, LOGITS_TOL)
        }
        Err(e) => vec![Row::fail("bf16-acts", "bf16 activations", e.to_string())],
    };
    for r in &mut rows {
        r.case = format!("vs CPU twin: {}", r.case);
    }
    let pair = CudaBackend::new(0).and_then(|split| {
        let bf = CudaBackend::new(0)?.with_activations(GpuActivations::Bf16)?;
        Ok((bf, split))
    });
    let mut vs_split = match pair {
        Ok(p) => super::model::compare_with("bf16-acts", p, &config, &src, &sc, 512, BF16_ACTS_TOL),
        Err(e) => vec![Row::fail(
            "bf16-acts",
            "open a second GPU backend",
            e.to_string(),
        )],
    };
    for r in &mut vs_split {
        r.case = format!("vs split: {}", r.case);
    }
    rows.extend(vs_split);
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selfcheck::report::Status;

    /// The twin of bf16 mode on the CPU stays within the self-check's bound
    /// of the split mode's reference (f32 GEMM inputs), and differs from it.
    #[test]
    fn rounding_gemm_inputs_moves_the_tiny_models_logits_a_little() {
        let config = ModelConfig::tiny();
        let src = RandomSource {
            config: config.clone(),
            seed: 9,
        };
        let sc = random_scenario(9, config.vocab_size, &[21, 5], &[8, 5], 4);
        let twin = CpuBackend {
            round_to_bf16: true,
            round_activations: true,
            device_tactic: None,
        };
        let exact = CpuBackend {
            round_to_bf16: true,
            round_activations: false,
            device_tactic: None,
        };
        let rows = super::super::model::compare_with(
            "t",
            (twin, exact),
            &config,
            &src,
            &sc,
            64,
            BF16_ACTS_TOL,
        );
        for r in &rows[..2] {
            assert!(r.value > 0.0 && r.status == Status::Pass, "{r:?}");
        }
        eprintln!(
            "bf16 GEMM inputs vs f32: {:.2e} / {:.2e}",
            rows[0].value, rows[1].value
        );
    }
}
