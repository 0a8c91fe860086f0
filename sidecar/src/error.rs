//! The daemon's error type. Anything that reaches a client becomes an
//! [`ErrorReply`]: protocol errors keep their code, the rest are `internal`.

use std::path::{Path, PathBuf};
use tacflow_ipc::{ErrorCode, ErrorReply};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("bad model: {0}")]
    BadModel(String),
    #[error("unsupported model: {0}")]
    UnsupportedModel(String),
    #[error("configuration: {0}")]
    Config(String),
    #[error("backend: {0}")]
    Backend(String),
    /// The model or the KV cache does not fit the memory there is; the
    /// message gives the figures.
    #[error("not enough memory: {0}")]
    Memory(String),
    /// A fault that ended the daemon (a panic, a failed device); see
    /// `server::fatal`.
    #[error("fatal: {0}")]
    Fatal(String),
    #[error(transparent)]
    Kernel(#[from] tacflow_kernels::Error),
    #[error(transparent)]
    Protocol(#[from] ErrorReply),
    #[error(transparent)]
    Ipc(#[from] tacflow_ipc::Error),
    /// A schedule that cannot run as it stands (refused before it runs).
    #[error("schedule: {0}")]
    Schedule(#[from] crate::schedule::deps::ScheduleError),
    #[error("zmq: {0}")]
    Zmq(#[from] zmq::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            path: path.to_owned(),
            source,
        }
    }

    /// What the client reads when this error ends its request.
    pub fn to_reply(&self) -> ErrorReply {
        match self {
            Error::Protocol(r) => r.clone(),
            Error::Ipc(tacflow_ipc::Error::Protocol(r)) => r.clone(),
            other => ErrorReply::new(ErrorCode::Internal, other.to_string()),
        }
    }
}
