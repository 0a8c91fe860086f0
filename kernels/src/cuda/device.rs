//! The GPU handle: context, lanes (streams with their cuBLAS handles and
//! workspaces: `lane.rs`), and the daemon's kernels compiled and loaded (the
//! lab loads its own on top: `lab.rs`). Every call goes to the current
//! lane's stream. cudarc's event tracking is switched off: within a lane
//! issue order orders buffers, and between lanes the events of
//! [`Gpu::signal`] and [`Gpu::wait`] do, placed by the schedule (`lane.rs`
//! says what orders what).

use super::attention::AttnWorkspace;
use super::gemm::GemmScratch;
use super::lane::Lanes;
use super::nvrtc;
use super::probe::{ALL, require};
use super::sources::{AttnKernelSpec, MODULES, Module, attention_kernels, kernel_names};
use crate::error::{Error, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
    LaunchConfig, PushKernelArg, sys,
};
use cudarc::nvrtc::Ptx;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, MutexGuard};
use tracing::{info, warn};

/// What the kernels need to know about the device.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub name: String,
    /// NVRTC target, `compute_90` on an H100.
    pub arch: String,
    pub sm_count: usize,
    pub total_memory: usize,
}

pub struct Gpu {
    ctx: Arc<CudaContext>,
    /// The streams, each with its cuBLAS handle and workspaces; the current
    /// one takes every call.
    pub(crate) lanes: Lanes,
    funcs: HashMap<String, CudaFunction>,
    /// CTAs per SM of the attention kernels (their split plans fill one
    /// wave of them).
    occupancy: HashMap<String, usize>,
    /// The driver refused a cooperative attention launch: fewer CTAs fit
    /// than the plan counted, so splits are merged by their last CTA from
    /// then on (a property of the device, whichever lane saw it).
    pub(crate) coop_refused: AtomicBool,
    /// Reallocations of a lane's attention split workspace or GEMM scratch
    /// so far: a graph captured before one points into freed memory
    /// ([`Gpu::workspace_generation`]).
    regrowths: AtomicU64,
    info: DeviceInfo,
    /// Synchronise after every launch so that a fault names its kernel
    /// (the self-check turns this on; it costs a round trip per launch).
    sync_launches: bool,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).finish()
    }
}

pub(crate) fn drv(op: &'static str) -> impl Fn(cudarc::driver::DriverError) -> Error {
    move |e| Error::Driver {
        op,
        msg: e.to_string(),
    }
}

/// `have >= need` elements, or a shape error naming `what`.
pub(crate) fn check_len(what: &str, have: usize, need: usize) -> Result<()> {
    if have < need {
        return Err(Error::Shape(format!(
            "{what}: buffer of {have} elements, {need} needed"
        )));
    }
    Ok(())
}

impl Gpu {
    /// The context, for what runs beside the kernels in it (CUDA IPC).
    pub fn context(&self) -> Arc<CudaContext> {
        self.ctx.clone()
    }

    /// The device's own context, borrowed (the lanes' events live in it).
    pub(crate) fn device_context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Opens device `ordinal` with one lane, compiles (or reads from the
    /// PTX cache) every module for its architecture and resolves every
    /// kernel.
    pub fn new(ordinal: usize) -> Result<Gpu> {
        Gpu::with_lanes(ordinal, 1)
    }

    /// [`Gpu::new`] with `lanes` streams (`gpu_lanes`), lane 0 current.
    pub fn with_lanes(ordinal: usize, lanes: usize) -> Result<Gpu> {
        require(&ALL)?;
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| Error::CudaUnavailable(format!("cannot open device {ordinal}: {e}")))?;
        // SAFETY: called before any allocation. Buffers are ordered by the
        // lanes' issue order and the events the schedule places (`lane.rs`),
        // not by cudarc's per-buffer events.
        unsafe { ctx.disable_event_tracking() };
        let (major, minor) = ctx
            .compute_capability()
            .map_err(drv("compute capability"))?;
        let sm_count = ctx
            .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(drv("multiprocessor count"))? as usize;
        let info = DeviceInfo {
            name: ctx.name().map_err(drv("cuDeviceGetName"))?,
            arch: format!("compute_{major}{minor}"),
            sm_count,
            total_memory: ctx.total_mem().map_err(drv("cuDeviceTotalMem"))?,
        };
        let lanes = Lanes::new(&ctx, lanes)?;
        keep_pool_memory(&ctx);
        let mut gpu = Gpu {
            ctx,
            lanes,
            funcs: HashMap::new(),
            occupancy: HashMap::new(),
            coop_refused: AtomicBool::new(false),
            regrowths: AtomicU64::new(0),
            info,
            sync_launches: false,
        };
        gpu.load_modules(&MODULES, &attention_kernels())?;
        let i = &gpu.info;
        let lanes = gpu.lanes();
        info!(device = %i.name, arch = %i.arch, sms = sm_count, kernels = gpu.funcs.len(), lanes, "GPU ready");
        Ok(gpu)
    }

