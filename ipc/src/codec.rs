//! Framing: `[kind: 1 byte][header: msgpack]` (`PROTOCOL.md` §2).
//!
//! The ROUTER socket puts the peer's identity in front of these frames; this
//! module sees only what follows it. Decoding never panics: whatever bytes
//! arrive, the result is a request or the [`ErrorReply`] to send back.

use crate::error::{ErrorCode, ErrorReply};
use crate::messages::*;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// The kind byte of each request. A successful reply carries the request's
/// kind with [`REPLY_BIT`] set; a failure carries [`ERROR_KIND`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Hello = 0x01,
    Ping = 0x02,
    Close = 0x03,
    Stats = 0x04,
    Health = 0x05,
    RegisterRegion = 0x10,
    UnregisterRegion = 0x11,
    OpenSequence = 0x20,
    ForkSequence = 0x21,
    TruncateSequence = 0x22,
    CloseSequence = 0x23,
    /// (1.3)
    ReserveBlocks = 0x24,
    /// (1.3)
    SequenceState = 0x25,
    Step = 0x30,
    AttentionStep = 0x31,
}

pub const REPLY_BIT: u8 = 0x80;
pub const ERROR_KIND: u8 = 0xFF;

/// Largest header a peer may send (a step of many long prompts fits easily:
/// 32k tokens as msgpack integers is under 200 KiB).
pub const MAX_HEADER_BYTES: usize = 16 << 20;

/// Deepest msgpack nesting a header may have; v1 bodies need fewer than 8.
pub const MAX_DEPTH: usize = 32;

impl Kind {
    pub const ALL: [Kind; 15] = [
        Kind::Hello,
        Kind::Ping,
        Kind::Close,
        Kind::Stats,
        Kind::Health,
        Kind::RegisterRegion,
        Kind::UnregisterRegion,
        Kind::OpenSequence,
        Kind::ForkSequence,
        Kind::TruncateSequence,
        Kind::CloseSequence,
        Kind::ReserveBlocks,
        Kind::SequenceState,
        Kind::Step,
        Kind::AttentionStep,
    ];

    pub fn from_byte(b: u8) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| *k as u8 == b)
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Ping => "ping",
            Kind::Close => "close",
            Kind::Stats => "stats",
            Kind::Health => "health",
            Kind::RegisterRegion => "register_region",
            Kind::UnregisterRegion => "unregister_region",
            Kind::OpenSequence => "open_sequence",
            Kind::ForkSequence => "fork_sequence",
            Kind::TruncateSequence => "truncate_sequence",
            Kind::CloseSequence => "close_sequence",
            Kind::ReserveBlocks => "reserve_blocks",
            Kind::SequenceState => "sequence_state",
            Kind::Step => "step",
            Kind::AttentionStep => "attention_step",
        }
    }

    pub fn reply_byte(self) -> u8 {
        self as u8 | REPLY_BIT
    }
}

/// A decoded request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Hello(HelloRequest),
    Ping(SessionRequest),
    Close(SessionRequest),
    Stats(SessionRequest),
    Health(SessionRequest),
    RegisterRegion(RegisterRegionRequest),
    UnregisterRegion(UnregisterRegionRequest),
    OpenSequence(OpenSequenceRequest),
    ForkSequence(ForkSequenceRequest),
    TruncateSequence(TruncateSequenceRequest),
    CloseSequence(CloseSequenceRequest),
    ReserveBlocks(ReserveBlocksRequest),
    SequenceState(SequenceStateRequest),
    Step(StepRequest),
    AttentionStep(Box<AttentionStepRequest>),
}

