//! Lanes: the GPU's streams of work. A lane is a CUDA stream with what must
//! not be shared between concurrent streams: its own cuBLAS handle (bound
//! to the stream), its own split-attention workspace and its own GEMM
//! scratch. A [`Gpu`] owns its lanes; every launch, copy, memset, allocation
//! and cuBLAS call goes to the current lane, chosen by [`Gpu::use_lane`].
//!
//! What orders what:
//! - Within a lane, issue order (a CUDA stream).
//! - Between lanes, only events: [`Gpu::signal`] records a [`LaneEvent`] on
//!   the current lane, [`Gpu::wait`] makes the current lane wait for it.
//! - Lane 0 is the home lane: everything outside a multi-lane schedule runs
//!   there (a step's upload, activation allocation, sampling, downloads,
//!   block copies). A multi-lane schedule forks from lane 0 and joins back
//!   into it (`schedule::run` in the daemon), so lane 0's order stays a total
//!   order of everything outside schedules, and a buffer allocated, reused or
//!   freed there is ordered against every lane's use of it.
//! - The host: [`Gpu::synchronize`] waits for every lane, and so does
//!   [`Gpu::download`] (after making sure no other lane still writes).
//!
//! With one lane (the default) nothing here adds a call: one stream, one
//! handle, the launches of a single-stream build.

use super::attention::AttnWorkspace;
use super::device::{Gpu, drv};
use super::gemm::GemmScratch;
use super::green::GreenCtx;
use crate::error::{Error, Result};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// One stream and what only it may use.
pub(crate) struct Lane {
    pub(crate) stream: Arc<CudaStream>,
    pub(crate) blas: CudaBlas,
    /// Partials and counters of split attention: a launch on another lane
    /// may run at the same time, so each lane has its own.
    pub(crate) attn_ws: Mutex<AttnWorkspace>,
    /// The bf16 halves and two-half product of `gemm_nt_f32`, likewise.
    pub(crate) gemm_ws: Mutex<GemmScratch>,
    /// SMs the attention plan may fill on this lane (the bounded grid,
    /// `share.rs`); 0: the whole GPU, the plan of a lane without a cap.
    pub(crate) attn_sms: AtomicUsize,
    /// The kernels as loaded in this lane's green context (a module's
    /// functions belong to the context that loaded it); `None` on a lane
    /// of the device's own context, which uses the GPU's table.
    pub(crate) funcs: Option<HashMap<String, CudaFunction>>,
    /// cuBLAS's workspace, given to the handle once: without one of its
    /// own, cuBLAS allocates a workspace stream-ordered where a GEMM needs
    /// it (split-K at the 8B shapes), which a graph capture records as an
    /// allocation node and so cannot replay over persistent buffers. Last
    /// field: dropped after the handle that uses it.
    _blas_ws: CudaSlice<u8>,
    /// The green context this lane's stream lives in, if any: destroyed
    /// after everything above that runs in it (field order).
    pub(crate) green: Option<GreenCtx>,
}

/// cuBLAS's workspace per lane: the size cuBLAS documents for Hopper.
const BLAS_WORKSPACE_BYTES: usize = 32 << 20;

impl Lane {
    fn new(ctx: &Arc<CudaContext>) -> Result<Lane> {
        let stream = ctx.new_stream().map_err(drv("cuStreamCreate"))?;
        Lane::on(stream, None, None)
    }

