//! `bench-tactic`'s core at tiny sizes on the CPU backend: the calibration
//! reaches its oracle fraction, the device path's output equals the host
//! path's at every step (`point::step` fails otherwise), the quality
//! numbers lie in range, the JSON carries every field; real keys through
//! a capture written here; `--backend cuda` without a GPU is an error.

use super::device::{Cpu, Cuda};
use super::*;

fn opts() -> Options {
    Options {
        backend: BackendKind::Cpu,
        shape: (8, 2, 64),
        contexts: vec![2048],
        batches: vec![1, 3],
        fractions: vec![0.05],
        ps: vec![0.8, 0.9],
        steps: 4,
        seed: 11,
        keys: None,
        quality_seqs: 1,
        json: None,
    }
}

fn check_ranges(r: &report::Row) {
    assert!((0.0..=1.0).contains(&r.success), "success {}", r.success);
    assert!(r.read > 0.0 && r.read <= 1.0, "read {}", r.read);
    assert!(r.oracle > 0.0 && r.oracle <= 1.0, "oracle {}", r.oracle);
    // Tactic's sets hold whole clusters: never far below the oracle.
    assert!(
        r.read >= 0.5 * r.oracle,
        "read {} vs oracle {}",
        r.read,
        r.oracle
    );
    assert!(r.all_us > 0.0 && r.full_us > 0.0 && r.first_us > 0.0);
    assert!(r.attn_us.is_some() && r.select_us.is_some());
    assert_eq!(r.max_diff, 0.0, "the device path's output differs");
    assert_eq!(r.quality_seqs, r.batch);
}

#[test]
fn controlled_points_hit_their_oracle_fraction() {
    let o = opts();
    let rows = measure_all(&Cpu::default(), &o).expect("bench");
    assert_eq!(rows.len(), 4);
    for r in &rows {
        check_ranges(r);
        let c = r.calibrated.expect("calibrated");
        assert!((c - 0.05).abs() <= 0.1 * 0.05, "calibrated {c}");
        if r.p == 0.9 {
            // Measured over every step's turned queries, not only the
            // first one the calibration saw.
            assert!((r.oracle - 0.05).abs() <= 0.3 * 0.05, "oracle {}", r.oracle);
            assert!(r.success >= 0.25, "success {}", r.success);
        }
    }
    let p8 = rows.iter().find(|r| r.p == 0.8 && r.batch == 3).unwrap();
    let p9 = rows.iter().find(|r| r.p == 0.9 && r.batch == 3).unwrap();
    assert!(p8.oracle < p9.oracle, "a lower P must need fewer tokens");
    let v = report::json(&o, &rows);
    for r in v["rows"].as_array().unwrap() {
        for f in [
            "backend",
            "keys",
            "target_fraction",
            "calibrated_fraction",
            "context",
            "batch",
            "p",
            "oracle",
            "read",
            "read_over_oracle",
            "success",
            "select_us",
            "attention_us",
            "all_us",
            "full_us",
            "speedup",
            "first_step_us",
            "clustering_ms_per_seq",
            "read_gbps",
            "full_gbps",
            "max_abs_diff",
        ] {
            assert!(!r[f].is_null(), "field {f} missing");
        }
    }
}

fn write_npy(path: &std::path::Path, shape: &[usize], data: &[f32]) {
    let dims: Vec<String> = shape.iter().map(|x| x.to_string()).collect();
    let mut h = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({},), }}",
        dims.join(", ")
    );
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    let mut b = b"\x93NUMPY\x01\x00".to_vec();
    b.extend((h.len() as u16).to_le_bytes());
    b.extend(h.as_bytes());
    for x in data {
        b.extend(x.to_le_bytes());
    }
    std::fs::write(path, b).unwrap();
}

#[test]
fn real_keys_from_a_capture() {
    use tacflow_kernels::tactic::synth::Synth;
    // Two layers of 3 KV heads x 32, 6 query heads, 600 tokens, one window
    // ending at 600 with 8 decode queries.
    let (layers, kvh, nh, d, n, steps) = (2, 3, 6, 32, 600, 8);
    let g = nh / kvh;
    let (mut k, mut q) = (vec![], vec![]);
    for l in 0..layers {
        let sy: Vec<Synth> = (0..kvh)
            .map(|h| Synth::heavy(n, 60, g, d, (l * 10 + h) as u64))
            .collect();
        for s in &sy {
            k.extend(&s.keys);
        }
        for t in 0..steps {
            for s in &sy {
                q.extend(s.turned(0.15, 3, t as u64));
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("tacflow-bt-capture-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    write_npy(&dir.join("k_post.npy"), &[layers, kvh, n, d], &k);
    write_npy(&dir.join("q.npy"), &[layers, steps, nh, d], &q);
    std::fs::write(
        dir.join("meta.json"),
        format!("{{\"window_ends\": [{n}], \"steps\": {steps}}}"),
    )
    .unwrap();
    let o = Options {
        keys: Some(dir.clone()),
        batches: vec![3],
        ps: vec![0.9],
        steps: 6,
        ..opts()
    };
    let rows = measure_all(&Cpu::default(), &o);
    std::fs::remove_dir_all(&dir).unwrap();
    let rows = rows.expect("bench");
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].context, n);
    assert_eq!(rows[0].keys, Keys::Real);
    check_ranges(&rows[0]);
}

#[test]
fn cuda_without_a_gpu_is_an_error() {
    if crate::backend::cuda::probe().is_ok() {
        return; // a GPU is here: nothing to refuse
    }
    let e = Cuda::new().err().expect("a CUDA backend without a GPU");
    assert!(e.to_string().contains("needs a CUDA GPU"), "{e}");
}
