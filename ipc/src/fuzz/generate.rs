//! A deterministic mutation fuzzer on the stable toolchain: inputs for
//! [`super::check`] from three sources, mixed.
//!
//! - **Mutated vectors**: the shared msgpack vectors of `ipc/vectors/`
//!   behind their kind byte, with 1–8 mutations each (bit flips, interesting
//!   bytes and integers, inserted, deleted, duplicated and spliced ranges,
//!   truncation, another kind byte).
//! - **Random msgpack values**: any msgpack, biased towards maps with the
//!   protocol's keys and extreme integers, sometimes nested past the depth
//!   limit.
//! - **Structured random requests**: typed requests with hostile numbers
//!   (huge shapes, strides and offsets, `u64::MAX` ids, odd names), encoded
//!   as a client would, sometimes with one byte flipped afterwards; and
//!   companion packets.
//!
//! The same seed gives the same inputs, so a failure is reproducible from
//! its seed and index.

use crate::codec::Kind;
use crate::tensor::{DType, TensorRef};
use crate::{Request, messages::*};
use std::path::Path;
use std::time::{Duration, Instant};

/// splitmix64: small, fast, and good enough to pick mutations.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    /// An integer that tends to sit on a boundary.
    pub fn interesting(&mut self) -> u64 {
        const EDGES: [u64; 14] = [
            0,
            1,
            2,
            15,
            16,
            127,
            128,
            255,
            65_535,
            1 << 31,
            u32::MAX as u64,
            1 << 62,
            i64::MAX as u64,
            u64::MAX,
        ];
        match self.below(4) {
            0 => EDGES[self.below(EDGES.len())]
                .wrapping_add(self.below(3) as u64)
                .wrapping_sub(1),
            1 => self.next_u64(),
            _ => self.below(1 << 12) as u64,
        }
    }
}

/// Inputs from `ipc/vectors/`: request vectors behind their own kind byte,
/// replies behind a random one (so that they decode as the wrong body).
pub fn load_corpus(dir: &Path) -> std::io::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "msgpack"))
        .collect();
    names.sort();
    for (i, path) in names.iter().enumerate() {
        let stem = path
            .file_stem()
            .map_or(String::new(), |s| s.to_string_lossy().into_owned());
        let kind = Kind::ALL
            .iter()
            .filter(|k| stem.starts_with(k.name()) && stem.ends_with("_request"))
            .max_by_key(|k| k.name().len())
            .map_or(Kind::ALL[i % Kind::ALL.len()] as u8, |k| *k as u8);
        let mut input = vec![kind];
        input.extend(std::fs::read(path)?);
        out.push(input);
    }
    Ok(out)
}

const KEYS: [&str; 24] = [
    "request_id",
    "session",
    "protocol",
    "client",
    "entries",
    "seq_id",
    "tokens",
    "positions",
    "sample",
    "logits",
    "region_id",
    "offset",
    "dtype",
    "shape",
    "strides",
    "region",
    "kind",
    "name",
    "byte_size",
    "fd_token",
    "attention",
    "policy",
    "sampling",
    "parent",
];

fn write_int(rng: &mut Rng, out: &mut Vec<u8>) {
    let v = rng.interesting();
    if rng.chance(20) {
        let _ = rmp::encode::write_sint(out, -(v as i64).abs().max(i64::MIN + 1));
    } else {
        let _ = rmp::encode::write_uint(out, v);
    }
}

/// Any msgpack value, biased towards what the decoder looks for.
pub fn random_value(rng: &mut Rng, depth: usize, out: &mut Vec<u8>) {
    let leaf = depth == 0 || rng.chance(35);
    match if leaf { rng.below(7) } else { 7 + rng.below(3) } {
        0 | 1 => write_int(rng, out),
        2 => {
            let _ = rmp::encode::write_str(out, KEYS[rng.below(KEYS.len())]);
        }
        3 => {
            let n = [0, 1, 15, 16, 17, 64][rng.below(6)];
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            let _ = rmp::encode::write_bin(out, &bytes);
        }
        4 => {
            let _ = rmp::encode::write_f32(out, f32::from_bits(rng.next_u64() as u32));
        }
        5 => {
            let _ = rmp::encode::write_bool(out, rng.chance(50));
        }
        6 => rmp::encode::write_nil(out).unwrap_or(()),
        7 | 8 => {
            let n = rng.below(6) as u32;
            let _ = rmp::encode::write_map_len(out, n);
            for _ in 0..n {
                let _ = rmp::encode::write_str(out, KEYS[rng.below(KEYS.len())]);
                random_value(rng, depth - 1, out);
            }
        }
        _ => {
            let n = rng.below(6) as u32;
            let _ = rmp::encode::write_array_len(out, n);
            for _ in 0..n {
                random_value(rng, depth - 1, out);
            }
        }
    }
}

