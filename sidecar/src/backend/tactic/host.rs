//! The device path on the host: what the GPU kernels do to a layer's
//! planned states, done by the CPU reference on host memory laid out as
//! the device's ([`StateLayout`]). The CPU backend runs Tactic this way when
//! told to (`CpuBackend::with_device_tactic`), so that everything of the
//! device path but the kernels themselves (states, growth, forks, failed
//! steps, the engine's and the model's wiring) runs and is tested without a
//! GPU, and gives the same selections as the host path
//! (`engine::sparse`), by the argument of `tacflow_kernels::tactic::union`.
//!
//! [`StateLayout`]: tacflow_kernels::tactic::layout::StateLayout

use super::driver::{Planned, TacticDevice};
use super::measure::{MeasureAt, TacticMeasure};
use super::mem::HostMemory;
use crate::backend::{Baseline, StepMeta, TacticEntry};
use crate::error::{Error, Result};
use tacflow_kernels::cpu::KvLayer;
use tacflow_kernels::tactic::layout::{read_heads, write_heads};
use tacflow_kernels::tactic::union::{UNION_CHUNK, select_group_chunked};
use tacflow_kernels::tactic::{
    PageBounds, PagedKeys, Scratch, exact_scores, fixed_budget, oracle_top_p,
};

/// The CPU backend's Tactic states and the memory they live in.
#[derive(Debug, Default)]
pub struct HostTactic {
    pub dev: TacticDevice<HostMemory>,
    pub mem: HostMemory,
    /// This step's measures of the entries that asked for diagnostics.
    pub measured: Vec<TacticMeasure>,
}

/// What one layer's selection needs from the step.
#[derive(Debug, Clone, Copy)]
pub struct HostLayer<'a> {
    pub layer: usize,
    pub kv: KvLayer<'a>,
    pub meta: &'a StepMeta,
    /// The step's fused rows and their width.
    pub qkv: &'a [f32],
    pub row_len: usize,
    /// Query heads per KV head.
    pub group: usize,
}

impl HostTactic {
    pub fn new() -> HostTactic {
        HostTactic {
            dev: TacticDevice::default(),
            mem: HostMemory::new(),
            measured: Vec::new(),
        }
    }

    /// The selections of the entries: per entry, its sequence and each KV
    /// head's sorted slots (Tactic's, or a baseline's for an entry with
    /// one). The entries with `diagnostics` get their measures added to
    /// [`HostTactic::measured`].
    pub fn select(
        &mut self,
        at: &HostLayer<'_>,
        entries: &[TacticEntry],
    ) -> Result<Vec<(usize, Vec<Vec<u32>>)>> {
        let (baselines, tactic): (Vec<TacticEntry>, Vec<TacticEntry>) =
            entries.iter().partition(|e| e.baseline.is_some());
        let mut out = self.select_tactic(at, &tactic)?;
        for e in &baselines {
            let sel = (0..at.kv.kv_heads)
                .map(|h| self.select_baseline(at, e, h))
                .collect();
            out.push((e.seq, sel));
        }
        Ok(out)
    }

    /// The baseline kernels' work for one entry and KV head, as
    /// `engine::sparse::select_layer` selects on the host: the oracle's
    /// union over the query heads of `oracle_top_p` on the exact scores,
    /// or `fixed_budget` on page bounds built from the keys (the kernels
    /// build them each step; the host path keeps them: the same bounds).
    fn select_baseline(&mut self, at: &HostLayer<'_>, e: &TacticEntry, h: usize) -> Vec<u32> {
        let (g, d) = (at.group, at.kv.head_dim);
        let q = &at.qkv[e.row * at.row_len + h * g * d..][..g * d];
        let keys = entry_keys(at, e, h);
        let mut sel = vec![];
        let (est, read) = match e.baseline.expect("a baseline entry") {
            Baseline::Oracle { p } => {
                let (mut scores, mut order) = (vec![], vec![]);
                for qh in q.chunks_exact(d) {
                    exact_scores(&keys, qh, e.ctx_len, &mut scores);
                    oracle_top_p(&scores, p, &mut order, &mut sel);
                }
                sel.sort_unstable();
                sel.dedup();
                // The oracle knows its mass and reads its set.
                (None, sel.len() as f64)
            }
            Baseline::Budget { tokens } => {
                let page = at.kv.block_size;
                let covered = (e.ctx_len / page) * page;
                let bounds = PageBounds::build(&keys, covered, page);
                let read = fixed_budget(&bounds, q, e.ctx_len, tokens, &mut sel);
                // A fixed budget estimates no mass.
                (Some(f64::NAN), read)
            }
        };
        if e.diagnostics {
            let at_ = measure_at(e, at.layer, h);
            let mut m = TacticMeasure::on_host(at_, &keys, q, &sel, &[], read);
            m.est = match est {
                Some(x) => vec![x; g],
                None => m.mass.clone(),
            };
            self.measured.push(m);
        }
        sel
    }

