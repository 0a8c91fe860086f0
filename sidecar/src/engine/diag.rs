//! What a step's sparse selections kept, as the engine reports it: one
//! sequence's sums over a step (all layers), its step diagnostics (the
//! step reply's), and the daemon-wide totals per policy (`stats`).

use std::collections::BTreeMap;
use tacflow_ipc::{AttentionDiagnostics, PolicyStats};

/// Running sums of one sequence's diagnostics over one step (all layers).
#[derive(Debug, Clone, Default)]
pub(super) struct Sums {
    /// `[layer][query head]` true mass.
    pub mass: Vec<Vec<f64>>,
    pub est: Vec<Vec<f64>>,
    /// `[layer][kv head]` token-equivalents read and tokens selected, over
    /// the context length.
    pub read: Vec<Vec<f64>>,
    pub selected: Vec<Vec<f64>>,
}

/// One decode step's diagnostics for one sequence, over every layer and head.
#[derive(Debug, Clone)]
pub struct StepDiag {
    pub target: f32,
    /// `[layer][query head]`.
    pub mass: Vec<Vec<f64>>,
    /// `[layer][kv head]`, over the context length.
    pub read: Vec<Vec<f64>>,
    pub summary: AttentionDiagnostics,
}

fn mean2(x: &[Vec<f64>]) -> f64 {
    let n: usize = x.iter().map(Vec::len).sum();
    x.iter().flatten().sum::<f64>() / n.max(1) as f64
}

impl StepDiag {
    pub(super) fn from_sums(s: &Sums, target: f32) -> StepDiag {
        let all: Vec<f64> = s.mass.iter().flatten().copied().collect();
        let ok = all.iter().filter(|&&m| m >= f64::from(target)).count();
        StepDiag {
            target,
            mass: s.mass.clone(),
            read: s.read.clone(),
            summary: AttentionDiagnostics {
                policy: String::new(),
                tokens_read_fraction: mean2(&s.read),
                selected_fraction: mean2(&s.selected),
                true_mass: mean2(&s.mass),
                estimated_mass: mean2(&s.est),
                min_true_mass: all.iter().copied().fold(f64::INFINITY, f64::min),
                success_rate: ok as f64 / all.len().max(1) as f64,
            },
        }
    }

    /// Diagnostics of full attention: every token, all the mass.
    pub fn full() -> AttentionDiagnostics {
        AttentionDiagnostics {
            policy: "full".into(),
            tokens_read_fraction: 1.0,
            selected_fraction: 1.0,
            true_mass: 1.0,
            estimated_mass: 1.0,
            min_true_mass: 1.0,
            success_rate: 1.0,
        }
    }
}

/// Daemon-wide aggregates per policy (what `stats` reports).
#[derive(Debug, Default)]
pub struct PolicyTotals {
    steps: u64,
    mass: Vec<Vec<f64>>,
    read: Vec<Vec<f64>>,
    successes: f64,
    observations: f64,
}

impl PolicyTotals {
    pub fn add(&mut self, d: &StepDiag) {
        if self.mass.is_empty() {
            self.mass = vec![vec![0.0; d.mass[0].len()]; d.mass.len()];
            self.read = vec![vec![0.0; d.read[0].len()]; d.read.len()];
        }
        for (acc, x) in self.mass.iter_mut().flatten().zip(d.mass.iter().flatten()) {
            *acc += x;
        }
        for (acc, x) in self.read.iter_mut().flatten().zip(d.read.iter().flatten()) {
            *acc += x;
        }
        let n = d.mass.iter().map(Vec::len).sum::<usize>() as f64;
        self.successes += d.summary.success_rate * n;
        self.observations += n;
        self.steps += 1;
    }

    pub fn stats(&self) -> PolicyStats {
        let n = self.steps.max(1) as f64;
        let per = |x: &Vec<Vec<f64>>| -> Vec<Vec<f64>> {
            x.iter()
                .map(|r| r.iter().map(|v| v / n).collect())
                .collect()
        };
        let mass = per(&self.mass);
        let read = per(&self.read);
        PolicyStats {
            decode_steps: self.steps,
            tokens_read_fraction: mean2(&read),
            true_mass: mean2(&mass),
            success_rate: self.successes / self.observations.max(1.0),
            true_mass_by_layer_head: mass,
            tokens_read_by_layer_head: read,
        }
    }
}

/// Publishes every policy's totals (the I/O thread reads them for `stats`).
pub fn publish(totals: &BTreeMap<String, PolicyTotals>) -> BTreeMap<String, PolicyStats> {
    totals.iter().map(|(k, v)| (k.clone(), v.stats())).collect()
}