    /// Compiles `modules` (in parallel, through the PTX cache), loads them,
    /// resolves the kernels the wrappers call, and readies the attention
    /// kernels among them (`attention`: their shared memory and occupancy),
    /// the prefill kernels and Tactic's rank kernel (their shared memory).
    pub(crate) fn load_modules(
        &mut self,
        modules: &[Module],
        attention: &[AttnKernelSpec],
    ) -> Result<()> {
        let funcs = load_kernels(&self.ctx, &self.info.arch, modules)?;
        self.occupancy
            .extend(attention_occupancy(&funcs, attention)?);
        self.occupancy
            .extend(super::prefill::prefill_occupancy(&funcs)?);
        super::tactic::rank_shared_memory(&funcs)?;
        self.funcs.extend(funcs);
        Ok(())
    }

    /// Whether kernel `name` is loaded.
    pub fn has_kernel(&self, name: &str) -> bool {
        self.funcs.contains_key(name)
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The current lane's stream.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.lanes.now().stream
    }

    /// The current lane's cuBLAS handle (bound to its stream).
    pub(crate) fn blas(&self) -> &cudarc::cublas::CudaBlas {
        &self.lanes.now().blas
    }

    /// CTAs of kernel `name` that co-reside on one SM (1 when unknown).
    pub fn occupancy(&self, name: &str) -> usize {
        self.occupancy.get(name).copied().unwrap_or(1).max(1)
    }

    /// The current lane's split-attention workspace.
    pub(crate) fn attention_workspace(&self) -> MutexGuard<'_, AttnWorkspace> {
        // A poisoned lock only means a panic elsewhere; the buffers are fine.
        let ws = &self.lanes.now().attn_ws;
        ws.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current lane's GEMM scratch.
    pub(crate) fn gemm_scratch(&self) -> MutexGuard<'_, GemmScratch> {
        let ws = &self.lanes.now().gemm_ws;
        ws.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes whenever a lane's attention split workspace or GEMM scratch,
    /// or a workspace a caller noted, is reallocated (grown): a captured graph holds their addresses, so
    /// one captured at another generation must not be replayed.
    pub fn workspace_generation(&self) -> u64 {
        self.regrowths.load(Ordering::Relaxed)
    }

