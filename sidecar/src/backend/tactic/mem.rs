//! The device memory the Tactic state manager is written against, and a
//! host fake of it for the CPU tests.
//!
//! The manager only allocates, copies and names addresses; the GPU kernels
//! do everything else. Keeping that surface this small is what lets the
//! manager's bookkeeping (sizing, sharing at a fork, freeing at close,
//! putting back what a failed step changed) be tested without a GPU.

use crate::error::{Error, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Allocations on a device, in stream order where the device has streams.
pub trait DeviceMemory {
    /// One allocation; freed (in stream order) when dropped.
    type Buf: std::fmt::Debug;
    /// `bytes` bytes, every one zero.
    fn alloc_zeroed(&self, bytes: usize) -> Result<Self::Buf>;
    /// `bytes` bytes whose contents are undefined until written.
    fn alloc(&self, bytes: usize) -> Result<Self::Buf>;
    /// Copies `bytes` bytes from `src` at `src_off` to `dst` at `dst_off`.
    fn copy(
        &self,
        src: &Self::Buf,
        src_off: u64,
        dst: &mut Self::Buf,
        dst_off: u64,
        bytes: u64,
    ) -> Result<()>;
    /// The allocation's device address (what kernels are given).
    fn addr(&self, buf: &Self::Buf) -> u64;
}

/// Host memory posing as a device: each allocation a `Vec<u8>`, with the
/// bytes alive counted and a failure that can be planted on a later
/// allocation (a step that runs out of memory half-way).
#[derive(Debug, Default, Clone)]
pub struct HostMemory {
    live: Arc<AtomicUsize>,
    /// Allocations left before one fails (`usize::MAX`: none fails).
    fail_after: Arc<AtomicUsize>,
    copies: Arc<AtomicUsize>,
}

/// An allocation of [`HostMemory`].
#[derive(Debug)]
pub struct HostBuf {
    pub data: Vec<u8>,
    live: Arc<AtomicUsize>,
}

impl Drop for HostBuf {
    fn drop(&mut self) {
        self.live.fetch_sub(self.data.len(), Ordering::Relaxed);
    }
}

impl HostMemory {
    pub fn new() -> HostMemory {
        let m = HostMemory::default();
        m.fail_after.store(usize::MAX, Ordering::Relaxed);
        m
    }

    /// Bytes allocated and not yet dropped.
    pub fn live_bytes(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Copies made so far.
    pub fn copies(&self) -> usize {
        self.copies.load(Ordering::Relaxed)
    }

    /// The allocation after the next `n` succeed fails (`n = 0`: the next).
    pub fn fail_after(&self, n: usize) {
        self.fail_after.store(n, Ordering::Relaxed);
    }

    fn take(&self, bytes: usize) -> Result<HostBuf> {
        let left = self.fail_after.load(Ordering::Relaxed);
        if left == 0 {
            self.fail_after.store(usize::MAX, Ordering::Relaxed);
            return Err(Error::Memory(format!("planted failure of {bytes} bytes")));
        }
        if left != usize::MAX {
            self.fail_after.store(left - 1, Ordering::Relaxed);
        }
        self.live.fetch_add(bytes, Ordering::Relaxed);
        Ok(HostBuf {
            // Garbage would be more honest than zeros for `alloc`, but a
            // fixed pattern is enough to see a read of unwritten bytes.
            data: vec![0xa5; bytes],
            live: self.live.clone(),
        })
    }
}

impl DeviceMemory for HostMemory {
    type Buf = HostBuf;

    fn alloc_zeroed(&self, bytes: usize) -> Result<HostBuf> {
        let mut b = self.take(bytes)?;
        b.data.fill(0);
        Ok(b)
    }

    fn alloc(&self, bytes: usize) -> Result<HostBuf> {
        self.take(bytes)
    }

    fn copy(
        &self,
        src: &HostBuf,
        src_off: u64,
        dst: &mut HostBuf,
        dst_off: u64,
        bytes: u64,
    ) -> Result<()> {
        let (s, d, n) = (src_off as usize, dst_off as usize, bytes as usize);
        if s + n > src.data.len() || d + n > dst.data.len() {
            return Err(Error::Backend(format!(
                "copy of {n} bytes from {s} of {} to {d} of {}",
                src.data.len(),
                dst.data.len()
            )));
        }
        dst.data[d..d + n].copy_from_slice(&src.data[s..s + n]);
        self.copies.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn addr(&self, buf: &HostBuf) -> u64 {
        buf.data.as_ptr() as u64
    }
}
