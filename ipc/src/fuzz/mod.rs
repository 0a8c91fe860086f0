//! The request decoder and validator under hostile input.
//!
//! [`check`] is the fuzz target: it runs bytes through what the daemon does
//! with a request it receives (split into frames, decode, resolve every
//! tensor reference against regions of awkward sizes, check shared-memory
//! names; or decode a companion packet) and asserts the invariants the
//! server relies on. A violated invariant panics, which is what a fuzzer
//! reports. Two drivers call it:
//!
//! - `fuzz/` at the repository root: a cargo-fuzz (libFuzzer) target, for
//!   people with a nightly toolchain;
//! - [`gen::Fuzzer`]: a deterministic mutation fuzzer on the stable
//!   toolchain (mutated shared vectors, random msgpack values, structured
//!   random requests), run briefly by `cargo test` and at length by
//!   `cargo run --release -p tacflow-ipc --example fuzz`.
//!
//! Input format: the first byte is the request's kind byte and the rest its
//! header; first byte [`COMPANION`] makes the rest a companion-socket packet,
//! and [`MULTI`] splits the rest into several frames.

pub mod generate;

use crate::Request;
use crate::codec::{ERROR_KIND, RawReply, decode_reply, decode_request, encode_error};
use crate::companion::decode_fd_request;
use crate::error::{ErrorCode, ErrorReply};
use crate::messages::RegionDesc;
use crate::region::normalize_shm_name;
use crate::tensor::{DType, MAX_RANK, TensorRef};

pub use generate::{Fuzzer, Report};

/// First input byte: the rest is a companion-socket packet.
pub const COMPANION: u8 = 0xFE;
/// First input byte: the rest is split into frames (see [`split_frames`]).
pub const MULTI: u8 = 0xFD;

/// Region sizes every fuzzed tensor reference is resolved against.
const REGION_SIZES: [u64; 6] = [0, 1, 4095, 1 << 20, 1 << 62, u64::MAX];

/// Runs one input; panics when an invariant does not hold.
pub fn check(data: &[u8]) {
    match data.split_first() {
        None => expect_error(decode_request(&[]).map(drop)),
        Some((&COMPANION, packet)) => match decode_fd_request(packet) {
            Ok(r) => {
                let again = crate::codec::to_msgpack(&r);
                assert_eq!(decode_fd_request(&again).as_ref(), Ok(&r));
            }
            Err(e) => check_error(&e),
        },
        Some((&MULTI, rest)) => {
            let frames = split_frames(rest);
            let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
            check_frames(&refs);
        }
        Some((_, header)) => check_frames(&[&data[..1], header]),
    }
}

/// `[n][len0][frame0][len1][frame1]…`: up to 4 frames of up to 255 bytes,
/// then whatever is left as the last frame.
pub fn split_frames(rest: &[u8]) -> Vec<Vec<u8>> {
    let Some((&n, mut rest)) = rest.split_first() else {
        return vec![];
    };
    let mut frames = Vec::new();
    for _ in 0..n % 5 {
        let Some((&len, tail)) = rest.split_first() else {
            break;
        };
        let take = usize::from(len).min(tail.len());
        frames.push(tail[..take].to_vec());
        rest = &tail[take..];
    }
    frames.push(rest.to_vec());
    frames
}

fn expect_error(r: Result<(), ErrorReply>) {
    match r {
        Ok(()) => panic!("no frames decoded as a request"),
        Err(e) => check_error(&e),
    }
}

fn check_frames(frames: &[&[u8]]) {
    match decode_request(frames) {
        Ok(req) => check_request(frames, &req),
        Err(e) => check_error(&e),
    }
}

/// An error the daemon sends must be a known code and survive its own
/// encoding (the client reads it back with the same id and code).
fn check_error(e: &ErrorReply) {
    assert_ne!(e.code, ErrorCode::Unknown, "daemon errors use known codes");
    assert!(!e.message.is_empty(), "errors say what went wrong");
    let [kind, body] = encode_error(e);
    assert_eq!(kind, [ERROR_KIND]);
    match decode_reply(&[&kind, &body]) {
        Ok(RawReply::Err(back)) => {
            assert_eq!((back.code, back.request_id), (e.code, e.request_id));
        }
        other => panic!("error reply does not decode as one: {other:?}"),
    }
}

fn check_request(frames: &[&[u8]], req: &Request) {
    assert_eq!(frames.len(), 2, "v1 requests are exactly two frames");
    assert_eq!([req.kind() as u8], frames[0]);
    assert_eq!(req.session().is_none(), matches!(req, Request::Hello(_)));
    // Re-encoding is stable: what the daemon understood is what a client
    // that sent the canonical bytes would have meant.
    let [k, h] = req.encode();
    let back = decode_request(&[&k, &h]).expect("a re-encoded request decodes");
    assert_eq!(back.encode()[1], h, "re-encoding is stable");
    match req {
        Request::Step(s) => {
            for e in &s.entries {
                if let Some(t) = &e.logits {
                    check_tensor(t);
                }
            }
        }
        Request::AttentionStep(a) => [&a.q, &a.k, &a.v, &a.out]
            .into_iter()
            .for_each(check_tensor),
        Request::RegisterRegion(r) => {
            if let RegionDesc::Shm { name, .. } = &r.region
                && let Ok(n) = normalize_shm_name(name)
            {
                assert!(n.starts_with('/') && n.len() <= 251);
                assert!(!n[1..].contains('/') && !n.contains('\0'));
                assert!(n != "/." && n != "/..");
            }
        }
        _ => {}
    }
}

/// A reference that resolves lies inside its region, element by element:
/// checked here in 128-bit arithmetic, independently of `resolve`.
fn check_tensor(t: &TensorRef) {
    for size in REGION_SIZES {
        let Ok(view) = t.resolve(size) else {
            continue;
        };
        assert!(view.shape.len() <= MAX_RANK);
        assert_eq!(view.strides.len(), view.shape.len());
        assert_eq!(view.shape, t.shape);
        let esize = u128::from(view.dtype.size());
        assert_eq!(u128::from(view.offset) % esize, 0, "aligned");
        if view.shape.contains(&0) {
            assert!(view.offset <= size);
            continue;
        }
        let last: u128 = view
            .shape
            .iter()
            .zip(&view.strides)
            .map(|(&n, &s)| u128::from(n - 1) * u128::from(s))
            .sum();
        let end = u128::from(view.offset) + (last + 1) * esize;
        assert!(
            end <= u128::from(size),
            "a resolved view stays in its region"
        );
        let last_index: Vec<u64> = view.shape.iter().map(|n| n - 1).collect();
        let at = u128::from(view.byte_offset(&last_index));
        assert_eq!(at + esize, end, "byte_offset agrees with the bounds check");
        // The checks the daemon runs next must not panic either.
        let _ = view.expect_dtype("logits", &[DType::F32, DType::F16, DType::Bf16]);
        let _ = view.expect_shape("logits", &[1, 512]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_as_documented() {
        assert_eq!(split_frames(&[]), Vec::<Vec<u8>>::new());
        assert_eq!(
            split_frames(&[2, 1, 9, 0, 5, 6]),
            vec![vec![9], vec![], vec![5, 6]]
        );
        assert_eq!(split_frames(&[1, 200, 1]), vec![vec![1], vec![]]);
    }

    #[test]
    fn the_target_takes_anything() {
        for input in [
            &[][..],
            &[0x30],
            &[0x30, 0xc1],
            &[COMPANION, 0x80],
            &[MULTI, 3, 1, 0x30, 0, 0],
            &[0x01, 0x82, 0xaa],
        ] {
            check(input);
        }
    }
}
