//! The CPU backend's fused ops against the unfused ops they replace, and
//! its bf16 activation twin.

use super::*;
use crate::selfcheck::one_seq_meta;

fn rand(n: usize, stream: u64) -> Vec<f32> {
    (0..n as u64)
        .map(|i| tacflow_kernels::rng::random_weight(7, stream, i, 0.0, 1.0))
        .collect()
}

fn mat(b: &CpuBackend, rows: usize, cols: usize, stream: u64) -> Mat {
    Mat {
        data: rand(rows * cols, stream),
        ..b.act(rows, cols).unwrap()
    }
}

#[test]
fn add_rmsnorm_equals_add_then_rmsnorm_on_its_rows_only() {
    let b = CpuBackend::default();
    let (t, dim) = (9, 40);
    let y = mat(&b, t, dim, 2);
    let w = rand(dim, 3);
    let (mut xf, mut of) = (mat(&b, t, dim, 1), mat(&b, t, dim, 4));
    let (mut xc, mut oc) = (xf.clone(), of.clone());
    b.add_rmsnorm(&mut xf, &y, &w, 1e-5, &mut of, 2..7).unwrap();
    b.add(&mut xc, &y, 2..7).unwrap();
    b.rmsnorm(&xc, &w, 1e-5, &mut oc, 2..7).unwrap();
    assert_eq!(xf, xc);
    assert_eq!(of, oc, "rows outside 2..7 untouched in both");
}

#[test]
fn rope_kv_append_equals_rope_then_kv_append_on_its_rows_only() {
    let b = CpuBackend::default();
    let d = AttnDims {
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 8,
    };
    let layout = KvLayout {
        num_layers: 2,
        num_blocks: 4,
        block_size: 16,
        num_kv_heads: 2,
        head_dim: 8,
    };
    let t = 21;
    let mut meta = one_seq_meta(&vec![0; t]);
    meta.positions = (0..t as u32).map(|i| 3 * i + 100).collect();
    let inv = tacflow_kernels::cpu::rope_inv_freq(8, 10_000.0, None);
    let (mut qf, mut kf) = (mat(&b, t, d.qkv_dim(), 5), b.kv_cache(&layout).unwrap());
    let (mut qc, mut kc) = (qf.clone(), b.kv_cache(&layout).unwrap());
    b.rope_kv_append(&meta, &mut qf, &inv, &mut kf, 1, d, 3..19)
        .unwrap();
    b.rope(&meta, &mut qc, &inv, d, 3..19).unwrap();
    b.kv_append(&meta, &qc, &mut kc, 1, d, 3..19).unwrap();
    assert_eq!(qf, qc);
    assert_eq!((kf.k, kf.v), (kc.k, kc.v));
}

#[test]
fn round_activations_rounds_gemm_inputs_to_bf16() {
    let exact = CpuBackend::default();
    let twin = CpuBackend {
        round_activations: true,
        ..CpuBackend::default()
    };
    let x = mat(&exact, 3, 64, 6);
    let w = mat(&exact, 5, 64, 7);
    let rounded = Mat {
        data: x.data.iter().map(|&v| bf16::from_f32(v).to_f32()).collect(),
        ..x.clone()
    };
    let (mut a, mut b, mut c) = (
        exact.act(3, 5).unwrap(),
        exact.act(3, 5).unwrap(),
        exact.act(3, 5).unwrap(),
    );
    twin.linear(&x, &w, &mut a, 0..3).unwrap();
    exact.linear(&rounded, &w, &mut b, 0..3).unwrap();
    exact.linear(&x, &w, &mut c, 0..3).unwrap();
    assert_eq!(a, b);
    assert_ne!(a, c);
}
