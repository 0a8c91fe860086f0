//! Attention offload against a plain reference (softmax over every cached
//! row, in f64), and bad requests that must change nothing.

use super::Offload;
use super::step::{AttentionWork, TensorTarget};
use crate::engine::SeqKey;
use crate::engine::gauges::Gauges;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use tacflow_ipc::{AttentionLayout, AttentionPolicy, DType, ErrorCode, HostRegion, TensorRef};

const S: u64 = 1;
const LAYOUT: AttentionLayout = AttentionLayout {
    num_layers: 2,
    num_heads: 6,
    num_kv_heads: 2,
    head_dim: 8,
    scale: 0.3,
    softcap: None,
    sliding_window: None,
    sinks: false,
};

fn region(bytes: u64) -> Arc<HostRegion> {
    use nix::sys::memfd::{MFdFlags, memfd_create};
    let fd: OwnedFd = memfd_create("offload-test", MFdFlags::MFD_CLOEXEC).unwrap();
    nix::unistd::ftruncate(&fd, bytes as i64).unwrap();
    Arc::new(HostRegion::from_fd(fd, bytes, "test".into()).unwrap())
}

fn key(seq: u64) -> SeqKey {
    SeqKey { session: S, seq }
}

fn offload(budget: u64) -> Offload {
    Offload::new(budget, 1 << 16, true, Arc::new(Gauges::default()))
}

/// Seeded values in [-1, 1).
fn values(seed: u64, n: usize) -> Vec<f32> {
    (0..n as u64)
        .map(|i| (tacflow_kernels::rng::bits(seed, 5, i) % 2000) as f32 / 1000.0 - 1.0)
        .collect()
}

/// One request's tensors in one region: q, k, v, out at fixed offsets, in
/// `dtype` (out in f32).
struct Batch {
    region: Arc<HostRegion>,
    rows: usize,
    dtype: DType,
}

impl Batch {
    fn new(rows: usize, dtype: DType) -> Batch {
        Batch {
            region: region(1 << 20),
            rows,
            dtype,
        }
    }

    fn target(&self, slot: u64, heads: usize, dtype: DType) -> TensorTarget {
        let t = TensorRef {
            region_id: 1,
            offset: slot << 18,
            dtype,
            shape: vec![self.rows as u64, heads as u64, LAYOUT.head_dim as u64],
            strides: None,
        };
        TensorTarget {
            view: t.resolve(self.region.size()).unwrap(),
            region: self.region.clone(),
        }
    }

    fn work(&self, layer: u32, seqs: &[(u64, usize, Option<u64>)]) -> AttentionWork {
        let (h, hkv) = (LAYOUT.num_heads as usize, LAYOUT.num_kv_heads as usize);
        AttentionWork {
            session: S,
            layer,
            seq_ids: seqs.iter().map(|s| s.0).collect(),
            rows: seqs.iter().map(|s| s.1).collect(),
            positions: seqs.iter().filter_map(|s| s.2).collect(),
            q: self.target(0, h, self.dtype),
            k: self.target(1, hkv, self.dtype),
            v: self.target(2, hkv, self.dtype),
            out: self.target(3, h, DType::F32),
        }
    }

    fn fill(&self, w: &AttentionWork, q: &[f32], k: &[f32], v: &[f32]) {
        self.region.write_f32(&w.q.view, q).unwrap();
        self.region.write_f32(&w.k.view, k).unwrap();
        self.region.write_f32(&w.v.view, v).unwrap();
    }

    fn out(&self, w: &AttentionWork) -> Vec<f32> {
        self.region.read_f32(&w.out.view).unwrap()
    }
}