fn random_tensor(rng: &mut Rng) -> TensorRef {
    let dtypes = [
        DType::F32,
        DType::F16,
        DType::Bf16,
        DType::I32,
        DType::I64,
        DType::U8,
    ];
    let rank = [0, 1, 2, 2, 3, 8, 9][rng.below(7)];
    let shape: Vec<u64> = (0..rank).map(|_| rng.interesting()).collect();
    let strides = rng.chance(40).then(|| {
        (0..rank + usize::from(rng.chance(10)))
            .map(|_| rng.interesting())
            .collect()
    });
    TensorRef {
        region_id: rng.interesting(),
        offset: rng.interesting(),
        dtype: dtypes[rng.below(dtypes.len())],
        shape,
        strides,
    }
}

fn random_name(rng: &mut Rng) -> String {
    const PARTS: [&str; 9] = ["psm_1", "/", "..", ".", "\0", "a/b", "é", "", "x"];
    let n = rng.below(4) + 1;
    let mut s: String = (0..n).map(|_| PARTS[rng.below(PARTS.len())]).collect();
    if rng.chance(5) {
        s.push_str(&"n".repeat(300));
    }
    s
}

fn random_policy(rng: &mut Rng) -> AttentionPolicy {
    let p = f32::from_bits(rng.next_u64() as u32);
    match rng.below(4) {
        0 => AttentionPolicy::Full,
        1 => AttentionPolicy::Tactic {
            p,
            cluster_size: rng.chance(50).then(|| rng.interesting() as u32),
            recluster_limit: rng.chance(50).then(|| rng.interesting() as u32),
        },
        2 => AttentionPolicy::FixedBudget {
            tokens: rng.interesting() as u32,
            p: rng.chance(50).then_some(p),
        },
        _ => AttentionPolicy::OracleTopP { p },
    }
}

fn random_sampling(rng: &mut Rng) -> SamplingParams {
    SamplingParams {
        temperature: f32::from_bits(rng.next_u64() as u32),
        top_p: f32::from_bits(rng.next_u64() as u32),
        top_k: rng.interesting() as u32,
        seed: rng.chance(80).then(|| rng.interesting()),
        logprobs: rng.interesting() as u32,
        min_p: f32::from_bits(rng.next_u64() as u32),
        presence_penalty: f32::from_bits(rng.next_u64() as u32),
        frequency_penalty: f32::from_bits(rng.next_u64() as u32),
        repetition_penalty: f32::from_bits(rng.next_u64() as u32),
        logit_bias: (0..rng.below(3))
            .map(|_| {
                (
                    rng.interesting() as u32,
                    f32::from_bits(rng.next_u64() as u32),
                )
            })
            .collect(),
        prompt_logprobs: rng.chance(30).then(|| rng.interesting() as u32),
    }
}

fn random_region(rng: &mut Rng) -> RegionDesc {
    match rng.below(3) {
        0 => RegionDesc::Shm {
            name: random_name(rng),
            byte_size: rng.interesting(),
        },
        1 => RegionDesc::Memfd {
            fd_token: rng.interesting(),
            byte_size: rng.interesting(),
        },
        _ => RegionDesc::Cuda {
            ipc_handle: vec![rng.next_u64() as u8; rng.below(80)],
            device_uuid: random_name(rng),
            byte_size: rng.interesting(),
            offset: rng.interesting(),
            event_handle: rng
                .chance(50)
                .then(|| vec![rng.next_u64() as u8; rng.below(80)]),
        },
    }
}

