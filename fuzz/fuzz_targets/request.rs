//! libFuzzer over what the daemon does with request bytes: the first byte
//! is the kind, the rest the msgpack header (0xFE: a companion-socket
//! packet, 0xFD: several frames); see `tacflow_ipc::fuzz`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tacflow_ipc::fuzz::check(data));
