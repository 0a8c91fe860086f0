//! `bench-tactic`'s rows: a Markdown table (printed last) and the JSON.

use super::{Keys, Options};
use serde_json::{Value, json};

/// One (keys, context, batch, P) point.
#[derive(Debug, Clone)]
pub struct Row {
    pub backend: &'static str,
    pub keys: Keys,
    pub context: usize,
    pub batch: usize,
    pub p: f32,
    /// The calibration's oracle fraction at P = 0.9 on the first step's
    /// queries, mean over (sequence, KV head) (controlled keys).
    pub calibrated: Option<f64>,
    /// Means over (quality sequence, KV head, step): the oracle's tokens
    /// and Tactic's, over the context.
    pub oracle: f64,
    pub read: f64,
    /// Query heads whose selection's true mass reaches P.
    pub success: f64,
    /// Sequences the CPU reference measured.
    pub quality_seqs: usize,
    /// µs per layer (one step of the batch), steady steps' median:
    /// selection, attention (where the backend can time it apart), all.
    pub select_us: Option<f64>,
    pub attn_us: Option<f64>,
    pub all_us: f64,
    /// The product's full attention on the same cache and queries.
    pub full_us: f64,
    /// The first step (it clusters every sequence).
    pub first_us: f64,
    /// (first − steady) / batch.
    pub cluster_ms_per_seq: f64,
    /// K and V bytes of the tokens read over `all_us`; full attention's
    /// bytes over `full_us`.
    pub read_gbps: f64,
    pub full_gbps: f64,
    /// Largest |device − host path| over the quality sequences' outputs
    /// (0 on the CPU backend, where they must be equal).
    pub max_diff: f64,
}

fn keys_name(k: Keys) -> String {
    match k {
        Keys::Controlled(f) => format!("f={:.0}%", 100.0 * f),
        Keys::Real => "real".into(),
    }
}

fn opt(x: Option<f64>, prec: usize) -> String {
    x.map_or("—".into(), |v| format!("{v:.prec$}"))
}

pub fn print(opts: &Options, rows: &[Row]) {
    let (nh, kvh, d) = opts.shape;
    println!(
        "\nTactic's device path vs full attention, {} backend, one layer, {} steps, seed {}{}",
        rows.first().map_or("?", |r| r.backend),
        opts.steps,
        opts.seed,
        match &opts.keys {
            Some(dir) => format!(", real keys {}", dir.display()),
            None => format!(", controlled keys {nh}/{kvh}x{d}"),
        }
    );
    println!(
        "| keys | context | batch | P | oracle at 0.9 (target / calibrated) | oracle / ctx | read / ctx | read / oracle | success | select µs | attention µs | all µs | full µs | speedup | GB/s read (full) | clustering ms / seq |"
    );
    println!(
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in rows {
        println!("{}", line(r));
    }
}

/// A row of the table (also printed as each point ends).
pub fn line(r: &Row) -> String {
    let target = match r.keys {
        Keys::Controlled(f) => format!(
            "{:.1}% / {}%",
            100.0 * f,
            opt(r.calibrated.map(|c| 100.0 * c), 2)
        ),
        Keys::Real => "—".into(),
    };
    format!(
        "| {} | {} | {} | {} | {} | {:.2}% | {:.2}% | {:.2}x | {:.1}% | {} | {} | {:.1} | {:.1} | {:.2}x | {:.2} ({:.2}) | {:.2} |",
        keys_name(r.keys),
        r.context,
        r.batch,
        r.p,
        target,
        100.0 * r.oracle,
        100.0 * r.read,
        r.read / r.oracle,
        100.0 * r.success,
        opt(r.select_us, 1),
        opt(r.attn_us, 1),
        r.all_us,
        r.full_us,
        r.full_us / r.all_us,
        r.read_gbps,
        r.full_gbps,
        r.cluster_ms_per_seq
    )
}

pub fn json(opts: &Options, rows: &[Row]) -> Value {
    let v: Vec<Value> = rows
        .iter()
        .map(|r| {
            json!({
                "backend": r.backend,
                "keys": match r.keys { Keys::Controlled(_) => "controlled", Keys::Real => "real" },
                "target_fraction": match r.keys { Keys::Controlled(f) => Some(f), Keys::Real => None },
                "calibrated_fraction": r.calibrated,
                "context": r.context, "batch": r.batch, "p": r.p,
                "oracle": r.oracle, "read": r.read, "read_over_oracle": r.read / r.oracle,
                "success": r.success, "quality_seqs": r.quality_seqs,
                "select_us": r.select_us, "attention_us": r.attn_us, "all_us": r.all_us,
                "full_us": r.full_us, "speedup": r.full_us / r.all_us,
                "first_step_us": r.first_us, "clustering_ms_per_seq": r.cluster_ms_per_seq,
                "read_gbps": r.read_gbps, "full_gbps": r.full_gbps, "max_abs_diff": r.max_diff,
            })
        })
        .collect();
    json!({
        "shape": [opts.shape.0, opts.shape.1, opts.shape.2],
        "steps": opts.steps, "seed": opts.seed,
        "keys": opts.keys.as_ref().map(|k| k.display().to_string()),
        "rows": v,
    })
}