    /// A lane on `stream`, with its own kernel table when the stream lives
    /// in a green context (`green`).
    pub(crate) fn on(
        stream: Arc<CudaStream>,
        funcs: Option<HashMap<String, CudaFunction>>,
        green: Option<GreenCtx>,
    ) -> Result<Lane> {
        let blas = CudaBlas::new(stream.clone()).map_err(|e| Error::Cublas {
            op: "cublasCreate",
            msg: e.to_string(),
        })?;
        let ws = stream
            .alloc_zeros::<u8>(BLAS_WORKSPACE_BYTES)
            .map_err(drv("cuMemAlloc"))?;
        let (ptr, _sync) = ws.device_ptr(&stream);
        // SAFETY: the handle is live; the workspace is a device allocation
        // of BLAS_WORKSPACE_BYTES that the lane keeps until after the
        // handle is destroyed (field order), and only this lane's stream,
        // the handle's, uses it.
        let status = unsafe {
            cudarc::cublas::sys::cublasSetWorkspace_v2(
                *blas.handle(),
                ptr as *mut std::ffi::c_void,
                BLAS_WORKSPACE_BYTES,
            )
        };
        if status != cudarc::cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(Error::Cublas {
                op: "cublasSetWorkspace",
                msg: format!("{status:?}"),
            });
        }
        drop(_sync);
        Ok(Lane {
            stream,
            blas,
            attn_ws: Mutex::new(AttnWorkspace::default()),
            gemm_ws: Mutex::new(GemmScratch::default()),
            attn_sms: AtomicUsize::new(0),
            funcs,
            _blas_ws: ws,
            green,
        })
    }
}

/// Which lane is current, out of how many. The backend is driven from one
/// thread (the executor); an atomic keeps `Gpu` `Sync` at no cost.
#[derive(Debug)]
pub(crate) struct Current {
    count: usize,
    now: AtomicUsize,
}

impl Current {
    pub(crate) fn new(count: usize) -> Current {
        Current {
            count,
            now: AtomicUsize::new(0),
        }
    }

    pub(crate) fn get(&self) -> usize {
        self.now.load(Ordering::Relaxed)
    }

    pub(crate) fn set(&self, lane: usize) -> Result<()> {
        if lane >= self.count {
            return Err(Error::Shape(format!(
                "lane {lane} of {} (gpu_lanes)",
                self.count
            )));
        }
        self.now.store(lane, Ordering::Relaxed);
        Ok(())
    }

    pub(crate) fn count(&self) -> usize {
        self.count
    }
}

/// Things handed out and given back for reuse (CUDA events: a step needs a
/// few dozen, and creating one costs a driver call).
#[derive(Debug)]
pub(crate) struct Recycle<T> {
    free: Arc<Mutex<Vec<T>>>,
}

