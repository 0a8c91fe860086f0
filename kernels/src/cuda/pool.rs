//! Reused device buffers: a step of the same shape as the last one takes
//! the buffers the last one gave back instead of allocating (PyTorch's
//! caching allocator in miniature).
//!
//! A buffer may be given back while the GPU still uses it; it is safe to
//! hand out again because the pool is used on the home lane (lane 0) only,
//! outside multi-lane schedules (`lane.rs`): with one lane, the stream
//! orders the next user after every earlier use; with several, each
//! schedule joins every lane back into lane 0 before its buffers are given
//! back, and forks the other lanes from lane 0 after its buffers are taken,
//! so the next user (on any lane) is ordered after every use by an event
//! chain. A fresh buffer is allocated, and a surplus one freed, on lane 0's
//! stream for the same reason. A backend with several lanes therefore takes
//! every buffer of a step before the schedule forks (`CudaBackend::act`).

use super::device::Gpu;
use crate::error::Result;
use cudarc::driver::CudaSlice;
use std::sync::{Arc, Mutex};

/// Buffers kept for reuse at most, by count and by bytes.
const MAX_BUFFERS: usize = 64;
const MAX_BYTES: usize = 8 << 30;

#[derive(Debug, Default)]
struct Free {
    bufs: Vec<CudaSlice<f32>>,
    bytes: usize,
}

/// f32 buffers given back by [`Pooled`] on drop.
#[derive(Debug, Clone, Default)]
pub struct BufferPool {
    free: Arc<Mutex<Free>>,
}

/// A buffer of at least the length asked for; back to its pool on drop.
#[derive(Debug)]
pub struct Pooled {
    buf: Option<CudaSlice<f32>>,
    home: Arc<Mutex<Free>>,
}

impl BufferPool {
    /// A buffer of at least `n` elements: the smallest free one of `n` to
    /// `2n` elements, else a fresh one of `n`.
    pub fn take(&self, gpu: &Gpu, n: usize) -> Result<Pooled> {
        let n = n.max(1);
        let reused = {
            let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
            let best = f
                .bufs
                .iter()
                .enumerate()
                .filter(|(_, b)| b.len() >= n && b.len() <= 2 * n)
                .min_by_key(|(_, b)| b.len())
                .map(|(i, _)| i);
            best.map(|i| {
                let b = f.bufs.swap_remove(i);
                f.bytes -= b.num_bytes();
                b
            })
        };
        let buf = match reused {
            Some(b) => b,
            None => gpu.alloc(n)?,
        };
        Ok(Pooled {
            buf: Some(buf),
            home: self.free.clone(),
        })
    }

    /// Frees every buffer waiting for reuse (each on the stream that
    /// allocated it): before that stream's lane is rebuilt in another
    /// context (`share.rs`), whose end would strand them.
    pub fn clear(&self) {
        let mut f = self.free.lock().unwrap_or_else(|e| e.into_inner());
        f.bufs.clear();
        f.bytes = 0;
    }

    /// Buffers waiting for reuse.
    pub fn cached(&self) -> usize {
        self.free.lock().map(|f| f.bufs.len()).unwrap_or(0)
    }
}

impl std::ops::Deref for Pooled {
    type Target = CudaSlice<f32>;
    fn deref(&self) -> &CudaSlice<f32> {
        self.buf.as_ref().expect("present until drop")
    }
}

impl std::ops::DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut CudaSlice<f32> {
        self.buf.as_mut().expect("present until drop")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let Some(b) = self.buf.take() else { return };
        let mut f = self.home.lock().unwrap_or_else(|e| e.into_inner());
        if f.bufs.len() < MAX_BUFFERS && f.bytes + b.num_bytes() <= MAX_BYTES {
            f.bytes += b.num_bytes();
            f.bufs.push(b);
        }
        // Otherwise `b` is freed here, in the order of the stream it was
        // allocated on (lane 0's, see the module doc).
    }
}
