//! A fault on purpose (feature `fault-injection`, for the fail-fast tests
//! of the `tacflowd-faults` binary; a release daemon has none of it): a
//! kernel that stores to an address no allocation holds, so that the
//! context takes a genuine illegal-address fault rather than a simulated
//! one. The launch returns before the store runs; the fault then fails the
//! next synchronisation, and every call on the context after it (it is
//! sticky), as a real out-of-bounds kernel would.

use super::device::{Gpu, drv};
use super::sources::FAULT_MODULES;
use crate::error::{Error, Result};
use cudarc::driver::{DeviceRepr, LaunchConfig, sys};

/// The fault module's one kernel (`fault.cu`).
const KERNEL: &str = "write_unmapped_u32";

/// Where the kernel stores: inside the lowest page, which neither the CUDA
/// allocator (it never hands out the null page) nor the host (Linux keeps
/// the lowest pages of every process unmapped, `vm.mmap_min_addr`) ever
/// maps, so that the store faults even on a system where the GPU can reach
/// host memory through the process's page tables.
pub const UNMAPPED_ADDRESS: u64 = 0x100;

#[repr(C)]
struct UnmappedParams {
    addr: u64,
    value: u32,
}

// SAFETY: a plain `#[repr(C)]` struct whose layout matches
// `UnmappedParams` in fault.cu field for field.
unsafe impl DeviceRepr for UnmappedParams {}

impl Gpu {
    /// Compiles (through the PTX cache) and loads the fault module, once.
    pub fn load_fault(&mut self) -> Result<()> {
        if self.has_kernel(KERNEL) {
            return Ok(());
        }
        self.load_modules(&FAULT_MODULES, &[])
    }

    /// Launches the faulting store on the current lane (after
    /// [`Gpu::load_fault`]) and returns the address it writes. `Ok` means
    /// only that the launch was accepted: the fault shows at the next
    /// synchronisation. An address that some allocation does hold is
    /// refused rather than written.
    pub fn write_unmapped(&self) -> Result<u64> {
        if !self.has_kernel(KERNEL) {
            return Err(Error::Launch {
                kernel: KERNEL.into(),
                msg: "the fault module is not loaded (Gpu::load_fault)".into(),
            });
        }
        let addr = UNMAPPED_ADDRESS;
        self.require_unallocated(addr)?;
        let params = UnmappedParams {
            addr,
            value: 0xdead_beef,
        };
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one thread stores 4 bytes at `addr`, which no allocation
        // of this context holds (checked just above) and no host mapping
        // can (the null page), so no buffer is written: the store faults
        // the context, which is what this launch is for.
        unsafe { self.launch(KERNEL, one, &params) }?;
        Ok(addr)
    }

    /// Fails when `addr` lies inside an allocation of this context.
    fn require_unallocated(&self, addr: u64) -> Result<()> {
        self.stream()
            .context()
            .bind_to_thread()
            .map_err(drv("cuCtxSetCurrent"))?;
        let (mut base, mut size) = (0u64, 0usize);
        // SAFETY: two valid out-pointers, the context current on this
        // thread; the call only reads the allocator's bookkeeping.
        let r = unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, addr) };
        if r == sys::cudaError_enum::CUDA_SUCCESS {
            return Err(Error::Launch {
                kernel: KERNEL.into(),
                msg: format!(
                    "address {addr:#x} lies in an allocation ({size} bytes at {base:#x}): not written"
                ),
            });
        }
        Ok(())
    }
}