fn random_entries(rng: &mut Rng) -> Vec<StepEntry> {
    (0..rng.below(4))
        .map(|_| {
            let n = [0, 1, 3, 17][rng.below(4)];
            let positions = rng.chance(30).then(|| {
                (0..n + rng.below(2))
                    .map(|_| rng.interesting() as u32)
                    .collect()
            });
            StepEntry {
                seq_id: rng.interesting(),
                tokens: (0..n).map(|_| rng.interesting() as u32).collect(),
                positions,
                sample: rng.chance(50),
                logits: rng.chance(70).then(|| random_tensor(rng)),
                blocks: rng.chance(30).then(|| {
                    (0..rng.below(4))
                        .map(|_| rng.interesting() as u32)
                        .collect()
                }),
            }
        })
        .collect()
}

/// A typed request with hostile numbers, as a client would encode it.
pub fn random_request(rng: &mut Rng) -> Request {
    let request_id = rng.interesting();
    let mut t = [0u8; 16];
    t.iter_mut().for_each(|b| *b = rng.next_u64() as u8);
    let session = SessionToken(t);
    match rng.below(10) {
        8 => Request::ReserveBlocks(ReserveBlocksRequest {
            request_id,
            session,
            count: rng.interesting(),
        }),
        9 => Request::SequenceState(SequenceStateRequest {
            request_id,
            session,
            seq_id: rng.interesting(),
        }),
        0 => Request::Hello(HelloRequest {
            request_id,
            protocol: (1, rng.interesting() as u32),
            client: random_name(rng),
        }),
        1 => Request::RegisterRegion(RegisterRegionRequest {
            request_id,
            session,
            region: random_region(rng),
        }),
        2 => Request::OpenSequence(OpenSequenceRequest {
            request_id,
            session,
            seq_id: rng.interesting(),
            attention: random_policy(rng),
            sampling: random_sampling(rng),
            diagnostics: rng.chance(50),
            blocks: if rng.chance(50) {
                BlockMode::Named
            } else {
                BlockMode::Daemon
            },
            prefix: (0..rng.below(3))
                .map(|_| rng.interesting() as u32)
                .collect(),
            prompt_len: rng.chance(30).then(|| rng.interesting()),
            layout: rng.chance(30).then(|| AttentionLayout {
                num_layers: rng.interesting() as u32,
                num_heads: rng.interesting() as u32,
                num_kv_heads: rng.interesting() as u32,
                head_dim: rng.interesting() as u32,
                scale: 0.125,
                softcap: rng.chance(20).then_some(50.0),
                sliding_window: rng.chance(20).then(|| rng.interesting() as u32),
                sinks: rng.chance(20),
            }),
        }),
        3 => Request::ForkSequence(ForkSequenceRequest {
            request_id,
            session,
            parent: rng.interesting(),
            child: rng.interesting(),
            sampling: rng.chance(50).then(|| random_sampling(rng)),
            attention: rng.chance(50).then(|| random_policy(rng)),
            diagnostics: rng.chance(50).then(|| rng.chance(50)),
        }),
        4 => Request::AttentionStep(Box::new(AttentionStepRequest {
            request_id,
            session,
            layer: rng.interesting() as u32,
            seq_ids: (0..rng.below(4)).map(|_| rng.interesting()).collect(),
            num_tokens: (0..rng.below(3))
                .map(|_| rng.interesting() as u32)
                .collect(),
            positions: (0..rng.below(3)).map(|_| rng.interesting()).collect(),
            q: random_tensor(rng),
            k: random_tensor(rng),
            v: random_tensor(rng),
            out: random_tensor(rng),
        })),
        _ => Request::Step(StepRequest {
            request_id,
            session,
            entries: random_entries(rng),
        }),
    }
}

