//! CUDA green contexts: a context that owns a subset of the device's SMs
//! (`cuDevSmResourceSplitByCount` carves the group, `cuGreenCtxCreate`
//! makes the context), so that whatever runs on a stream of it runs on
//! those SMs only, every kernel and cuBLAS alike. One of the three ways
//! a lane is held to a share of the GPU (`share.rs`).
//!
//! A green context is converted to an ordinary context handle
//! (`cuCtxFromGreenCtx`) so that cudarc's streams, launches and cuBLAS
//! handle work in it. Kernels are loaded again in it (a module's functions
//! belong to the context that loaded it); device memory is the device's,
//! shared with the primary context.
//!
//! Needs a driver of CUDA 12.4 or later; an older one is refused before
//! any green-context symbol is looked up.

use super::device::drv;
use crate::error::{Error, Result};
use cudarc::driver::{CudaContext, sys};
use std::sync::Arc;

/// The first driver with green contexts (CUDA 12.4).
const GREEN_DRIVER: i32 = 12040;

/// A green context of some SMs, and the cudarc context that wraps it.
pub(crate) struct GreenCtx {
    raw: sys::CUgreenCtx,
    pub(crate) ctx: Arc<CudaContext>,
    /// SMs the driver gave (the request rounded to its granularity).
    pub(crate) sms: usize,
}

// SAFETY: a green context handle is a driver object usable from any
// thread (the driver API is thread-safe); it is destroyed once, on drop.
unsafe impl Send for GreenCtx {}
// SAFETY: as above; nothing here is mutated through a shared reference.
unsafe impl Sync for GreenCtx {}

fn check(op: &'static str, r: sys::CUresult) -> Result<()> {
    match r {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        e => Err(Error::Driver {
            op,
            msg: format!("{e:?}"),
        }),
    }
}

/// Whether the driver has green contexts: its version, or why not.
pub fn green_driver() -> Result<i32> {
    let mut v = 0;
    // SAFETY: writes one int; the driver library is loaded (the probe ran).
    check("cuDriverGetVersion", unsafe {
        sys::cuDriverGetVersion(&mut v)
    })?;
    if v < GREEN_DRIVER {
        return Err(Error::Unsupported(format!(
            "green contexts need a CUDA 12.4 driver or later; this one is {}.{}",
            v / 1000,
            v % 1000 / 10
        )));
    }
    Ok(v)
}

/// The device's SMs as one resource.
pub(crate) fn device_sms(dev: &CudaContext) -> Result<sys::CUdevResource> {
    green_driver()?;
    // SAFETY: all-zero bytes are a valid (empty) resource: plain data.
    let mut all: sys::CUdevResource = unsafe { std::mem::zeroed() };
    // SAFETY: `all` is a resource struct the call fills; the device is
    // the context's own.
    check("cuDeviceGetDevResource", unsafe {
        sys::cuDeviceGetDevResource(
            dev.cu_device(),
            &mut all,
            sys::CUdevResourceType::CU_DEV_RESOURCE_TYPE_SM,
        )
    })?;
    Ok(all)
}

/// A group of at least `sms` SMs carved from `input` (the driver rounds up
/// to its partition size), and what is left of `input`: carving each
/// lane's group from the previous remainder keeps the lanes' SMs disjoint.
pub(crate) fn carve(
    input: &sys::CUdevResource,
    sms: usize,
) -> Result<(sys::CUdevResource, sys::CUdevResource)> {
    let count = u32::try_from(sms.max(1)).map_err(|_| Error::Shape(format!("{sms} SMs")))?;
    // SAFETY: all-zero resources are valid plain data for the call to fill.
    let (mut group, mut rest): (sys::CUdevResource, sys::CUdevResource) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    let mut groups = 1u32;
    // SAFETY: one result slot for one group (`groups` = 1 in), the input
    // is an SM resource the driver gave, `rest` takes the remainder.
    check("cuDevSmResourceSplitByCount", unsafe {
        sys::cuDevSmResourceSplitByCount(&mut group, &mut groups, input, &mut rest, 0, count)
    })?;
    if groups != 1 {
        return Err(Error::Unsupported(format!(
            "the driver could not carve a group of {sms} SMs from those left"
        )));
    }
    Ok((group, rest))
}

/// SMs of an SM resource.
pub(crate) fn sm_count(r: &sys::CUdevResource) -> usize {
    // SAFETY: `sm` is the variant of an SM resource, the only kind here.
    unsafe { r.__bindgen_anon_1.sm.smCount as usize }
}

impl GreenCtx {
    /// A green context of the SMs of `group` (from [`carve`]) on `dev`'s
    /// device; `dev` is current again after.
    pub(crate) fn new(dev: &Arc<CudaContext>, mut group: sys::CUdevResource) -> Result<GreenCtx> {
        let given = sm_count(&group);
        let mut desc: sys::CUdevResourceDesc = std::ptr::null_mut();
        // SAFETY: one resource in, a descriptor out.
        check("cuDevResourceGenerateDesc", unsafe {
            sys::cuDevResourceGenerateDesc(&mut desc, &mut group, 1)
        })?;
        let mut raw: sys::CUgreenCtx = std::ptr::null_mut();
        let flags = sys::CUgreenCtxCreate_flags::CU_GREEN_CTX_DEFAULT_STREAM as u32;
        // SAFETY: the descriptor was just generated for this device.
        check("cuGreenCtxCreate", unsafe {
            sys::cuGreenCtxCreate(&mut raw, desc, dev.cu_device(), flags)
        })?;
        let mut cu: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: `raw` is the green context just created.
        let converted = check("cuCtxFromGreenCtx", unsafe {
            sys::cuCtxFromGreenCtx(&mut cu, raw)
        });
        let wrapped = converted.and_then(|()| {
            // SAFETY: `cu` is a live context of `dev`'s device. cudarc
            // would destroy it with cuCtxDestroy on its last drop, which a
            // converted green context must not get: one reference is
            // leaked below so that drop never runs, and `Drop` for
            // `GreenCtx` destroys the green context itself.
            unsafe { CudaContext::from_raw_context(dev.ordinal(), dev.cu_device(), cu) }
                .map_err(drv("cuCtxFromGreenCtx"))
        });
        let ctx = match wrapped {
            Ok(c) => c,
            Err(e) => {
                // SAFETY: created above, used by nothing yet.
                unsafe { sys::cuGreenCtxDestroy(raw) };
                return Err(e);
            }
        };
        std::mem::forget(ctx.clone());
        dev.bind_to_thread().map_err(drv("cuCtxSetCurrent"))?;
        Ok(GreenCtx {
            raw,
            ctx,
            sms: given,
        })
    }
}

impl Drop for GreenCtx {
    fn drop(&mut self) {
        // The frees its lane's buffers enqueued on drop run first.
        if let Err(e) = self.ctx.synchronize() {
            tracing::warn!(cause = %e, "synchronising a green context before destroying it");
        }
        // SAFETY: the lane that holds this drops its stream, handle,
        // workspaces and kernels first (field order), so nothing runs in
        // the context any more; it is destroyed once.
        let r = unsafe { sys::cuGreenCtxDestroy(self.raw) };
        if r != sys::CUresult::CUDA_SUCCESS {
            tracing::warn!(cause = ?r, "cuGreenCtxDestroy failed");
        }
    }
}