/// Causal attention of `q` rows (at the end of the context) over every
/// cached key and value, per query head (GQA), in f64.
fn reference(q: &[f32], keys: &[f32], vals: &[f32], n_q: usize) -> Vec<f32> {
    let (h, hkv, d) = (
        LAYOUT.num_heads as usize,
        LAYOUT.num_kv_heads as usize,
        LAYOUT.head_dim as usize,
    );
    let ctx = keys.len() / (hkv * d);
    let mut out = vec![0.0f32; n_q * h * d];
    for r in 0..n_q {
        let sees = ctx - n_q + r + 1;
        for head in 0..h {
            let g = head / (h / hkv);
            let qv = &q[(r * h + head) * d..(r * h + head + 1) * d];
            let scores: Vec<f64> = (0..sees)
                .map(|t| {
                    let kv = &keys[(t * hkv + g) * d..(t * hkv + g + 1) * d];
                    qv.iter()
                        .zip(kv)
                        .map(|(a, b)| f64::from(a * b))
                        .sum::<f64>()
                        * f64::from(LAYOUT.scale)
                })
                .collect();
            let m = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - m).exp()).sum();
            for (t, s) in scores.iter().enumerate() {
                let w = (s - m).exp() / z;
                for j in 0..d {
                    out[(r * h + head) * d + j] +=
                        (w * f64::from(vals[(t * hkv + g) * d + j])) as f32;
                }
            }
        }
    }
    out
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn prefill_chunks_and_decode_rows_match_the_reference_at_every_layer() {
    let mut o = offload(64 << 20);
    o.open(key(1), LAYOUT, AttentionPolicy::Full, false)
        .unwrap();
    o.open(key(2), LAYOUT, AttentionPolicy::Full, false)
        .unwrap();
    let (h, hkv, d) = (6, 2, 8);
    // Per layer, per sequence: every key and value appended so far.
    let mut keys = vec![vec![vec![]; 2]; 2];
    let mut vals = vec![vec![vec![]; 2]; 2];
    // A 17-row chunk and a 5-row one (crossing a block), then decode rows.
    let plan: [[usize; 2]; 4] = [[17, 5], [1, 12], [1, 1], [1, 1]];
    for (step, rows) in plan.iter().enumerate() {
        for layer in 0..2u32 {
            let n = rows[0] + rows[1];
            let b = Batch::new(n, DType::F32);
            let pos: Vec<u64> = (0..2)
                .map(|s| keys[layer as usize][s].len() as u64 / (hkv * d) as u64)
                .collect();
            let w = b.work(
                layer,
                &[(1, rows[0], Some(pos[0])), (2, rows[1], Some(pos[1]))],
            );
            let seed = (step * 2 + layer as usize) as u64;
            let (q, k, v) = (
                values(seed, n * h * d),
                values(seed + 100, n * hkv * d),
                values(seed + 200, n * hkv * d),
            );
            b.fill(&w, &q, &k, &v);
            let (lens, _) = o.step(&w).unwrap();
            let got = b.out(&w);
            let mut r0 = 0;
            for s in 0..2 {
                let nr = rows[s];
                let kk = &mut keys[layer as usize][s];
                let vv = &mut vals[layer as usize][s];
                kk.extend_from_slice(&k[r0 * hkv * d..(r0 + nr) * hkv * d]);
                vv.extend_from_slice(&v[r0 * hkv * d..(r0 + nr) * hkv * d]);
                assert_eq!(lens[s] as usize, kk.len() / (hkv * d));
                let want = reference(&q[r0 * h * d..(r0 + nr) * h * d], kk, vv, nr);
                let err = max_diff(&got[r0 * h * d..(r0 + nr) * h * d], &want);
                assert!(err < 1e-5, "step {step} layer {layer} seq {s}: {err}");
                r0 += nr;
            }
        }
    }
    let info = o.info();
    assert_eq!(info.steps_by_layer, vec![4, 4]);
    assert_eq!(info.sequences, 2);
    assert_eq!(info.blocks, 2 + 2, "20 and 19 rows take two blocks each");
    o.close(key(1));
    o.close(key(2));
    assert_eq!(o.info().blocks, 0);
}

#[test]
fn bf16_inputs_are_read_as_bf16() {
    let mut o = offload(1 << 20);
    o.open(key(1), LAYOUT, AttentionPolicy::Full, false)
        .unwrap();
    let b = Batch::new(3, DType::Bf16);
    let w = b.work(0, &[(1, 3, None)]);
    let round = |x: Vec<f32>| -> Vec<f32> {
        x.into_iter()
            .map(|v| half::bf16::from_f32(v).to_f32())
            .collect()
    };
    let (q, k, v) = (
        round(values(1, 3 * 48)),
        round(values(2, 3 * 16)),
        round(values(3, 3 * 16)),
    );
    b.fill(&w, &q, &k, &v);
    o.step(&w).unwrap();
    assert!(max_diff(&b.out(&w), &reference(&q, &k, &v, 3)) < 1e-5);
}

/// Everything a client can observe of the offload.
fn snapshot(o: &Offload) -> String {
    let mut seqs: Vec<_> = o
        .seqs
        .iter()
        .map(|(k, s)| (k.seq, s.lens.clone(), s.table.clone()))
        .collect();
    seqs.sort();
    format!("{seqs:?} {:?}", o.info())
}