/// Applies 1–8 random mutations to `input` (`other` is a splice source).
pub fn mutate(rng: &mut Rng, input: &mut Vec<u8>, other: &[u8]) {
    for _ in 0..=rng.below(8) {
        let len = input.len();
        let at = if len == 0 { 0 } else { rng.below(len) };
        match rng.below(9) {
            0 if len > 0 => input[at] ^= 1 << rng.below(8),
            1 if len > 0 => {
                const BYTES: [u8; 12] = [
                    0, 0xff, 0x7f, 0x80, 0xc0, 0xc1, 0xcf, 0xd3, 0xdc, 0xdd, 0xde, 0xdf,
                ];
                input[at] = BYTES[rng.below(BYTES.len())];
            }
            2 => {
                // A big-endian u64 or u32 msgpack integer with an edge value.
                let v = rng.interesting();
                let be = v.to_be_bytes();
                let b: Vec<u8> = if rng.chance(50) {
                    std::iter::once(0xcf).chain(be).collect()
                } else {
                    std::iter::once(0xce)
                        .chain(be[4..].iter().copied())
                        .collect()
                };
                input.splice(at..at, b);
            }
            3 if len > 0 => {
                let end = (at + 1 + rng.below(16)).min(len);
                input.drain(at..end);
            }
            4 if len > 0 => {
                let end = (at + 1 + rng.below(32)).min(len);
                let chunk = input[at..end].to_vec();
                input.splice(at..at, chunk);
            }
            5 if !other.is_empty() => {
                let from = rng.below(other.len());
                let end = (from + 1 + rng.below(64)).min(other.len());
                input.splice(at..at, other[from..end].iter().copied());
            }
            6 if len > 1 => input.truncate(1 + rng.below(len - 1)),
            7 if len > 0 => input[0] = Kind::ALL[rng.below(Kind::ALL.len())] as u8,
            _ => {
                let n = rng.below(8) + 1;
                input.splice(at..at, (0..n).map(|_| rng.next_u64() as u8));
            }
        }
    }
}

/// How a run went.
#[derive(Debug, Clone, Default)]
pub struct Report {
    pub inputs: u64,
    pub elapsed: Duration,
    /// The slowest single input (a hang shows here).
    pub slowest: Duration,
    /// Inputs per source: mutated vectors, random values, structured
    /// requests, companion packets, deep nesting.
    pub by_source: [u64; 5],
}

/// The stable fuzzer: a seeded generator over a corpus.
#[derive(Debug)]
pub struct Fuzzer {
    rng: Rng,
    corpus: Vec<Vec<u8>>,
}

impl Fuzzer {
    pub fn new(seed: u64, corpus: Vec<Vec<u8>>) -> Fuzzer {
        Fuzzer {
            rng: Rng::new(seed),
            corpus,
        }
    }

    /// The next input and its source (an index of [`Report::by_source`]).
    pub fn next_input(&mut self) -> (Vec<u8>, usize) {
        let rng = &mut self.rng;
        let pick = rng.below(100);
        if pick < 45 && !self.corpus.is_empty() {
            let mut input = self.corpus[rng.below(self.corpus.len())].clone();
            let other = &self.corpus[rng.below(self.corpus.len())];
            mutate(rng, &mut input, other);
            return (input, 0);
        }
        if pick < 65 {
            let mut input = vec![Kind::ALL[rng.below(Kind::ALL.len())] as u8];
            let depth = 1 + rng.below(6);
            random_value(rng, depth, &mut input);
            return (input, 1);
        }
        if pick < 90 {
            let [k, h] = random_request(rng).encode();
            let mut input = k;
            input.extend(h);
            if rng.chance(25) {
                let at = rng.below(input.len());
                input[at] ^= 1 << rng.below(8);
            }
            return (input, 2);
        }
        if pick < 98 {
            let mut input = vec![super::COMPANION];
            if rng.chance(50) {
                random_value(rng, 3, &mut input);
            } else {
                let r = crate::companion::FdTransferRequest {
                    request_id: rng.interesting(),
                    session: SessionToken([rng.next_u64() as u8; 16]),
                    byte_size: rng.interesting(),
                };
                input.extend(crate::codec::to_msgpack(&r));
                mutate(rng, &mut input, &[]);
            }
            return (input, 3);
        }
        // Nesting far past the limit, inside an otherwise valid header.
        let depth = [33, 100, 10_000, 200_000][rng.below(4)];
        let mut input = vec![Kind::Ping as u8, 0x82, 0xaa];
        input.extend_from_slice(b"request_id");
        input.extend_from_slice(&[0x01, 0xa1, b'x']);
        input.extend(std::iter::repeat_n(
            if rng.chance(50) { 0x91 } else { 0x81 },
            depth,
        ));
        (input, 4)
    }

    /// Runs `n` inputs through `target`.
    pub fn run(&mut self, n: u64, mut target: impl FnMut(&[u8])) -> Report {
        let mut report = Report::default();
        let start = Instant::now();
        for _ in 0..n {
            let (input, source) = self.next_input();
            let t = Instant::now();
            target(&input);
            report.slowest = report.slowest.max(t.elapsed());
            report.by_source[source] += 1;
            report.inputs += 1;
        }
        report.elapsed = start.elapsed();
        report
    }
}
