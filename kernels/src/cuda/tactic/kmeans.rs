//! Launches of the batched k-means (`tactic/kmeans.cuh`).

use super::{TacticShape, TacticWorkspace, bases, check_layout, u32_of};
use crate::cuda::device::Gpu;
use crate::cuda::kv::KvCache;
use crate::cuda::step::DeviceStep;
use crate::error::{Error, Result};
use crate::tactic::KMeansParams;
use crate::tactic::layout::StateLayout;
use cudarc::driver::{DeviceRepr, LaunchConfig};

/// `KM_TILE`, `KM_ASSIGN_THREADS`, `KM_WARPS`, `KM_SHAPE_*` and
/// `KM_CSR_THREADS` in tactic/kmeans.cuh.
const TILE: usize = 32;
const ASSIGN_THREADS: usize = 128;
const WARPS: usize = 8;
const SHAPE_ROWS: usize = 8;
const SHAPE_STAGE: usize = 8;
const SHAPE_THREADS: usize = 256;
const CSR_THREADS: usize = 1024;

/// A run of slots `start..start + n` of one (sequence, KV head), clustered
/// into at most `k` clusters appended to the state at `state`.
#[derive(Debug, Clone, Copy)]
pub struct ClusterJob {
    pub state: u64,
    pub layout: StateLayout,
    pub head: usize,
    /// A row of the sequence in the step (where its block table is): its
    /// decode row, or its prompt's last row (the run may then cover that
    /// row's own key).
    pub row: usize,
    pub start: usize,
    pub n: usize,
    pub k: usize,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct KmProblem {
    state: u64,
    lay: StateLayout,
    head: u32,
    row: u32,
    start: u32,
    n: u32,
    k: u32,
    work: u32,
    kwork: u32,
    koff: u32,
}

#[repr(C)]
struct KmParams {
    probs: u64,
    k: u64,
    table_off: u64,
    tables: u64,
    cent: u64,
    norms: u64,
    assign: u64,
    counts: u64,
    offs: u64,
    members: u64,
    changed: u64,
    mu: u64,
    cov: u64,
    seed: u64,
    problems: u32,
    kv_heads: u32,
    d: u32,
    round: u32,
}

// SAFETY: `#[repr(C)]` mirrors of the structs in tactic/kmeans.cuh.
unsafe impl DeviceRepr for KmProblem {}
unsafe impl DeviceRepr for KmParams {}

/// Where each job's part of the scratch starts, and the totals.
#[derive(Debug, PartialEq)]
struct KmPlan {
    work: Vec<usize>,
    kwork: Vec<usize>,
    koff: Vec<usize>,
    /// Keys, clusters, CSR offsets over all jobs.
    n: usize,
    k: usize,
    offs: usize,
    max_n: usize,
    max_k: usize,
}

impl KmPlan {
    fn new(jobs: &[ClusterJob]) -> KmPlan {
        let (work, n) = bases(jobs.iter().map(|j| j.n));
        let (kwork, k) = bases(jobs.iter().map(|j| j.k));
        let (koff, offs) = bases(jobs.iter().map(|j| j.k + 1));
        KmPlan {
            work,
            kwork,
            koff,
            n,
            k,
            offs,
            max_n: jobs.iter().map(|j| j.n).max().unwrap_or(0),
            max_k: jobs.iter().map(|j| j.k).max().unwrap_or(0),
        }
    }
}

fn check_job(j: &ClusterJob, shape: &TacticShape, step: &DeviceStep) -> Result<()> {
    check_layout(&j.layout, shape)?;
    let l = &j.layout;
    let ok = j.n > 0
        && (1..=j.n).contains(&j.k)
        && j.head < shape.kv_heads
        && j.row < step.rows
        && j.start + j.n <= l.len as usize
        && j.start + j.n <= step.kv_len[j.row] as usize
        && j.k <= l.cap as usize;
    if !ok {
        return Err(Error::Shape(format!(
            "Tactic clustering of slots {}..{} into {} clusters (head {}, row {}) in a state of {} slots and {} clusters",
            j.start,
            j.start + j.n,
            j.k,
            j.head,
            j.row,
            l.len,
            l.cap
        )));
    }
    Ok(())
}

impl Gpu {
    /// Clusters each job's run of keys (layer `layer` of `kv`, through the
    /// step's block tables) and appends the clusters to its state, as
    /// `ClusterIndex::extend` does on the CPU: stratified initialisation
    /// from `km.seed`, `km.iterations` Lloyd rounds stopping where the
    /// assignment settles, a final assignment and update, empty clusters
    /// dropped, sizes, spreads and the pooled shape re-weighted.
    #[allow(clippy::too_many_arguments)]
    pub fn tactic_cluster(
        &self,
        ws: &mut TacticWorkspace,
        step: &DeviceStep,
        kv: &KvCache,
        layer: usize,
        shape: &TacticShape,
        jobs: &[ClusterJob],
        km: &KMeansParams,
    ) -> Result<()> {
        if jobs.is_empty() {
            return Ok(());
        }
        shape.check()?;
        for j in jobs {
            check_job(j, shape, step)?;
        }
        let d = shape.head_dim;
        let plan = KmPlan::new(jobs);
        let probs: Vec<KmProblem> = jobs
            .iter()
            .enumerate()
            .map(|(i, j)| {
                Ok(KmProblem {
                    state: j.state,
                    lay: j.layout,
                    head: j.head as u32,
                    row: j.row as u32,
                    start: j.start as u32,
                    n: j.n as u32,
                    k: j.k as u32,
                    work: u32_of(plan.work[i], "k-means keys")?,
                    kwork: u32_of(plan.kwork[i], "k-means clusters")?,
                    koff: u32_of(plan.koff[i], "k-means offsets")?,
                })
            })
            .collect::<Result<_>>()?;
        let rounds = km.iterations + 1;
        let np = jobs.len();
        let probs_dev = self.upload(&probs)?;
        let (k_ptr, _) = kv.layer_ptrs(self, layer)?;
        let changed = ws.changed.at_least(self, rounds * np)?;
        let mut p = KmParams {
            probs: self.ptr(&probs_dev),
            k: k_ptr,
            table_off: step.table_off(self),
            tables: step.tables(self),
            cent: ws.cent.at_least(self, plan.k * d)?,
            norms: ws.norms.at_least(self, plan.k)?,
            assign: ws.assign.at_least(self, plan.n)?,
            counts: ws.counts.at_least(self, plan.k)?,
            offs: ws.offs.at_least(self, plan.offs)?,
            members: ws.members.at_least(self, plan.n)?,
            changed,
            mu: ws.mu.at_least(self, plan.k * d)?,
            cov: ws.cov.at_least(self, np * d * d)?,
            seed: km.seed,
            problems: np as u32,
            kv_heads: shape.kv_heads as u32,
            d: d as u32,
            round: 0,
        };
        // Every round's flag starts clear (the kernels only ever set them).
        // SAFETY: `changed` was just sized to rounds x problems u32.
        unsafe { self.memset_bytes(changed, 4 * rounds * np, 0)? };
        let grid = |x: usize, y: usize, threads: usize, smem: usize| LaunchConfig {
            grid_dim: (x.max(1) as u32, y as u32, 1),
            block_dim: (threads as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let per_cluster = grid(plan.max_k.div_ceil(WARPS), np, 32 * WARPS, 0);
        // SAFETY (every launch below): each problem's state holds the
        // layout it was given (checked against the model's shape), with
        // room for its run (slots start..start + n inside `len`, k clusters
        // inside `cap`); every slot of a run is cached (below its row's key
        // count) in blocks of the step's tables; the scratch buffers hold
        // the plan's totals (sum n, sum k, sum (k + 1), k x D, problems x
        // D x D, rounds x problems); D is a multiple of 8 (16-byte rows).
        unsafe {
            self.launch("tactic_km_init_bf16", grid(plan.max_k, np, 32, 0), &p)?;
            for round in 0..rounds {
                p.round = round as u32;
                let smem = 4 * TILE * (d + 1);
                let assign = grid(
                    plan.max_n.div_ceil(ASSIGN_THREADS),
                    np,
                    ASSIGN_THREADS,
                    smem,
                );
                self.launch("tactic_km_assign_bf16", assign, &p)?;
                self.launch("tactic_km_csr_u32", grid(np, 1, CSR_THREADS, 0), &p)?;
                self.launch("tactic_km_update_bf16", per_cluster, &p)?;
            }
            self.launch("tactic_km_compact_u32", grid(np, 1, CSR_THREADS, 0), &p)?;
            self.launch("tactic_km_stats_bf16", per_cluster, &p)?;
            let shape_grid = grid(d / SHAPE_ROWS, np, SHAPE_THREADS, 8 * SHAPE_STAGE * d);
            self.launch("tactic_km_shape_bf16", shape_grid, &p)?;
            self.launch(
                "tactic_km_shape_norm_f64",
                grid(np, 1, SHAPE_THREADS, 0),
                &p,
            )?;
        }
        // The problems are read by every launch above; freed in stream order.
        drop(probs_dev);
        Ok(())
    }

    /// Sets `bytes` bytes at `ptr` to `value` (stream-ordered): clears the
    /// k-means flags, and poisons the parts of a state a self-check
    /// expects the kernels to write.
    ///
    /// # Safety
    /// `ptr` must address `bytes` bytes of one live allocation.
    pub unsafe fn memset_bytes(&self, ptr: u64, bytes: usize, value: u8) -> Result<()> {
        let stream = self.stream();
        // SAFETY: forwarded from the caller.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, value, bytes, stream.cu_stream()) }
            .map_err(crate::cuda::device::drv("cuMemsetD8Async"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(start: usize, n: usize, k: usize) -> ClusterJob {
        ClusterJob {
            state: 0,
            layout: StateLayout::new(2, 64, k, start + n),
            head: 0,
            row: 0,
            start,
            n,
            k,
        }
    }

    #[test]
    fn each_problem_gets_its_own_part_of_the_scratch() {
        let p = KmPlan::new(&[job(0, 99, 7), job(99, 16, 1), job(0, 5, 5)]);
        assert_eq!(p.work, [0, 99, 115]);
        assert_eq!(p.kwork, [0, 7, 8]);
        assert_eq!(p.koff, [0, 8, 10]);
        assert_eq!((p.n, p.k, p.offs, p.max_n, p.max_k), (120, 13, 16, 99, 7));
    }
}
