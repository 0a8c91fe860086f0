//! The long run of the stable fuzzer (`tacflow_ipc::fuzz`):
//!
//! ```text
//! cargo run --release -p tacflow-ipc --example fuzz -- --inputs 1000000 --seed 1
//! cargo run --release -p tacflow-ipc --example fuzz -- --write-corpus fuzz/corpus/request
//! ```
//!
//! The second form writes the shared vectors in the libFuzzer input format
//! (kind byte, then header) as a seed corpus for `fuzz/`.

use std::path::PathBuf;
use tacflow_ipc::fuzz::{Fuzzer, check, generate::load_corpus};

fn main() {
    let mut inputs: u64 = 1_000_000;
    let mut seed: u64 = 1;
    let mut corpus_out: Option<PathBuf> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--inputs" => inputs = value().parse().expect("--inputs N"),
            "--seed" => seed = value().parse().expect("--seed N"),
            "--write-corpus" => corpus_out = Some(value().into()),
            other => panic!("unknown argument {other}"),
        }
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors");
    let corpus = load_corpus(&dir).expect("the shared vectors");
    if let Some(out) = corpus_out {
        std::fs::create_dir_all(&out).expect("corpus folder");
        for (i, input) in corpus.iter().enumerate() {
            std::fs::write(out.join(format!("vector-{i:02}")), input).expect("write");
        }
        println!("wrote {} seeds to {}", corpus.len(), out.display());
        return;
    }
    let report = Fuzzer::new(seed, corpus).run(inputs, check);
    let secs = report.elapsed.as_secs_f64();
    println!(
        "fuzz: {} inputs, seed {seed}, {secs:.1} s ({:.0}/s), slowest input {:.1} ms, \
         by source [mutated vectors, random msgpack, structured requests, companion packets, \
         deep nesting] = {:?}: no crash, no hang",
        report.inputs,
        report.inputs as f64 / secs,
        report.slowest.as_secs_f64() * 1e3,
        report.by_source
    );
}
