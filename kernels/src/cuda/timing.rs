//! What benchmarks need from the device: intervals timed by CUDA events on
//! the current lane's stream (`tune`'s profile and `bench-serve`'s step
//! timeline use them too), and, in the lab, the device-to-device copy that
//! sets the bandwidth ceiling and a kernel that holds the stream while the
//! host enqueues work.

use super::device::{Gpu, drv};
use crate::error::Result;
use cudarc::driver::{CudaEvent, sys};
#[cfg(feature = "lab")]
use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig};

/// An interval of the stream between two timing events.
#[derive(Debug)]
pub struct Span {
    start: CudaEvent,
    end: CudaEvent,
}

/// A point of a lane's stream, timed: intervals between marks, on any
/// lanes, come from [`Mark::ms_since`].
#[derive(Debug)]
pub struct Mark {
    event: CudaEvent,
}

impl Mark {
    /// Marks the current lane's stream after the work issued on it so far.
    pub fn record(&self, gpu: &Gpu) -> Result<()> {
        self.event
            .record(gpu.stream())
            .map_err(drv("cuEventRecord"))
    }

    /// Milliseconds from `earlier` to this mark (waits for this one).
    pub fn ms_since(&self, earlier: &Mark) -> Result<f64> {
        Ok(earlier
            .event
            .elapsed_ms(&self.event)
            .map_err(drv("cuEventElapsedTime"))? as f64)
    }
}

#[cfg(feature = "lab")]
#[repr(C)]
struct SpinParams {
    ns: u64,
}

// SAFETY: `#[repr(C)]` mirror of the struct in lab/bench.cu.
#[cfg(feature = "lab")]
unsafe impl DeviceRepr for SpinParams {}

impl Span {
    /// Marks the start: work issued after this is inside the interval.
    pub fn start(&self, gpu: &Gpu) -> Result<()> {
        self.start
            .record(gpu.stream())
            .map_err(drv("cuEventRecord"))
    }

    /// Marks the end: work issued before this is inside the interval.
    pub fn stop(&self, gpu: &Gpu) -> Result<()> {
        self.end.record(gpu.stream()).map_err(drv("cuEventRecord"))
    }

    /// Milliseconds between the marks (waits for the end mark).
    pub fn ms(&self) -> Result<f64> {
        Ok(self
            .start
            .elapsed_ms(&self.end)
            .map_err(drv("cuEventElapsedTime"))? as f64)
    }
}

impl Gpu {
    /// A fresh timing event, in the device's own context as the lanes'
    /// events are (`lane.rs`), so that marks on different lanes compare.
    fn timing_event(&self) -> Result<CudaEvent> {
        self.device_context()
            .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(drv("cuEventCreate"))
    }

    /// Two fresh timing events.
    pub fn span(&self) -> Result<Span> {
        Ok(Span {
            start: self.timing_event()?,
            end: self.timing_event()?,
        })
    }

    /// A fresh timing mark, not yet recorded.
    pub fn mark(&self) -> Result<Mark> {
        Ok(Mark {
            event: self.timing_event()?,
        })
    }
}

#[cfg(feature = "lab")]
impl Gpu {
    /// `dst = src` on the device (cuMemcpyDtoDAsync).
    pub fn copy_d2d<T: DeviceRepr>(
        &self,
        src: &CudaSlice<T>,
        dst: &mut CudaSlice<T>,
    ) -> Result<()> {
        self.stream()
            .memcpy_dtod(src, dst)
            .map_err(drv("cuMemcpyDtoDAsync"))
    }

    /// Holds the stream for `ns` nanoseconds.
    pub fn spin_wait(&self, ns: u64) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel touches no memory.
        unsafe { self.launch("spin_wait", cfg, &SpinParams { ns }) }
    }
}

#[cfg(feature = "lab")]
#[repr(C)]
struct ReadParams {
    src: u64,
    n: u64,
    out: u64,
}

// SAFETY: `#[repr(C)]` mirror of the struct in lab/bench.cu.
#[cfg(feature = "lab")]
unsafe impl DeviceRepr for ReadParams {}

#[cfg(feature = "lab")]
impl Gpu {
    /// Reads every 16-byte word of `src` once (`read_ceiling`): the read
    /// bandwidth that decode attention could reach at best. `sink` is never
    /// written in practice.
    pub fn read_all<T: DeviceRepr>(
        &self,
        src: &CudaSlice<T>,
        sink: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let n = src.num_bytes() / 16;
        let p = ReadParams {
            src: self.ptr(src),
            n: n as u64,
            out: self.ptr(sink),
        };
        let cfg = LaunchConfig {
            grid_dim: ((self.info().sm_count * 8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel reads the first n 16-byte words of src (its
        // whole length rounded down) and may write sink[0].
        unsafe { self.launch("read_ceiling", cfg, &p) }
    }
}
