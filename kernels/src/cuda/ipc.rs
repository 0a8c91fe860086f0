//! CUDA IPC in the daemon's own context: a client's allocation exported
//! with `cuIpcGetMemHandle`, opened here with `cuIpcOpenMemHandle`, and the
//! interprocess events (`cuIpcGetEventHandle` / `cuIpcOpenEventHandle`) that
//! order the two processes' streams. Raw driver calls, each after binding
//! the context to the calling thread (the daemon opens regions on its I/O
//! thread); the daemon's checks and lifecycle are in
//! `tacflow_sidecar::server::cuda_regions`, behind a trait.

use cudarc::driver::CudaContext;
use cudarc::driver::sys::{self, CUresult};
use std::sync::Arc;

/// An IPC handle's size in bytes (memory and event handles alike).
pub const HANDLE_BYTES: usize = 64;

fn check(what: &str, r: CUresult) -> Result<(), String> {
    if r == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what} failed: {r:?}"))
    }
}

/// The driver's IPC calls on one context.
#[derive(Debug, Clone)]
pub struct DriverIpc {
    ctx: Arc<CudaContext>,
}

impl DriverIpc {
    pub fn new(ctx: Arc<CudaContext>) -> DriverIpc {
        DriverIpc { ctx }
    }

    fn bind(&self) -> Result<(), String> {
        self.ctx
            .bind_to_thread()
            .map_err(|e| format!("binding the CUDA context: {e:?}"))
    }

    /// The device's UUID as `nvidia-smi -L` prints it: `GPU-xxxxxxxx-...`.
    pub fn device_uuid(&self) -> Result<String, String> {
        self.bind()?;
        let mut u = sys::CUuuid_st { bytes: [0; 16] };
        // SAFETY: `u` is a valid CUuuid to write; the device is the
        // context's own.
        check("cuDeviceGetUuid", unsafe {
            sys::cuDeviceGetUuid_v2(&mut u, self.ctx.cu_device())
        })?;
        let b: Vec<u8> = u.bytes.iter().map(|&c| c as u8).collect();
        let hex =
            |r: std::ops::Range<usize>| b[r].iter().map(|x| format!("{x:02x}")).collect::<String>();
        Ok(format!(
            "GPU-{}-{}-{}-{}-{}",
            hex(0..4),
            hex(4..6),
            hex(6..8),
            hex(8..10),
            hex(10..16)
        ))
    }

    /// Opens a memory handle; returns the mapping's device pointer and the
    /// size of the allocation it lies in.
    pub fn open_mem(&self, handle: &[u8; HANDLE_BYTES]) -> Result<(u64, u64), String> {
        self.bind()?;
        let mut h = sys::CUipcMemHandle_st {
            reserved: [0; HANDLE_BYTES],
        };
        for (d, &s) in h.reserved.iter_mut().zip(handle) {
            *d = s as _;
        }
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` is written by the driver; the handle is passed by
        // value; peer access is enabled lazily as the driver decides.
        check("cuIpcOpenMemHandle", unsafe {
            sys::cuIpcOpenMemHandle_v2(
                &mut ptr,
                h,
                sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        })?;
        let (mut base, mut size): (sys::CUdeviceptr, usize) = (0, 0);
        // SAFETY: `ptr` is a live mapping opened just above.
        let r = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) };
        if let Err(e) = check("cuMemGetAddressRange", r) {
            self.close_mem(ptr);
            return Err(e);
        }
        Ok((ptr, (base + size as u64).saturating_sub(ptr)))
    }

    /// Closes a mapping [`DriverIpc::open_mem`] opened.
    pub fn close_mem(&self, ptr: u64) {
        if self.bind().is_ok() {
            // SAFETY: `ptr` came from cuIpcOpenMemHandle and is closed once.
            let _ = unsafe { sys::cuIpcCloseMemHandle(ptr) };
        }
    }

    /// Opens the client's interprocess event.
    pub fn open_event(&self, handle: &[u8; HANDLE_BYTES]) -> Result<u64, String> {
        self.bind()?;
        let mut h = sys::CUipcEventHandle_st {
            reserved: [0; HANDLE_BYTES],
        };
        for (d, &s) in h.reserved.iter_mut().zip(handle) {
            *d = s as _;
        }
        let mut ev: sys::CUevent = std::ptr::null_mut();
        // SAFETY: `ev` is written by the driver.
        check("cuIpcOpenEventHandle", unsafe {
            sys::cuIpcOpenEventHandle(&mut ev, h)
        })?;
        Ok(ev as u64)
    }

    /// A new interprocess event of the daemon's, and its handle.
    pub fn export_event(&self) -> Result<(u64, [u8; HANDLE_BYTES]), String> {
        self.bind()?;
        let mut ev: sys::CUevent = std::ptr::null_mut();
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32
            | sys::CUevent_flags::CU_EVENT_INTERPROCESS as u32;
        // SAFETY: `ev` is written by the driver.
        check("cuEventCreate", unsafe {
            sys::cuEventCreate(&mut ev, flags)
        })?;
        let mut h = sys::CUipcEventHandle_st {
            reserved: [0; HANDLE_BYTES],
        };
        // SAFETY: `ev` was created just above as an interprocess event.
        if let Err(e) = check("cuIpcGetEventHandle", unsafe {
            sys::cuIpcGetEventHandle(&mut h, ev)
        }) {
            self.destroy_event(ev as u64);
            return Err(e);
        }
        let mut out = [0u8; HANDLE_BYTES];
        for (d, &s) in out.iter_mut().zip(&h.reserved) {
            *d = s as u8;
        }
        Ok((ev as u64, out))
    }

    /// Destroys an event (opened or created here).
    pub fn destroy_event(&self, ev: u64) {
        if self.bind().is_ok() {
            // SAFETY: `ev` is an event this process holds, destroyed once.
            let _ = unsafe { sys::cuEventDestroy_v2(ev as sys::CUevent) };
        }
    }
}
