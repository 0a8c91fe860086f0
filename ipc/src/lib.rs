//! tacflow protocol v1, shared by the daemon and its tests.
//!
//! | concept | module | what it is |
//! | --- | --- | --- |
//! | frames | [`codec`] | `[kind byte][msgpack header]`, request decoding that never panics |
//! | bodies | [`messages`] | every request and reply of `PROTOCOL.md` |
//! | sampling | [`sampling`] | a sequence's sampling parameters (vLLM's options from 1.3) |
//! | named blocks | [`blocks`] | reservations, block modes, the sequence-state query (1.3) |
//! | offload | [`offload`] | attention-only layouts, `attention_step`, the attention pool (1.4) |
//! | errors | [`error`] | the wire error codes and the error reply |
//! | tensors | [`tensor`] | references into regions, checked before use |
//! | regions | [`region`] | client shared memory mapped by the daemon |
//! | memfds | [`companion`] | the descriptor socket's packets, seal checks |
//! | faults | [`sigbus`] | surviving a by-name region truncated under its mapping |
//! | fuzzing | [`fuzz`] | the decoder and validator under hostile bytes |
//!
//! `PROTOCOL.md` beside this crate is the specification; the test vectors in
//! `ipc/vectors/` are checked by both the Rust and the Python tests.

pub mod blocks;
pub mod codec;
pub mod companion;
pub mod error;
pub mod fuzz;
pub mod messages;
pub mod offload;
pub mod region;
pub mod sampling;
pub mod sigbus;
pub mod tensor;
pub mod tensor_io;

pub use codec::{Kind, Request};
pub use error::{Error, ErrorCode, ErrorReply, Result};
pub use messages::*;
pub use region::HostRegion;
pub use tensor::{DType, TensorRef, TensorView};