impl Request {
    pub fn kind(&self) -> Kind {
        match self {
            Request::Hello(_) => Kind::Hello,
            Request::Ping(_) => Kind::Ping,
            Request::Close(_) => Kind::Close,
            Request::Stats(_) => Kind::Stats,
            Request::Health(_) => Kind::Health,
            Request::RegisterRegion(_) => Kind::RegisterRegion,
            Request::UnregisterRegion(_) => Kind::UnregisterRegion,
            Request::OpenSequence(_) => Kind::OpenSequence,
            Request::ForkSequence(_) => Kind::ForkSequence,
            Request::TruncateSequence(_) => Kind::TruncateSequence,
            Request::CloseSequence(_) => Kind::CloseSequence,
            Request::ReserveBlocks(_) => Kind::ReserveBlocks,
            Request::SequenceState(_) => Kind::SequenceState,
            Request::Step(_) => Kind::Step,
            Request::AttentionStep(_) => Kind::AttentionStep,
        }
    }

    pub fn request_id(&self) -> u64 {
        match self {
            Request::Hello(r) => r.request_id,
            Request::Ping(r) | Request::Close(r) | Request::Stats(r) | Request::Health(r) => {
                r.request_id
            }
            Request::RegisterRegion(r) => r.request_id,
            Request::UnregisterRegion(r) => r.request_id,
            Request::OpenSequence(r) => r.request_id,
            Request::ForkSequence(r) => r.request_id,
            Request::TruncateSequence(r) => r.request_id,
            Request::CloseSequence(r) => r.request_id,
            Request::ReserveBlocks(r) => r.request_id,
            Request::SequenceState(r) => r.request_id,
            Request::Step(r) => r.request_id,
            Request::AttentionStep(r) => r.request_id,
        }
    }

    /// The session token; every request but `hello` carries one.
    pub fn session(&self) -> Option<SessionToken> {
        match self {
            Request::Hello(_) => None,
            Request::Ping(r) | Request::Close(r) | Request::Stats(r) | Request::Health(r) => {
                Some(r.session)
            }
            Request::RegisterRegion(r) => Some(r.session),
            Request::UnregisterRegion(r) => Some(r.session),
            Request::OpenSequence(r) => Some(r.session),
            Request::ForkSequence(r) => Some(r.session),
            Request::TruncateSequence(r) => Some(r.session),
            Request::CloseSequence(r) => Some(r.session),
            Request::ReserveBlocks(r) => Some(r.session),
            Request::SequenceState(r) => Some(r.session),
            Request::Step(r) => Some(r.session),
            Request::AttentionStep(r) => Some(r.session),
        }
    }

    /// The request's body as msgpack.
    pub fn encode_header(&self) -> Vec<u8> {
        match self {
            Request::Hello(r) => to_msgpack(r),
            Request::Ping(r) | Request::Close(r) | Request::Stats(r) | Request::Health(r) => {
                to_msgpack(r)
            }
            Request::RegisterRegion(r) => to_msgpack(r),
            Request::UnregisterRegion(r) => to_msgpack(r),
            Request::OpenSequence(r) => to_msgpack(r),
            Request::ForkSequence(r) => to_msgpack(r),
            Request::TruncateSequence(r) => to_msgpack(r),
            Request::CloseSequence(r) => to_msgpack(r),
            Request::ReserveBlocks(r) => to_msgpack(r),
            Request::SequenceState(r) => to_msgpack(r),
            Request::Step(r) => to_msgpack(r),
            Request::AttentionStep(r) => to_msgpack(r),
        }
    }

    /// The frames a client sends: kind byte, then header.
    pub fn encode(&self) -> [Vec<u8>; 2] {
        [vec![self.kind() as u8], self.encode_header()]
    }
}

/// Serializes a body as a msgpack map with field names. Infallible for the
/// types of this crate (no non-string map keys, no unsupported types).
pub fn to_msgpack<T: Serialize>(v: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("protocol types always serialize")
}

/// Deserializes a header, refusing nesting deeper than [`MAX_DEPTH`].
pub fn from_msgpack<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut de = rmp_serde::Deserializer::new(bytes);
    de.set_max_depth(MAX_DEPTH);
    T::deserialize(&mut de)
}

#[derive(Deserialize)]
struct Probe {
    #[serde(default)]
    request_id: Option<u64>,
}

/// Best effort: the request id of a header that did not decode as its kind,
/// so the error reply can still be matched by the client.
fn probe_request_id(header: &[u8]) -> Option<u64> {
    from_msgpack::<Probe>(header)
        .ok()
        .and_then(|p| p.request_id)
}

