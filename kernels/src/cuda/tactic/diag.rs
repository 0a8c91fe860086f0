//! Launch of the diagnostics kernel (`tactic/diag.cuh`): what the last
//! selection kept, measured exactly, for the sequences that opened with
//! `diagnostics: true`. Only then is it launched, and only then does the
//! caller read its records back (one small copy per step).

use super::{TacticShape, TacticWorkspace};
use crate::cuda::device::Gpu;
use crate::cuda::kv::KvCache;
use crate::cuda::step::DeviceStep;
use crate::error::{Error, Result};
use cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig};

use super::select::{SelectJob, check_queries};

/// `DIAG_THREADS` (tactic/diag.cuh).
const DIAG_THREADS: usize = 256;

#[repr(C)]
struct DiagParams {
    probs: u64,
    qkv: u64,
    k: u64,
    table_off: u64,
    tables: u64,
    list: u64,
    list_len: u64,
    est: u64,
    out: u64,
    problems: u32,
    qkv_stride: u32,
    kv_heads: u32,
    d: u32,
    group: u32,
    pad: u32,
}

// SAFETY: a `#[repr(C)]` mirror of `DiagParams` in tactic/diag.cuh (nine
// u64, then six u32: no padding).
unsafe impl DeviceRepr for DiagParams {}

/// One job's diagnostics: per query head of its group, the true mass of
/// its selection and the estimate the selection made; the slots it
/// selected and the clusters its state kept (the tokens it read follow
/// from those: `tactic::union::chunked_tokens_read`).
#[derive(Debug, Clone, PartialEq)]
pub struct JobDiag {
    pub mass: Vec<f64>,
    pub est: Vec<f64>,
    pub selected: usize,
    pub clusters: usize,
}

/// Doubles per job in the kernel's records.
pub fn diag_record_len(group: usize) -> usize {
    2 * group + 2
}

/// The kernel's records (`[jobs][2G + 2]`) as [`JobDiag`]s.
pub fn parse_diag(raw: &[f64], group: usize) -> Vec<JobDiag> {
    raw.chunks_exact(diag_record_len(group))
        .map(|r| JobDiag {
            mass: r[..group].to_vec(),
            est: r[group..2 * group].to_vec(),
            selected: r[2 * group] as usize,
            clusters: r[2 * group + 1] as usize,
        })
        .collect()
}

impl Gpu {
    /// Measures the last [`Gpu::tactic_select`] or [`Gpu::tactic_oracle`]
    /// (over the same `jobs`):
    /// returns a fresh device buffer of one record per job
    /// ([`parse_diag`] reads it), so that the records of every layer of a
    /// step can wait on the device until the step reads them at once.
    #[allow(clippy::too_many_arguments)]
    pub fn tactic_measure(
        &self,
        ws: &mut TacticWorkspace,
        step: &DeviceStep,
        qkv: &impl DevicePtr<f32>,
        qkv_stride: usize,
        kv: &KvCache,
        layer: usize,
        shape: &TacticShape,
        jobs: &[SelectJob],
    ) -> Result<CudaSlice<f64>> {
        let (g, d, np) = (shape.group, shape.head_dim, jobs.len());
        if ws.sel_count != np || np == 0 {
            return Err(Error::Shape(format!(
                "Tactic diagnostics of {np} jobs after a selection of {}",
                ws.sel_count
            )));
        }
        check_queries("tactic_measure qkv", qkv.len(), qkv_stride, shape, step)?;
        let out = self.alloc::<f64>(np * diag_record_len(g))?;
        let (k_ptr, _) = kv.layer_ptrs(self, layer)?;
        let probs = ws.sel_probs.as_ref().expect("set with sel_count");
        let p = DiagParams {
            probs: self.ptr(probs),
            qkv: self.ptr(qkv),
            k: k_ptr,
            table_off: step.table_off(self),
            tables: step.tables(self),
            list: self.ptr(ws.list.get()?),
            list_len: self.ptr(ws.list_len.get()?),
            // A baseline's selection (no estimate) leaves this scratch as
            // it was, or unallocated: its records' estimates mean nothing.
            est: ws.est.at_least(self, np * g)?,
            out: self.ptr(&out),
            problems: np as u32,
            qkv_stride: qkv_stride as u32,
            kv_heads: shape.kv_heads as u32,
            d: d as u32,
            group: g as u32,
            pad: 0,
        };
        let cfg = LaunchConfig {
            grid_dim: (g as u32, np as u32, 1),
            block_dim: (DIAG_THREADS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the problems, lists, lengths and estimates are the last
        // selection's over these jobs (counted above): each problem's
        // state holds its layout, its row's key count is its context and
        // its list holds `list_len` slots below it; the query heads of
        // its KV head lie inside the rows of `qkv` (checked by the
        // selection); `out` holds jobs x (2G + 2) doubles.
        unsafe { self.launch("tactic_diag_mass_bf16", cfg, &p)? };
        Ok(out)
    }

    /// Records of [`Gpu::tactic_measure`] on the host (synchronises).
    pub fn tactic_diag_to_host(
        &self,
        buf: &CudaSlice<f64>,
        jobs: usize,
        group: usize,
    ) -> Result<Vec<JobDiag>> {
        let raw = self.download(buf, jobs * diag_record_len(group))?;
        Ok(parse_diag(&raw, group))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back_per_job() {
        let raw = [0.5, 0.25, 0.4, 0.3, 7.0, 3.0, 1.0, 1.0, 1.0, 1.0, 2.0, 0.0];
        let got = parse_diag(&raw, 2);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].mass, [0.5, 0.25]);
        assert_eq!(got[0].est, [0.4, 0.3]);
        assert_eq!((got[0].selected, got[0].clusters), (7, 3));
        assert_eq!((got[1].selected, got[1].clusters), (2, 0));
    }
}