impl<T> Default for Recycle<T> {
    fn default() -> Self {
        Recycle {
            free: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

impl<T> Recycle<T> {
    /// A free one, else `make()`; back here when the [`Held`] drops.
    pub(crate) fn take(&self, make: impl FnOnce() -> Result<T>) -> Result<Held<T>> {
        let reused = self.lock().pop();
        let item = match reused {
            Some(t) => t,
            None => make()?,
        };
        Ok(Held {
            item: Some(item),
            home: self.free.clone(),
        })
    }

    pub(crate) fn idle(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<T>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A recycled item, given back on drop.
#[derive(Debug)]
pub struct Held<T> {
    item: Option<T>,
    home: Arc<Mutex<Vec<T>>>,
}

impl<T> Held<T> {
    fn get(&self) -> &T {
        self.item.as_ref().expect("present until drop")
    }
}

impl<T> Drop for Held<T> {
    fn drop(&mut self) {
        if let Some(t) = self.item.take() {
            self.home.lock().unwrap_or_else(|e| e.into_inner()).push(t);
        }
    }
}

/// An ordering point between lanes: a CUDA event without timing, from the
/// GPU's pool. Reusing one is safe once it is dropped: a wait already issued
/// waits for the record it saw, whatever is recorded later.
pub type LaneEvent = Held<CudaEvent>;

/// Every lane of a GPU and the current one.
pub(crate) struct Lanes {
    pub(crate) all: Vec<Lane>,
    pub(crate) current: Current,
    events: Recycle<CudaEvent>,
}

impl Lanes {
    pub(crate) fn new(ctx: &Arc<CudaContext>, count: usize) -> Result<Lanes> {
        if count == 0 {
            return Err(Error::Shape("gpu_lanes must be at least 1".into()));
        }
        Ok(Lanes {
            all: (0..count).map(|_| Lane::new(ctx)).collect::<Result<_>>()?,
            current: Current::new(count),
            events: Recycle::default(),
        })
    }

    pub(crate) fn now(&self) -> &Lane {
        &self.all[self.current.get()]
    }
}

impl Gpu {
    /// Lanes this GPU runs (`gpu_lanes`).
    pub fn lanes(&self) -> usize {
        self.lanes.current.count()
    }

    /// The lane that the calls which follow go to.
    pub fn current_lane(&self) -> usize {
        self.lanes.current.get()
    }

    /// Sends the calls that follow to `lane`.
    pub fn use_lane(&self, lane: usize) -> Result<()> {
        self.lanes.current.set(lane)
    }

    /// An event from the pool (created with timing disabled when the pool
    /// is empty), in the device's own context: the parent of every lane's
    /// green context, if any (`share.rs`), whichever lane records it.
    pub fn new_event(&self) -> Result<LaneEvent> {
        let ctx = self.device_context();
        self.lanes
            .events
            .take(|| ctx.new_event(None).map_err(drv("cuEventCreate")))
    }

    /// Events waiting in the pool (tests, benchmarks).
    pub fn idle_events(&self) -> usize {
        self.lanes.events.idle()
    }

    /// Records `e` on the current lane: it completes once every call issued
    /// on this lane so far has.
    pub fn signal(&self, e: &LaneEvent) -> Result<()> {
        e.get()
            .record(&self.lanes.now().stream)
            .map_err(drv("cuEventRecord"))
    }

    /// The current lane runs nothing issued after this before `e` completes
    /// (its last record; `e` must have been signalled).
    pub fn wait(&self, e: &LaneEvent) -> Result<()> {
        self.lanes
            .now()
            .stream
            .wait(e.get())
            .map_err(drv("cuStreamWaitEvent"))
    }

    /// The current lane waits for everything issued so far on every other
    /// lane (no host wait). Nothing with one lane.
    pub fn join_lanes(&self) -> Result<()> {
        let me = self.current_lane();
        for (i, lane) in self.lanes.all.iter().enumerate() {
            if i == me {
                continue;
            }
            let e = self.new_event()?;
            e.get().record(&lane.stream).map_err(drv("cuEventRecord"))?;
            self.wait(&e)?;
        }
        Ok(())
    }

    /// The host waits for every lane but the current one (nothing with one
    /// lane: then stream order alone orders a copy after the work).
    pub(crate) fn sync_other_lanes(&self) -> Result<()> {
        let me = self.current_lane();
        for (i, lane) in self.lanes.all.iter().enumerate() {
            if i != me {
                lane.stream
                    .synchronize()
                    .map_err(drv("cuStreamSynchronize"))?;
            }
        }
        Ok(())
    }

    /// The host waits for every lane; reports any fault it raised.
    pub fn synchronize(&self) -> Result<()> {
        for lane in &self.lanes.all {
            lane.stream
                .synchronize()
                .map_err(drv("cuStreamSynchronize"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_lane_stays_among_the_lanes() {
        let c = Current::new(2);
        assert_eq!(c.get(), 0, "lane 0 is current at first");
        c.set(1).unwrap();
        assert_eq!(c.get(), 1);
        assert!(c.set(2).is_err(), "no lane 2 of 2");
        assert_eq!(c.get(), 1, "a refused switch changes nothing");
        c.set(0).unwrap();
        assert_eq!((c.get(), c.count()), (0, 2));
    }

    #[test]
    fn recycled_items_come_back_on_drop_and_are_reused() {
        let pool = Recycle::<u32>::default();
        let mut made = 0;
        let mut make = || {
            made += 1;
            Ok(made)
        };
        let a = pool.take(&mut make).unwrap();
        let b = pool.take(&mut make).unwrap();
        assert_eq!((*a.get(), *b.get(), pool.idle()), (1, 2, 0));
        drop(a);
        assert_eq!(pool.idle(), 1);
        let c = pool.take(&mut make).unwrap();
        assert_eq!(*c.get(), 1, "the given-back item is reused");
        drop((b, c));
        assert_eq!((pool.idle(), made), (2, 2), "two made in all");
    }

    #[test]
    fn a_failed_make_hands_out_nothing() {
        let pool = Recycle::<u32>::default();
        assert!(pool.take(|| Err(Error::Shape("no".into()))).is_err());
        assert_eq!(pool.idle(), 0);
    }
}
