//! Errors of the kernel layer.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable CUDA driver or runtime library on this machine.
    #[error("CUDA is not available: {0}")]
    CudaUnavailable(String),
    #[error("CUDA driver: {0}")]
    Driver(String),
    #[error("NVRTC failed to compile {module}: {log}")]
    Compile { module: String, log: String },
    #[error("cuBLAS: {0}")]
    Cublas(String),
    #[error("shape: {0}")]
    Shape(String),
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
