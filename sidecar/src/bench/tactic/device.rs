//! The backend a `bench-tactic` point runs on: the CPU backend with its
//! device path (the host stand-in of the kernels), or the CUDA backend with
//! the experimental GPU Tactic, built as the daemon builds it. What the
//! bench needs beyond [`Backend`]: activations from and to the host, and a
//! synchronisation around each timed call.

use crate::backend::Backend;
use crate::backend::cpu::{CpuBackend, Mat};
use crate::backend::cuda::{Act, CudaBackend};
use crate::config::Config;
use crate::error::{Error, Result};

pub trait Device {
    type B: Backend;
    fn backend(&self) -> &Self::B;
    /// `[rows, cols]` of f32 as an activation.
    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> Result<<Self::B as Backend>::Act>;
    fn download(&self, a: &<Self::B as Backend>::Act) -> Result<Vec<f32>>;
    /// Waits for every op issued so far (a no-op on the CPU).
    fn sync(&self) -> Result<()>;
    /// Bytes per cached K or V value (the cache's dtype).
    fn kv_value_bytes(&self) -> usize;
    /// Whether the host path runs on this very backend, so that the device
    /// path's output must equal it bit for bit.
    fn is_host(&self) -> bool;
    fn name(&self) -> &'static str;
    /// Microseconds of (clustering, selection, attention) inside the
    /// device path since the last call, where the backend times them.
    fn phases_us(&self) -> Result<Option<[f64; 3]>> {
        Ok(None)
    }
}

/// The CPU backend with Tactic's device path (`with_device_tactic`).
pub struct Cpu(pub CpuBackend);

impl Default for Cpu {
    fn default() -> Cpu {
        Cpu(CpuBackend::default().with_device_tactic())
    }
}

impl Device for Cpu {
    type B = CpuBackend;
    fn backend(&self) -> &CpuBackend {
        &self.0
    }
    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> Result<Mat> {
        Ok(Mat {
            data: data.to_vec(),
            rows,
            cols,
        })
    }
    fn download(&self, a: &Mat) -> Result<Vec<f32>> {
        Ok(a.data.clone())
    }
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn kv_value_bytes(&self) -> usize {
        4
    }
    fn is_host(&self) -> bool {
        true
    }
    fn name(&self) -> &'static str {
        "cpu"
    }
}

/// The CUDA backend on device 0 with `experimental_gpu_tactic`, built by
/// the same chain of options as the daemon's executor (`server::spawn`),
/// from the defaults plus that option.
pub struct Cuda(pub CudaBackend);

impl Cuda {
    pub fn new() -> Result<Cuda> {
        let config = Config {
            experimental_gpu_tactic: true,
            ..Config::default()
        };
        let b = CudaBackend::with_lanes(0, config.gpu_lanes)
            .and_then(|b| b.with_activations(config.activations()))
            .and_then(|b| b.with_graphs(config.graphs()))
            .and_then(|b| b.with_gpu_tactic(config.experimental_gpu_tactic))
            .map_err(|e| {
                Error::Backend(format!(
                    "bench-tactic --backend cuda needs a CUDA GPU (no fallback to the CPU): {e}"
                ))
            })?;
        b.time_tactic_phases()?;
        Ok(Cuda(b))
    }
}

impl Device for Cuda {
    type B = CudaBackend;
    fn backend(&self) -> &CudaBackend {
        &self.0
    }
    fn upload(&self, rows: usize, cols: usize, data: &[f32]) -> Result<Act> {
        self.0.act_from_host(rows, cols, data, false)
    }
    fn download(&self, a: &Act) -> Result<Vec<f32>> {
        self.0.act_to_host(a)
    }
    fn sync(&self) -> Result<()> {
        Ok(self.0.gpu().synchronize()?)
    }
    fn kv_value_bytes(&self) -> usize {
        2
    }
    fn is_host(&self) -> bool {
        false
    }
    fn name(&self) -> &'static str {
        "cuda"
    }
    fn phases_us(&self) -> Result<Option<[f64; 3]>> {
        Ok(self.0.tactic_phases_ms()?.map(|ms| ms.map(|x| x * 1e3)))
    }
}
