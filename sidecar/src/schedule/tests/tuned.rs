//! The search against a cost table whose answer is computed by hand, the
//! cost file and the schedule file on disk, and the schedule file's
//! refusals.

use super::step;
use crate::schedule::build::{self, LaneMap};
use crate::schedule::program::Program;
use crate::schedule::search::{
    CostFile, CostModel, CostPoint, OpKind, SearchSpace, makespan, search,
};
use crate::schedule::tuned::{ScheduleFile, ScheduleKey, Tuned, TunedStep};

/// One layer, no fusion: ten row-wise ops, five GEMMs, one attention.
fn program() -> Program {
    Program {
        layers: 1,
        qkv_bias: false,
        fusions: Default::default(),
    }
}

/// Row-wise ops free; a GEMM 10 us per row and attention 50 us per row,
/// on any share of the SMs (a linear table: rows 1 and 4096 interpolate it
/// exactly).
fn hand_table() -> CostFile {
    let mut points = vec![];
    for op in OpKind::ALL {
        for rows in [1, 4096] {
            for sm_share in [0.5, 1.0] {
                let per_row = match op {
                    OpKind::Rowwise => 0.0,
                    OpKind::Attention => 50.0,
                    _ => 10.0,
                };
                let us = per_row * rows as f64;
                points.push(CostPoint {
                    op,
                    rows,
                    sm_share,
                    us,
                });
            }
        }
    }
    CostFile {
        version: 1,
        model: "hand".into(),
        gpu: "none".into(),
        sm_share: None,
        points,
    }
}

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("tacflow-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn key() -> ScheduleKey {
    ScheduleKey {
        fingerprint: "hand-0".into(),
        device: "cpu (2 threads)".into(),
        policy: "full".into(),
    }
}