    /// A workspace was reallocated (see [`Gpu::workspace_generation`]);
    /// public for workspaces that the caller keeps (the CUDA backend's
    /// attention scratch).
    pub fn note_workspace_regrowth(&self) {
        self.regrowths.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_sync_launches(&mut self, on: bool) {
        self.sync_launches = on;
    }

    /// Whether every launch synchronises (a stream under graph capture
    /// cannot).
    pub fn sync_launches(&self) -> bool {
        self.sync_launches
    }

    /// Whether the context can still run work: waits for everything issued
    /// on every lane, then for the whole context, and returns the driver's
    /// error. After a sticky fault (an illegal address, a launch failure, a
    /// misaligned address, an illegal instruction, a hardware stack error,
    /// an uncorrectable ECC error, a lost device) every call on the context
    /// fails, this one included; an error that left the context usable (an
    /// allocation that did not fit, a launch refused for its configuration)
    /// leaves it `Ok`.
    pub fn check_context(&self) -> Result<()> {
        self.synchronize()?;
        self.ctx.synchronize().map_err(drv("cuCtxSynchronize"))
    }

    /// Bytes of device memory free now.
    pub fn free_memory(&self) -> Result<usize> {
        Ok(self.ctx.mem_get_info().map_err(drv("cuMemGetInfo"))?.0)
    }

    /// Launches kernel `name` with one by-value parameter struct.
    ///
    /// # Safety
    /// `params` must hold valid device pointers for every element the kernel
    /// touches under `cfg` (each caller states the shapes it relies on).
    pub(crate) unsafe fn launch<P: DeviceRepr>(
        &self,
        name: &str,
        cfg: LaunchConfig,
        params: &P,
    ) -> Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.launch_as(name, cfg, params, false) }
    }

    /// [`Gpu::launch`], cooperatively when `cooperative`: every CTA of the
    /// grid resident at once (the driver refuses a grid that cannot be),
    /// so that CTAs may wait for each other.
    ///
    /// # Safety
    /// As [`Gpu::launch`].
    pub(crate) unsafe fn launch_as<P: DeviceRepr>(
        &self,
        name: &str,
        cfg: LaunchConfig,
        params: &P,
        cooperative: bool,
    ) -> Result<()> {
        // A lane in a green context launches the kernels loaded there.
        let table = self.lanes.now().funcs.as_ref().unwrap_or(&self.funcs);
        let f = table.get(name).ok_or_else(|| Error::Launch {
            kernel: name.into(),
            msg: "no such kernel was loaded".into(),
        })?;
        let fail = |e: cudarc::driver::DriverError| Error::Launch {
            kernel: name.into(),
            msg: e.to_string(),
        };
        let stream = self.stream();
        let mut b = stream.launch_builder(f);
        b.arg(params);
        // SAFETY: forwarded from the caller.
        if cooperative {
            unsafe { b.launch_cooperative(cfg) }.map_err(|e| {
                use sys::cudaError_enum::{
                    CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE, CUDA_ERROR_NOT_SUPPORTED,
                };
                if matches!(
                    e.0,
                    CUDA_ERROR_COOPERATIVE_LAUNCH_TOO_LARGE | CUDA_ERROR_NOT_SUPPORTED
                ) {
                    Error::CooperativeRefused {
                        kernel: name.into(),
                        msg: e.to_string(),
                    }
                } else {
                    fail(e)
                }
            })?;
        } else {
            unsafe { b.launch(cfg) }.map_err(fail)?;
        }
        if self.sync_launches {
            stream.synchronize().map_err(fail)?;
        }
        Ok(())
    }

    /// The raw address of a buffer or a view of one, for parameter structs.
    pub fn ptr<T>(&self, s: &impl DevicePtr<T>) -> u64 {
        s.device_ptr(self.stream()).0
    }

    /// The raw address of a buffer or a view of one that a launch writes.
    pub fn ptr_mut<T>(&self, s: &mut impl DevicePtrMut<T>) -> u64 {
        s.device_ptr_mut(self.stream()).0
    }

    /// An uninitialised buffer of `n` elements (at least one is allocated),
    /// stream-ordered on the current lane: usable there at once, on another
    /// lane only after an event from this one (or outside a schedule, on
    /// lane 0, before the schedule forks). It is freed on the same lane when
    /// dropped.
    pub fn alloc<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        // SAFETY: the memory is uninitialised; every user writes before it
        // reads (outputs) or poisons it first.
        unsafe { self.stream().alloc::<T>(n.max(1)) }.map_err(drv("cuMemAlloc"))
    }

    /// Fills a buffer with 0xFF bytes: NaN as f32 and as bf16.
    pub fn poison<T: DeviceRepr>(&self, s: &mut CudaSlice<T>) -> Result<()> {
        let bytes = s.num_bytes();
        let stream = self.stream();
        let (p, _sync) = s.device_ptr_mut(stream);
        // SAFETY: `p` addresses `bytes` bytes of `s`.
        unsafe { cudarc::driver::result::memset_d8_async(p, 0xff, bytes, stream.cu_stream()) }
            .map_err(drv("cuMemsetD8Async"))
    }

    /// A buffer of `n` zeros (at least one element).
    pub fn alloc_zeroed<T: DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        n: usize,
    ) -> Result<CudaSlice<T>> {
        self.stream()
            .alloc_zeros::<T>(n.max(1))
            .map_err(drv("cuMemAllocAsync"))
    }

    pub fn alloc_poisoned<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        let mut s = self.alloc(n)?;
        self.poison(&mut s)?;
        Ok(s)
    }

    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        let mut s = self.alloc(host.len())?;
        if !host.is_empty() {
            self.stream()
                .memcpy_htod(host, &mut s)
                .map_err(drv("cuMemcpyHtoD"))?;
        }
        Ok(s)
    }

    /// Copies `host` into the first `host.len()` elements of `s`.
    pub fn upload_into<T: DeviceRepr>(&self, host: &[T], s: &mut CudaSlice<T>) -> Result<()> {
        check_len("upload", s.len(), host.len())?;
        if !host.is_empty() {
            self.stream()
                .memcpy_htod(host, &mut s.slice_mut(..host.len()))
                .map_err(drv("cuMemcpyHtoD"))?;
        }
        Ok(())
    }

    /// The first `n` elements of `s`, after all issued work on every lane
    /// (any lane may have written them): the other lanes are waited for
    /// before the copy, which runs on the current lane, after its work.
    pub fn download<T: DeviceRepr + Default + Clone>(
        &self,
        s: &CudaSlice<T>,
        n: usize,
    ) -> Result<Vec<T>> {
        check_len("download", s.len(), n)?;
        let mut host = vec![T::default(); n];
        self.sync_other_lanes()?;
        if n > 0 {
            self.stream()
                .memcpy_dtoh(&s.slice(..n), &mut host[..])
                .map_err(drv("cuMemcpyDtoH"))?;
        }
        self.synchronize()?;
        Ok(host)
    }

    /// Elements `[start, start + n)` of `s` to the host (after every lane's
    /// work, as [`Gpu::download`]).
    pub fn download_range<T: DeviceRepr + Default + Clone>(
        &self,
        s: &CudaSlice<T>,
        start: usize,
        n: usize,
    ) -> Result<Vec<T>> {
        let end = start.saturating_add(n);
        check_len("download_range", s.len(), end)?;
        let mut host = vec![T::default(); n];
        self.sync_other_lanes()?;
        if n > 0 {
            self.stream()
                .memcpy_dtoh(&s.slice(start..end), &mut host[..])
                .map_err(drv("cuMemcpyDtoH"))?;
        }
        self.synchronize()?;
        Ok(host)
    }

    /// Elementwise launch shape: 256 threads, a grid-stride loop over `n`.
    pub(crate) fn grid_for(&self, n: usize) -> LaunchConfig {
        let blocks = n.div_ceil(256).clamp(1, self.info.sm_count.max(1) * 16);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    }
}