fn body<T: DeserializeOwned>(kind: Kind, header: &[u8]) -> Result<T, ErrorReply> {
    from_msgpack(header).map_err(|e| {
        let mut err = ErrorReply::bad_request(format!("{}: malformed header: {e}", kind.name()));
        err.request_id = probe_request_id(header);
        err
    })
}

/// Decodes the frames that follow the peer identity.
pub fn decode_request(frames: &[&[u8]]) -> Result<Request, ErrorReply> {
    let [kind, header, rest @ ..] = frames else {
        return Err(ErrorReply::bad_request(format!(
            "a request is [kind, header]; got {} frame(s)",
            frames.len()
        )));
    };
    let probe = || probe_request_id(header);
    let kind = match kind {
        [b] => Kind::from_byte(*b).ok_or_else(|| {
            let mut e = ErrorReply::bad_request(format!("unknown request kind 0x{b:02x}"))
                .with("kind", u64::from(*b));
            e.request_id = probe();
            e
        })?,
        _ => {
            let mut e = ErrorReply::bad_request("the kind frame must be exactly one byte")
                .with("kind_frame_len", kind.len());
            e.request_id = probe();
            return Err(e);
        }
    };
    if header.len() > MAX_HEADER_BYTES {
        let mut e = ErrorReply::bad_request("header too large")
            .with("bytes", header.len())
            .with("max_bytes", MAX_HEADER_BYTES);
        e.request_id = probe();
        return Err(e);
    }
    if !rest.is_empty() {
        let mut e = ErrorReply::bad_request(format!(
            "{}: v1 requests carry no payload frames, got {}",
            kind.name(),
            rest.len()
        ));
        e.request_id = probe();
        return Err(e);
    }
    let req = match kind {
        Kind::Hello => Request::Hello(body(kind, header)?),
        Kind::Ping => Request::Ping(body(kind, header)?),
        Kind::Close => Request::Close(body(kind, header)?),
        Kind::Stats => Request::Stats(body(kind, header)?),
        Kind::Health => Request::Health(body(kind, header)?),
        Kind::RegisterRegion => Request::RegisterRegion(body(kind, header)?),
        Kind::UnregisterRegion => Request::UnregisterRegion(body(kind, header)?),
        Kind::OpenSequence => Request::OpenSequence(body(kind, header)?),
        Kind::ForkSequence => Request::ForkSequence(body(kind, header)?),
        Kind::TruncateSequence => Request::TruncateSequence(body(kind, header)?),
        Kind::CloseSequence => Request::CloseSequence(body(kind, header)?),
        Kind::ReserveBlocks => Request::ReserveBlocks(body(kind, header)?),
        Kind::SequenceState => Request::SequenceState(body(kind, header)?),
        Kind::Step => Request::Step(body(kind, header)?),
        Kind::AttentionStep => Request::AttentionStep(body(kind, header)?),
    };
    if let Request::Hello(h) = &req
        && h.protocol.0 != PROTOCOL_VERSION.0
    {
        return Err(ErrorReply::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "client speaks protocol {}.{}, this daemon speaks {}.{}",
                h.protocol.0, h.protocol.1, PROTOCOL_VERSION.0, PROTOCOL_VERSION.1
            ),
        )
        .with("daemon_major", u64::from(PROTOCOL_VERSION.0))
        .with("daemon_minor", u64::from(PROTOCOL_VERSION.1))
        .for_request(h.request_id));
    }
    Ok(req)
}

/// A successful reply: kind byte with [`REPLY_BIT`], then the body.
pub fn encode_reply<T: Serialize>(kind: Kind, body: &T) -> [Vec<u8>; 2] {
    [vec![kind.reply_byte()], to_msgpack(body)]
}

pub fn encode_error(err: &ErrorReply) -> [Vec<u8>; 2] {
    [vec![ERROR_KIND], to_msgpack(err)]
}

