//! Finding the CUDA libraries before cudarc touches them.
//!
//! cudarc loads libcuda, libnvrtc and libcublas on first use and panics when
//! one is missing. Every entry point of this crate calls [`require`] first,
//! which turns a missing library into [`Error::CudaUnavailable`] with the
//! names that were searched and what to do about it.

use crate::error::{Error, Result};

/// A library cudarc loads at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Library {
    /// The driver API (`libcuda.so`), installed with the NVIDIA driver.
    Driver,
    /// The run-time compiler (`libnvrtc.so.13`).
    Nvrtc,
    /// `libcublas.so.13`.
    Cublas,
}

impl Library {
    fn present(self) -> bool {
        // SAFETY: each probe only tries to dlopen candidate names; it calls
        // nothing in the library.
        unsafe {
            match self {
                Library::Driver => cudarc::driver::sys::is_culib_present(),
                Library::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
                Library::Cublas => cudarc::cublas::sys::is_culib_present(),
            }
        }
    }

    fn stem(self) -> &'static str {
        match self {
            Library::Driver => "cuda",
            Library::Nvrtc => "nvrtc",
            Library::Cublas => "cublas",
        }
    }

    fn hint(self) -> &'static str {
        match self {
            Library::Driver => "no NVIDIA driver is installed on this machine",
            Library::Nvrtc => {
                "install CUDA 13.0's NVRTC (e.g. `pip install nvidia-cuda-nvrtc==13.0.88`) and put \
                 its lib folder on LD_LIBRARY_PATH (`source scripts/ci/nvrtc-env VENV` does both)"
            }
            Library::Cublas => "install CUDA 13.0's cuBLAS and put it on LD_LIBRARY_PATH",
        }
    }
}

/// Fails with a clear reason unless every library in `libs` can be loaded.
pub fn require(libs: &[Library]) -> Result<()> {
    let missing: Vec<String> = libs
        .iter()
        .filter(|l| !l.present())
        .map(|l| {
            let names = cudarc::get_lib_name_candidates(l.stem());
            format!(
                "lib{} not found ({}; searched {})",
                l.stem(),
                l.hint(),
                names.join(", ")
            )
        })
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::CudaUnavailable(missing.join("; ")))
    }
}

/// Every library the backend needs.
pub const ALL: [Library; 3] = [Library::Driver, Library::Nvrtc, Library::Cublas];

/// The name of device 0, or why there is no usable GPU. Cheap enough to
/// call at start-up to choose a backend.
pub fn probe() -> Result<String> {
    require(&ALL)?;
    let n = cudarc::driver::CudaContext::device_count()
        .map_err(|e| Error::CudaUnavailable(format!("the CUDA driver does not initialise: {e}")))?;
    if n < 1 {
        return Err(Error::CudaUnavailable("no CUDA device is visible".into()));
    }
    let ctx = cudarc::driver::CudaContext::new(0)
        .map_err(|e| Error::CudaUnavailable(format!("cannot open device 0: {e}")))?;
    ctx.name().map_err(|e| Error::Driver {
        op: "cuDeviceGetName",
        msg: e.to_string(),
    })
}