    /// Plans the Tactic entries' states of `at.layer`, clusters the runs
    /// the plans ask for into them (the clustering kernels' work) and
    /// selects (the selection kernels'); a prompt's end only clusters.
    fn select_tactic(
        &mut self,
        at: &HostLayer<'_>,
        entries: &[TacticEntry],
    ) -> Result<Vec<(usize, Vec<Vec<u32>>)>> {
        let planned = self.dev.plan(&self.mem, at.layer, entries)?;
        for p in &planned {
            self.cluster(at, p)?;
        }
        let states = self.dev.states().expect("planned above");
        let mut scratch = Scratch::default();
        let measured = &mut self.measured;
        planned
            .iter()
            .filter(|p| !p.entry.prompt_end)
            .map(|p| {
                let st = states
                    .layer(p.entry.state, at.layer)
                    .ok_or_else(|| Error::Backend("a planned state is gone".into()))?;
                let heads = read_heads(&p.plan.layout, &st.buf.data, p.plan.layout.len as usize);
                let (g, d) = (at.group, at.kv.head_dim);
                let row = &at.qkv[p.entry.row * at.row_len..];
                let mut est = vec![0.0f32; g];
                let sel = heads
                    .iter()
                    .enumerate()
                    .map(|(h, ix)| {
                        let mut out = Vec::new();
                        let (keys, q) = (keys(at, p, h), &row[h * g * d..(h + 1) * g * d]);
                        let st = select_group_chunked(
                            ix,
                            &keys,
                            q,
                            p.entry.ctx_len,
                            &p.plan.params,
                            UNION_CHUNK,
                            &mut scratch,
                            &mut out,
                            &mut est,
                        );
                        if p.entry.diagnostics {
                            let m = measure_at(&p.entry, at.layer, h);
                            let read = st.tokens_read;
                            measured.push(TacticMeasure::on_host(m, &keys, q, &out, &est, read));
                        }
                        out
                    })
                    .collect();
                Ok((p.entry.seq, sel))
            })
            .collect()
    }

    /// The clustering kernels' work for one planned entry: its run of keys
    /// clustered per head and appended to the clusters its state holds.
    fn cluster(&mut self, at: &HostLayer<'_>, p: &Planned) -> Result<()> {
        let Some(run) = p.plan.run else {
            return Ok(());
        };
        let states = self.dev.states_mut().expect("planned");
        let buf = states
            .buffer_mut(p.entry.state, at.layer)
            .ok_or_else(|| Error::Backend("a state to cluster into is shared".into()))?;
        let l = p.plan.layout;
        let mut heads = read_heads(&l, &buf.data, run.start);
        for (h, ix) in heads.iter_mut().enumerate() {
            ix.extend(&keys(at, p, h), run.start + run.n, &p.plan.params.kmeans);
        }
        write_heads(&l, &heads, &mut buf.data);
        Ok(())
    }
}

fn keys<'a>(at: &HostLayer<'a>, p: &Planned, head: usize) -> PagedKeys<'a> {
    entry_keys(at, &p.entry, head)
}

fn entry_keys<'a>(at: &HostLayer<'a>, e: &TacticEntry, head: usize) -> PagedKeys<'a> {
    PagedKeys {
        kv: at.kv,
        block_table: &at.meta.seqs[e.seq].block_table,
        head,
    }
}

fn measure_at(e: &TacticEntry, layer: usize, head: usize) -> MeasureAt {
    MeasureAt {
        seq: e.seq,
        layer,
        head,
        ctx_len: e.ctx_len,
    }
}