/// A reply as a client reads it: the kind it answers and its raw body, or the
/// error. Clients decode the body with [`from_msgpack`] into the type they
/// expect.
#[derive(Debug)]
pub enum RawReply<'a> {
    Ok { kind: Kind, body: &'a [u8] },
    Err(ErrorReply),
}

pub fn decode_reply<'a>(frames: &[&'a [u8]]) -> Result<RawReply<'a>, ErrorReply> {
    let [kind, header, ..] = frames else {
        return Err(ErrorReply::bad_request("a reply is [kind, header]"));
    };
    match kind {
        [ERROR_KIND] => from_msgpack::<ErrorReply>(header)
            .map(RawReply::Err)
            .map_err(|e| ErrorReply::bad_request(format!("malformed error reply: {e}"))),
        [b] if b & REPLY_BIT != 0 => {
            let kind = Kind::from_byte(b & !REPLY_BIT)
                .ok_or_else(|| ErrorReply::bad_request(format!("unknown reply kind 0x{b:02x}")))?;
            Ok(RawReply::Ok { kind, body: header })
        }
        _ => Err(ErrorReply::bad_request("reply kind frame is not a reply")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> SessionToken {
        SessionToken([7; 16])
    }

    #[test]
    fn every_kind_round_trips_its_byte() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_byte(k as u8), Some(k));
            assert_eq!(Kind::from_byte(k.reply_byte()), None);
        }
    }

    #[test]
    fn step_round_trips() {
        let req = Request::Step(StepRequest {
            request_id: 9,
            session: token(),
            entries: vec![StepEntry {
                seq_id: 3,
                tokens: vec![1, 2, 3],
                positions: Some(vec![0, 1, 2]),
                sample: false,
                logits: None,
                blocks: Some(vec![4, 0]),
            }],
        });
        let [k, h] = req.encode();
        let back = decode_request(&[&k, &h]).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn garbage_gets_bad_request_with_the_id_when_readable() {
        let err = decode_request(&[&[0x30], &[0xc1, 0xff]]).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
        assert_eq!(err.request_id, None);
        // A valid map that is not a step still yields its request id.
        let h = to_msgpack(&AckReply { request_id: 42 });
        let err = decode_request(&[&[0x30], &h]).unwrap_err();
        assert_eq!(err.request_id, Some(42));
        let err = decode_request(&[&[0x77], &h]).unwrap_err();
        assert!(err.message.contains("unknown request kind"));
        assert_eq!(err.request_id, Some(42));
    }

    #[test]
    fn wrong_major_is_refused() {
        let h = to_msgpack(&HelloRequest {
            request_id: 1,
            protocol: (2, 0),
            client: String::new(),
        });
        let err = decode_request(&[&[0x01], &h]).unwrap_err();
        assert_eq!(err.code, ErrorCode::UnsupportedVersion);
        assert_eq!(err.request_id, Some(1));
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        // 100k nested one-element arrays inside an unknown field.
        let mut h = vec![0x82, 0xaa];
        h.extend_from_slice(b"request_id");
        h.push(0x05);
        h.extend_from_slice(&[0xa1, b'x']);
        h.extend(std::iter::repeat_n(0x91u8, 100_000));
        h.push(0xc0);
        let err = decode_request(&[&[0x02], &h]).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
    }

    #[test]
    fn large_ids_survive_in_error_details() {
        let e = ErrorReply::bad_request("x").with("seq_id", u64::MAX);
        let back: ErrorReply = from_msgpack(&to_msgpack(&e)).unwrap();
        assert_eq!(
            back.detail["seq_id"],
            crate::error::DetailValue::UInt(u64::MAX)
        );
    }

    #[test]
    fn unknown_fields_are_ignored() {
        #[derive(Serialize)]
        struct Newer {
            request_id: u64,
            session: SessionToken,
            future_field: Vec<u32>,
        }
        let h = to_msgpack(&Newer {
            request_id: 5,
            session: token(),
            future_field: vec![1, 2],
        });
        let req = decode_request(&[&[0x02], &h]).unwrap();
        assert_eq!(req.request_id(), 5);
    }
}