#[test]
fn refused_requests_change_nothing() {
    let mut o = offload(4 * super::pool::block_bytes((2, 2, 8)));
    o.open(key(1), LAYOUT, AttentionPolicy::Full, false)
        .unwrap();
    let other_layout = AttentionLayout {
        head_dim: 16,
        ..LAYOUT
    };
    o.open(key(2), other_layout, AttentionPolicy::Full, false)
        .unwrap();
    o.open(
        SeqKey { session: 9, seq: 3 },
        LAYOUT,
        AttentionPolicy::Full,
        false,
    )
    .unwrap();
    let b = Batch::new(2, DType::F32);
    let ok = b.work(0, &[(1, 2, Some(0))]);
    b.fill(&ok, &values(1, 96), &values(2, 32), &values(3, 32));
    o.step(&ok).unwrap();
    let before = snapshot(&o);
    let cases: Vec<(ErrorCode, AttentionWork)> = vec![
        (ErrorCode::BadRequest, b.work(2, &[(1, 2, None)])),
        (ErrorCode::BadRequest, b.work(0, &[(1, 2, Some(0))])),
        (ErrorCode::UnknownSequence, b.work(0, &[(3, 2, None)])),
        (ErrorCode::UnknownSequence, b.work(0, &[(77, 2, None)])),
        (
            ErrorCode::BadRequest,
            b.work(0, &[(1, 1, None), (1, 1, None)]),
        ),
        (
            ErrorCode::BadRequest,
            b.work(0, &[(1, 1, None), (2, 1, None)]),
        ),
        (ErrorCode::ShapeMismatch, {
            let mut w = b.work(0, &[(1, 2, None)]);
            w.k = b.target(1, 6, DType::F32);
            w
        }),
        // 2 + 70 rows need five blocks; the budget holds four.
        (ErrorCode::OutOfKvBlocks, {
            let big = Batch::new(70, DType::F32);
            big.work(1, &[(1, 70, None)])
        }),
    ];
    for (i, (code, w)) in cases.into_iter().enumerate() {
        let err = o.step(&w).unwrap_err();
        assert_eq!(err.code, code, "case {i}: {}", err.message);
        assert_eq!(snapshot(&o), before, "case {i} changed something");
    }
    // The cache is intact: the next request still matches the reference.
    let one = Batch::new(1, DType::F32);
    let next = one.work(0, &[(1, 1, Some(2))]);
    let (q, k, v) = (values(4, 48), values(5, 16), values(6, 16));
    one.fill(&next, &q, &k, &v);
    o.step(&next).unwrap();
    let mut keys = values(2, 32);
    keys.extend(&k);
    let mut vals = values(3, 32);
    vals.extend(&v);
    let got = one.out(&next);
    assert!(max_diff(&got[..48], &reference(&q, &keys, &vals, 1)) < 1e-5);
}

#[test]
fn features_the_daemon_cannot_honour_are_refused_at_open() {
    let mut o = offload(1 << 20);
    for bad in [
        AttentionLayout {
            softcap: Some(50.0),
            ..LAYOUT
        },
        AttentionLayout {
            sliding_window: Some(4096),
            ..LAYOUT
        },
        AttentionLayout {
            sinks: true,
            ..LAYOUT
        },
    ] {
        let e = o
            .open(key(1), bad, AttentionPolicy::Full, false)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Unsupported, "{}", e.message);
    }
    for bad in [
        AttentionLayout {
            num_heads: 5,
            ..LAYOUT
        },
        AttentionLayout {
            scale: f32::NAN,
            ..LAYOUT
        },
        AttentionLayout {
            num_layers: 0,
            ..LAYOUT
        },
    ] {
        let e = o
            .open(key(1), bad, AttentionPolicy::Full, false)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest, "{}", e.message);
    }
    assert_eq!(o.info().sequences, 0);
}

#[test]
fn forks_copy_the_cache_and_truncation_drops_rows() {
    let mut o = offload(8 << 20);
    o.open(key(1), LAYOUT, AttentionPolicy::Full, false)
        .unwrap();
    let b = Batch::new(20, DType::F32);
    let w = b.work(0, &[(1, 20, None)]);
    let (q, k, v) = (values(1, 20 * 48), values(2, 20 * 16), values(3, 20 * 16));
    b.fill(&w, &q, &k, &v);
    o.step(&w).unwrap();
    let tactic = AttentionPolicy::Tactic {
        p: 0.9,
        cluster_size: None,
        recluster_limit: None,
    };
    assert_eq!(
        o.fork(key(1), key(2), Some(tactic), Some(true)).unwrap(),
        20
    );
    assert_ne!(o.seqs[&key(1)].table, o.seqs[&key(2)].table);
    // The same decode row on parent and child: full attention either way
    // at this length (Tactic keeps everything of a short context).
    let d = Batch::new(2, DType::F32);
    let dw = d.work(0, &[(1, 1, Some(20)), (2, 1, Some(20))]);
    let row_q = values(9, 48);
    let (row_k, row_v) = (values(10, 16), values(11, 16));
    d.fill(
        &dw,
        &[row_q.clone(), row_q].concat(),
        &[row_k.clone(), row_k].concat(),
        &[row_v.clone(), row_v].concat(),
    );
    let (_, diags) = o.step(&dw).unwrap();
    let out = d.out(&dw);
    assert!(max_diff(&out[..48], &out[48..]) < 1e-6);
    assert!(diags[1].is_some(), "the child asked for diagnostics");
    // Layer 1 holds no rows: nothing can be dropped from every layer.
    assert!(o.truncate(key(2), 1).is_err());
    assert_eq!(o.truncate(key(2), 0).unwrap(), 21);
    o.close(key(1));
    o.close(key(2));
    assert_eq!(o.info().blocks, 0);
}
