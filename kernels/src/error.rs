//! Errors of the kernel layer.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable CUDA driver, NVRTC or cuBLAS library, or no device.
    #[error("CUDA is not available: {0}")]
    CudaUnavailable(String),
    /// A CUDA driver call failed (`op` names it).
    #[error("CUDA driver: {op}: {msg}")]
    Driver { op: &'static str, msg: String },
    /// A kernel launch, or the device work it started, failed.
    #[error("kernel {kernel}: {msg}")]
    Launch { kernel: String, msg: String },
    /// A cooperative launch the driver refused: its CTAs cannot all be
    /// resident at once (fewer SMs than the device reports, e.g. under
    /// MPS), or the device cannot launch cooperatively at all.
    #[error("kernel {kernel}: cooperative launch refused: {msg}")]
    CooperativeRefused { kernel: String, msg: String },
    #[error("NVRTC failed to compile {module} for {arch}: {log}")]
    Compile {
        module: String,
        arch: String,
        log: String,
    },
    /// NVRTC itself failed (not the source).
    #[error("NVRTC: {op}: {msg}")]
    Nvrtc { op: &'static str, msg: String },
    #[error("cuBLAS: {op}: {msg}")]
    Cublas { op: &'static str, msg: String },
    #[error("shape: {0}")]
    Shape(String),
    /// A shape or option the CUDA kernels do not implement.
    #[error("not supported by the CUDA kernels: {0}")]
    Unsupported(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
