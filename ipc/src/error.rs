//! Wire error codes and the crate's error type.
//!
//! Every failure the daemon reports travels as an [`ErrorReply`] whose `code`
//! is one of [`ErrorCode`]. The Python client maps each code onto its own
//! exception class, so the set is part of the protocol (see `PROTOCOL.md`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The error codes of protocol v1. A peer that receives a code it does not
/// know treats it as a generic error (`PROTOCOL.md`, evolution rules), which
/// is why unknown strings decode to [`ErrorCode::Unknown`] instead of failing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ErrorCode {
    BadRequest,
    UnsupportedVersion,
    UnknownSession,
    UnknownSequence,
    SequenceExists,
    UnknownRegion,
    OutOfBounds,
    ShapeMismatch,
    DtypeMismatch,
    OutOfKvBlocks,
    ContextTooLong,
    LimitExceeded,
    PermissionDenied,
    Busy,
    ShuttingDown,
    Unsupported,
    Internal,
    /// (1.3) A step names a KV block id outside the session's reservation.
    UnknownBlock,
    /// A code this build does not know (sent by a newer peer).
    Unknown,
}

impl ErrorCode {
    /// Every code this build knows, in wire order (test vectors iterate it).
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::BadRequest,
        ErrorCode::UnsupportedVersion,
        ErrorCode::UnknownSession,
        ErrorCode::UnknownSequence,
        ErrorCode::SequenceExists,
        ErrorCode::UnknownRegion,
        ErrorCode::OutOfBounds,
        ErrorCode::ShapeMismatch,
        ErrorCode::DtypeMismatch,
        ErrorCode::OutOfKvBlocks,
        ErrorCode::ContextTooLong,
        ErrorCode::LimitExceeded,
        ErrorCode::PermissionDenied,
        ErrorCode::Busy,
        ErrorCode::ShuttingDown,
        ErrorCode::Unsupported,
        ErrorCode::Internal,
        ErrorCode::UnknownBlock,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::UnknownSession => "unknown_session",
            ErrorCode::UnknownSequence => "unknown_sequence",
            ErrorCode::SequenceExists => "sequence_exists",
            ErrorCode::UnknownRegion => "unknown_region",
            ErrorCode::OutOfBounds => "out_of_bounds",
            ErrorCode::ShapeMismatch => "shape_mismatch",
            ErrorCode::DtypeMismatch => "dtype_mismatch",
            ErrorCode::OutOfKvBlocks => "out_of_kv_blocks",
            ErrorCode::ContextTooLong => "context_too_long",
            ErrorCode::LimitExceeded => "limit_exceeded",
            ErrorCode::PermissionDenied => "permission_denied",
            ErrorCode::Busy => "busy",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Internal => "internal",
            ErrorCode::UnknownBlock => "unknown_block",
            ErrorCode::Unknown => "unknown",
        }
    }

    pub fn parse(s: &str) -> ErrorCode {
        ErrorCode::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == s)
            .unwrap_or(ErrorCode::Unknown)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(ErrorCode::parse(&s))
    }
}

/// A detail value in an error reply: small scalars only, so that every peer
/// can print it without knowing the code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum DetailValue {
    Int(i64),
    /// Integers above `i64::MAX` (sequence ids are any `u64`).
    UInt(u64),
    Float(f64),
    Text(String),
}

impl From<u64> for DetailValue {
    fn from(v: u64) -> Self {
        i64::try_from(v).map_or(DetailValue::UInt(v), DetailValue::Int)
    }
}
impl From<usize> for DetailValue {
    fn from(v: usize) -> Self {
        DetailValue::from(v as u64)
    }
}
impl From<i64> for DetailValue {
    fn from(v: i64) -> Self {
        DetailValue::Int(v)
    }
}
impl From<u32> for DetailValue {
    fn from(v: u32) -> Self {
        DetailValue::Int(i64::from(v))
    }
}
impl From<f64> for DetailValue {
    fn from(v: f64) -> Self {
        DetailValue::Float(v)
    }
}
impl From<&str> for DetailValue {
    fn from(v: &str) -> Self {
        DetailValue::Text(v.to_owned())
    }
}
impl From<String> for DetailValue {
    fn from(v: String) -> Self {
        DetailValue::Text(v)
    }
}

/// A protocol-level failure: what the daemon sends back instead of a result.
///
/// It is also the error type of request validation inside the daemon, so a
/// check deep in the executor can say exactly what the client will read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ErrorReply {
    /// Echo of the request's id; absent when the request could not be read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<u64>,
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub detail: BTreeMap<String, DetailValue>,
}

impl ErrorReply {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorReply {
            request_id: None,
            code,
            message: message.into(),
            detail: BTreeMap::new(),
        }
    }

    /// Adds one detail field (builder style).
    pub fn with(mut self, key: &str, value: impl Into<DetailValue>) -> Self {
        self.detail.insert(key.to_owned(), value.into());
        self
    }

    pub fn for_request(mut self, request_id: u64) -> Self {
        self.request_id = Some(request_id);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ErrorReply::new(ErrorCode::BadRequest, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        ErrorReply::new(ErrorCode::Internal, message)
    }

    /// An `internal` error that says the daemon is going down (1.2):
    /// `detail.fatal = 1` and `detail.reason` names the fault
    /// (`executor_panic`, `device_failed`, `thread_panic`). A client should
    /// reconnect; a supervisor restarts the daemon with a new instance id.
    pub fn fatal(reason: &str, message: impl Into<String>) -> Self {
        ErrorReply::internal(message)
            .with(FATAL_KEY, 1u64)
            .with("reason", reason)
    }

    /// Whether this is a fatal `internal` error ([`ErrorReply::fatal`]).
    pub fn is_fatal(&self) -> bool {
        self.code == ErrorCode::Internal
            && matches!(self.detail.get(FATAL_KEY), Some(DetailValue::Int(n)) if *n != 0)
    }
}

/// The `detail` key that marks a fatal `internal` error (a detail value is a
/// number or a string, so the flag is `1`).
pub const FATAL_KEY: &str = "fatal";

/// Errors of this crate's own operations (mapping regions, framing).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("msgpack encode: {0}")]
    Encode(#[from] rmp_serde::encode::Error),
    #[error("msgpack decode: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("{0}")]
    Protocol(#[from] ErrorReply),
    #[error("{op} {name}: {source}")]
    Os {
        op: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