/// Two decode sequences (two rows, two logit rows). By hand:
/// * sequential: five GEMMs of 2 rows (100) + attention of 2 rows (100) = 200;
/// * any one-lane schedule: the same work in more pieces, 200;
/// * two-batch, dense ops whole, attention cut: the attention halves run
///   side by side (50) between the GEMMs (20 + 80): 150;
/// * two-batch, dense cut but attention whole: the whole attention (100)
///   waits for both QKV halves (10), then the other four GEMMs' halves
///   (40): 150;
/// * two-batch, both cut at the sequence boundary: each lane runs five
///   one-row GEMMs (50) and one attention row (50), independently: 100.
///
/// So the search must pick the last, at 100 us, and that choice must come
/// back from the schedule file as the same schedule. Run serially, every
/// schedule costs at least 200, and the sequential pass must win.
#[test]
fn the_search_picks_the_hand_computed_schedule_through_the_files() {
    let dir = temp_dir("tuned");
    let cost_path = dir.join("cost.toml");
    std::fs::write(&cost_path, toml::to_string(&hand_table()).unwrap()).unwrap();
    let costs = CostModel::load(&cost_path).unwrap();
    let (p, meta) = (program(), step(&[1, 1]));
    let space = SearchSpace {
        dense_cuts: vec![vec![], vec![1]],
        attn_cuts: vec![vec![], vec![1]],
        lane_maps: vec![LaneMap::single(), LaneMap::two_batch()],
        skews: vec![0],
        share_step: 0.5,
        serial: false,
    };
    // Lanes one after another (the CPU backend): every schedule costs at
    // least the sequential 200, and on a tie the simplest wins.
    let serial = SearchSpace {
        serial: true,
        ..space.clone()
    };
    let one = search(&p, &meta, &costs, &serial).unwrap();
    assert!((one.predicted_us - 200.0).abs() < 1e-9, "{one:?}");
    assert_eq!(one.spec.lanes, LaneMap::single());
    assert!(one.spec.dense_cuts.is_empty() && one.spec.attn_cuts.is_empty());
    let found = search(&p, &meta, &costs, &space).unwrap();
    assert!((found.sequential_us - 200.0).abs() < 1e-9, "{found:?}");
    assert!((found.predicted_us - 100.0).abs() < 1e-9, "{found:?}");
    assert_eq!(found.spec.lanes, LaneMap::two_batch());
    assert_eq!(
        (found.spec.dense_cuts.clone(), found.spec.attn_cuts.clone()),
        (vec![1], vec![1])
    );
    let mut entry = TunedStep::from_spec("2 decodes".into(), &meta, &found.spec);
    entry.shares = found.shares.clone();
    let file = ScheduleFile {
        version: 1,
        model: "hand".into(),
        key: key(),
        cost_file: cost_path.display().to_string(),
        steps: vec![entry],
    };
    let path = dir.join(key().file_name());
    file.save(&path).unwrap();
    let loaded = ScheduleFile::load(&path, &key()).unwrap();
    assert_eq!(loaded, file);
    let (s, _) = Tuned::new(loaded).lay_out(&p, &meta).unwrap();
    assert_eq!(s, build::nano_batched(&p, &meta, &found.spec).unwrap());
    assert!((makespan(&s, &costs, &found.shares).unwrap() - 100.0).abs() < 1e-9);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The relative cuts scale to other steps: inside the rows, attention on
/// the nearest boundary, nothing left to cut in a one-row step.
#[test]
fn tuned_entries_scale_to_each_step() {
    let meta = step(&[1, 1, 1, 1]);
    let entry = TunedStep::from_spec(
        "4 decodes".into(),
        &meta,
        &build::NanoSpec {
            dense_cuts: vec![1],
            attn_cuts: vec![1],
            lanes: LaneMap::nanoflow(),
            skew: 2,
        },
    );
    let big = step(&[1, 1, 1, 1, 1, 1, 9, 1]);
    let spec = entry.spec_for(&big);
    assert_eq!((spec.dense_cuts, spec.attn_cuts), (vec![4], vec![4]));
    let spec = entry.spec_for(&step(&[1]));
    assert!(spec.dense_cuts.is_empty() && spec.attn_cuts.is_empty());
    let prefill = step(&[12]);
    let spec = entry.spec_for(&prefill);
    assert_eq!(spec.dense_cuts, vec![3]);
    assert!(spec.attn_cuts.is_empty(), "no boundary inside one sequence");
    build::nano_batched(&program(), &prefill, &spec).unwrap();
}

/// Another version, another key, a corrupt file, a missing one: each is
/// an error that says what is wrong, never a silent fallback.
#[test]
fn bad_schedule_files_are_refused() {
    let dir = temp_dir("tuned-bad");
    let meta = step(&[1, 1]);
    let spec = build::NanoSpec {
        dense_cuts: vec![1],
        attn_cuts: vec![],
        lanes: LaneMap::two_batch(),
        skew: 0,
    };
    let mut entry = TunedStep::from_spec("2".into(), &meta, &spec);
    entry.shares = vec![0.5, 0.5];
    let file = ScheduleFile {
        version: 1,
        model: "hand".into(),
        key: key(),
        cost_file: String::new(),
        steps: vec![entry],
    };
    let path = dir.join("s.toml");
    file.save(&path).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let err = |text: &str, k: &ScheduleKey| {
        std::fs::write(&path, text).unwrap();
        ScheduleFile::load(&path, k).unwrap_err().to_string()
    };
    let e = err(&text.replace("version = 1", "version = 7"), &key());
    assert!(e.contains("version 7") && e.contains("re-run"), "{e}");
    let other = ScheduleKey {
        device: "NVIDIA H200".into(),
        ..key()
    };
    let e = err(&text, &other);
    assert!(e.contains("tuned for") && e.contains("H200"), "{e}");
    let e = err(&text[..text.len() / 2], &key());
    assert!(e.contains("schedule file"), "{e}");
    let e = err(
        &text.replace("dense_cuts = [0.5]", "dense_cuts = [1.5]"),
        &key(),
    );
    assert!(e.contains("outside (0, 1)"), "{e}");
    std::fs::remove_file(&path).unwrap();
    let e = ScheduleFile::load(&path, &key()).unwrap_err().to_string();
    assert!(e.contains("s.toml"), "{e}");
    std::fs::remove_dir_all(&dir).unwrap();
}
