//! A bounded run of the stable fuzzer over the request decoder and
//! validator (`tacflow_ipc::fuzz`). The long run is
//! `cargo run --release -p tacflow-ipc --example fuzz -- --inputs 1000000`,
//! recorded in `bench/RESULTS.md`.

use std::path::PathBuf;
use std::time::Duration;
use tacflow_ipc::fuzz::{Fuzzer, check, generate::load_corpus};

#[test]
fn bounded_fuzz_run_finds_nothing() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors");
    let corpus = load_corpus(&dir).unwrap();
    assert!(corpus.len() >= 15, "the shared vectors seed the corpus");
    // Every seed passes unmutated first.
    for input in &corpus {
        check(input);
    }
    let n = std::env::var("TACFLOW_FUZZ_INPUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let report = Fuzzer::new(0x7ac_f10e, corpus).run(n, check);
    assert_eq!(report.inputs, n);
    assert!(report.by_source.iter().all(|&k| k > 0), "{report:?}");
    // A hang would show as one slow input (a debug build is slow, not
    // that slow).
    assert!(report.slowest < Duration::from_secs(2), "{report:?}");
}
