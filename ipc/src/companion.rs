//! The companion socket (`PROTOCOL.md` §3.4): how a client hands the daemon
//! a sealed memfd.
//!
//! A `SOCK_SEQPACKET` Unix socket beside the main one. Each packet is one
//! msgpack map, with one descriptor in `SCM_RIGHTS` for a transfer:
//! `{request_id, session, byte_size}` → `{request_id, fd_token}` or an error
//! body of §5. The client then registers the region with
//! `{kind: "memfd", fd_token, byte_size}` on the main socket.
//!
//! The daemon maps the memory for as long as the region lives, so the memfd
//! must be sealed against shrinking (`F_SEAL_SHRINK`, and `F_SEAL_SEAL` so
//! that the seal set cannot change): then no client action can make the
//! daemon's mapping fault (see [`crate::sigbus`] for by-name regions, which
//! cannot be sealed).

use crate::codec::from_msgpack;
use crate::error::{ErrorCode, ErrorReply};
use crate::messages::SessionToken;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use serde::{Deserialize, Serialize};
use std::os::fd::AsFd;

/// Largest packet the daemon reads; a transfer request is under 100 bytes.
pub const MAX_PACKET_BYTES: usize = 4096;

/// `{request_id, session, byte_size}`, sent with one memfd.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FdTransferRequest {
    pub request_id: u64,
    pub session: SessionToken,
    /// Bytes the client means to register; the memfd holds at least these.
    pub byte_size: u64,
}

/// `{request_id, fd_token}`: the name under which the descriptor waits for
/// its `register_region` (in the same session).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FdTransferReply {
    pub request_id: u64,
    pub fd_token: u64,
}

#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    request_id: Option<u64>,
}

/// Decodes a transfer request; never panics. The error keeps the request id
/// when the packet was at least a map with one.
pub fn decode_fd_request(packet: &[u8]) -> Result<FdTransferRequest, ErrorReply> {
    if packet.len() > MAX_PACKET_BYTES {
        return Err(ErrorReply::bad_request("companion packet too large")
            .with("bytes", packet.len())
            .with("max_bytes", MAX_PACKET_BYTES));
    }
    from_msgpack::<FdTransferRequest>(packet).map_err(|e| {
        let mut err = ErrorReply::bad_request(format!("fd transfer: malformed packet: {e}"));
        err.request_id = from_msgpack::<Probe>(packet)
            .ok()
            .and_then(|p| p.request_id);
        err
    })
}

/// The seals a memfd region must carry.
pub fn required_seals() -> SealFlag {
    SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_SEAL
}

/// Checks that `fd` is a memfd sealed against shrinking and holds at least
/// `byte_size` bytes.
pub fn check_memfd(fd: impl AsFd, byte_size: u64) -> Result<(), ErrorReply> {
    if byte_size == 0 {
        return Err(ErrorReply::bad_request(
            "a region must have a byte_size above 0",
        ));
    }
    let seals = fcntl(fd.as_fd(), FcntlArg::F_GET_SEALS).map_err(|e| {
        ErrorReply::bad_request(format!(
            "the descriptor is not a sealable memfd ({e}): create it with MFD_ALLOW_SEALING"
        ))
    })?;
    let seals = SealFlag::from_bits_truncate(seals);
    if !seals.contains(required_seals()) {
        return Err(ErrorReply::bad_request(
            "the memfd must be sealed with F_SEAL_SHRINK and F_SEAL_SEAL \
             (so that it cannot shrink under the daemon's mapping)",
        )
        .with("seals", u64::from(seals.bits() as u32)));
    }
    let st = nix::sys::stat::fstat(fd.as_fd())
        .map_err(|e| ErrorReply::bad_request(format!("fstat of the memfd failed: {e}")))?;
    let actual = u64::try_from(st.st_size).unwrap_or(0);
    if actual < byte_size {
        return Err(ErrorReply::new(
            ErrorCode::OutOfBounds,
            format!("the memfd holds {actual} bytes, fewer than the {byte_size} declared"),
        )
        .with("actual", actual)
        .with("declared", byte_size));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::to_msgpack;
    use nix::sys::memfd::{MFdFlags, memfd_create};
    use nix::unistd::ftruncate;

    #[test]
    fn requests_round_trip_and_garbage_keeps_the_id() {
        let r = FdTransferRequest {
            request_id: 7,
            session: SessionToken([3; 16]),
            byte_size: 4096,
        };
        assert_eq!(decode_fd_request(&to_msgpack(&r)).unwrap(), r);
        let e = decode_fd_request(&to_msgpack(&FdTransferReply {
            request_id: 9,
            fd_token: 1,
        }))
        .unwrap_err();
        assert_eq!((e.code, e.request_id), (ErrorCode::BadRequest, Some(9)));
        assert!(decode_fd_request(&[0xc1]).is_err());
        assert!(decode_fd_request(&vec![0x90; MAX_PACKET_BYTES + 1]).is_err());
    }

    #[test]
    fn only_sealed_memfds_of_the_right_size_pass() {
        let fd = memfd_create("t", MFdFlags::MFD_ALLOW_SEALING | MFdFlags::MFD_CLOEXEC).unwrap();
        ftruncate(&fd, 8192).unwrap();
        let err = check_memfd(&fd, 4096).unwrap_err();
        assert!(err.message.contains("F_SEAL_SHRINK"), "{}", err.message);
        fcntl(&fd, FcntlArg::F_ADD_SEALS(required_seals())).unwrap();
        check_memfd(&fd, 8192).unwrap();
        assert_eq!(
            check_memfd(&fd, 8193).unwrap_err().code,
            ErrorCode::OutOfBounds
        );
        assert!(check_memfd(&fd, 0).is_err());
        // Not a memfd at all.
        let file = std::fs::File::open("/proc/self/status").unwrap();
        assert!(check_memfd(&file, 1).is_err());
        // A memfd that cannot be sealed.
        let plain = memfd_create("u", MFdFlags::MFD_CLOEXEC).unwrap();
        ftruncate(&plain, 4096).unwrap();
        assert!(check_memfd(&plain, 4096).is_err());
    }
}