/// Stream-ordered allocations come from the device's default pool, which by
/// default hands its memory back to the driver at every synchronisation, so
/// that the next step's buffers are mapped afresh (tens of microseconds
/// each). Keeping freed memory in the pool makes a step's allocations cheap
/// reuses; the memory stays this process's either way.
fn keep_pool_memory(ctx: &Arc<CudaContext>) {
    let mut threshold = u64::MAX;
    // SAFETY: the device is the context's own; the attribute takes a u64.
    let r = unsafe {
        cudarc::driver::result::device::get_default_mem_pool(ctx.cu_device()).and_then(|pool| {
            cudarc::driver::result::mem_pool::set_attribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold) as *mut u64 as *mut std::ffi::c_void,
            )
        })
    };
    if let Err(e) = r {
        warn!(cause = %e, "cannot keep freed memory in the default pool");
    }
}

/// Raises each attention kernel's dynamic shared-memory limit to what its
/// variant uses, prefers shared memory over L1, and reads how many of its
/// CTAs fit on one SM.
pub(crate) fn attention_occupancy(
    funcs: &HashMap<String, CudaFunction>,
    kernels: &[AttnKernelSpec],
) -> Result<HashMap<String, usize>> {
    let mut out = HashMap::new();
    for (name, d, g, v) in kernels {
        let Some(f) = funcs.get(name) else { continue };
        let n = ready_shared_memory(f, name, v.threads(), v.smem_bytes(*d, *g))?;
        out.insert(name.clone(), n);
    }
    Ok(out)
}

/// Raises kernel `name`'s dynamic shared-memory limit to `bytes`, prefers
/// shared memory over L1, and returns how many of its CTAs of `threads` fit
/// on one SM.
pub(crate) fn ready_shared_memory(
    f: &CudaFunction,
    name: &str,
    threads: usize,
    bytes: usize,
) -> Result<usize> {
    let fail = |e: cudarc::driver::DriverError| Error::Launch {
        kernel: name.into(),
        msg: format!("shared memory of {bytes} bytes: {e}"),
    };
    f.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        bytes as i32,
    )
    .map_err(fail)?;
    // All of L1 as shared memory: the K and V streams bypass L1 (or never
    // come back to it), and several CTAs of 50-100 KiB need the largest
    // carveout.
    f.set_attribute(
        sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
        100,
    )
    .map_err(fail)?;
    let n = f
        .occupancy_max_active_blocks_per_multiprocessor(threads as u32, bytes, None)
        .map_err(fail)?;
    Ok(n as usize)
}

/// Compiles `modules` (in parallel, through the PTX cache), loads them and
/// resolves the kernels the wrappers use.
pub(crate) fn load_kernels(
    ctx: &Arc<CudaContext>,
    arch: &str,
    modules: &[Module],
) -> Result<HashMap<String, CudaFunction>> {
    let dir = nvrtc::cache_dir();
    let mut funcs = HashMap::new();
    for (module, ptx) in nvrtc::compile_all(modules, arch, dir.as_deref()) {
        let m = ctx
            .load_module(Ptx::from_src(ptx?))
            .map_err(|e| Error::Launch {
                kernel: format!("module {}", module.name),
                msg: format!("the driver rejected its PTX: {e}"),
            })?;
        for name in kernel_names(module.name) {
            let f = m.load_function(&name).map_err(|e| Error::Launch {
                kernel: name.clone(),
                msg: format!("not found in module {}: {e}", module.name),
            })?;
            funcs.insert(name, f);
        }
    }
    Ok(funcs)
}
