//! Shared test vectors: msgpack bytes of protocol messages in `ipc/vectors/`,
//! each with a JSON description that the Python tests read too.
//!
//! This test encodes every typed message below and checks that the bytes on
//! disk are exactly what the Rust types produce, and that they decode back to
//! the same value. Run with `TACFLOW_REGEN_VECTORS=1` to rewrite the files
//! after an intended change of the protocol (then review the diff).

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::path::PathBuf;
use tacflow_ipc::codec::{ERROR_KIND, Kind, from_msgpack, to_msgpack};
use tacflow_ipc::*;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors")
}

/// msgpack value → JSON, with `bin` as `{"$bin": hex}` so Python can rebuild
/// the exact value.
fn to_json(v: &rmpv::Value) -> serde_json::Value {
    use rmpv::Value as M;
    use serde_json::Value as J;
    match v {
        M::Nil => J::Null,
        M::Boolean(b) => J::Bool(*b),
        M::Integer(i) => {
            if let Some(u) = i.as_u64() {
                J::from(u)
            } else {
                J::from(i.as_i64().unwrap())
            }
        }
        M::F32(f) => serde_json::json!({"$f32": f}),
        M::F64(f) => J::from(*f),
        M::String(s) => J::String(s.as_str().unwrap().to_owned()),
        M::Binary(b) => {
            let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
            serde_json::json!({"$bin": hex})
        }
        M::Array(a) => J::Array(a.iter().map(to_json).collect()),
        M::Map(m) => {
            let mut obj = serde_json::Map::new();
            for (k, v) in m {
                obj.insert(k.as_str().unwrap().to_owned(), to_json(v));
            }
            J::Object(obj)
        }
        M::Ext(..) => panic!("protocol v1 has no ext types"),
    }
}

fn check<T>(name: &str, direction: &str, frame: u8, kind: &str, value: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let bytes = to_msgpack(value);
    let generic = rmpv::decode::read_value(&mut &bytes[..]).unwrap();
    let desc = serde_json::json!({
        "kind": kind,
        "direction": direction,
        "frame": frame,
        "body": to_json(&generic),
    });
    let bin_path = dir().join(format!("{name}.msgpack"));
    let json_path = dir().join(format!("{name}.json"));
    if std::env::var_os("TACFLOW_REGEN_VECTORS").is_some() {
        std::fs::create_dir_all(dir()).unwrap();
        std::fs::write(&bin_path, &bytes).unwrap();
        let mut text = serde_json::to_string_pretty(&desc).unwrap();
        text.push('\n');
        std::fs::write(&json_path, text).unwrap();
    }
    let on_disk = std::fs::read(&bin_path)
        .unwrap_or_else(|e| panic!("{}: {e} (regenerate the vectors)", bin_path.display()));
    assert_eq!(
        on_disk, bytes,
        "{name}: Rust encoding differs from the vector"
    );
    let back: T = from_msgpack(&on_disk).unwrap();
    assert_eq!(&back, value, "{name}: decoding the vector differs");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!(json, desc, "{name}: JSON description is stale");
}

fn token() -> SessionToken {
    SessionToken(*b"\x01\x23\x45\x67\x89\xab\xcd\xef\xfe\xdc\xba\x98\x76\x54\x32\x10")
}

fn req(kind: Kind) -> (&'static str, u8) {
    ("request", kind as u8)
}

#[test]
fn vectors_match_the_rust_types() {
    let t = token();
    let (d, f) = req(Kind::Hello);
    check(
        "hello_request",
        d,
        f,
        "hello",
        &HelloRequest {
            request_id: 1,
            protocol: (1, 4),
            client: "tacflow-py/0.1.0".into(),
        },
    );
    check(
        "hello_reply",
        "reply",
        Kind::Hello.reply_byte(),
        "hello",
        &HelloReply {
            request_id: 1,
            session: t,
            instance_id: "00112233445566778899aabbccddeeff".into(),
            protocol: (1, 4),
            daemon: "tacflowd 0.1.0".into(),
            model: ModelInfo {
                name: "tiny".into(),
                architecture: "llama".into(),
                vocab_size: 512,
                hidden_size: 64,
                num_layers: 3,
                num_heads: 4,
                num_kv_heads: 2,
                head_dim: 16,
                max_context: 4096,
                dtype: "f32".into(),
                bos_token_id: Some(1),
                eos_token_ids: vec![2],
            },
            backend: BackendInfo {
                kind: "cpu".into(),
                device: "2 threads".into(),
            },
            kv: KvInfo {
                block_size: 16,
                total_blocks: 1024,
                free_blocks: 1000,
            },
            attention_policies: vec!["full".into(), "tactic".into()],
            lease_ms: 30_000,
            limits: Limits {
                max_sequences: 4096,
                max_regions: 64,
                max_mapped_bytes: 1 << 34,
                max_queued_requests: 256,
                max_step_tokens: 65_536,
            },
            region_kinds: vec!["shm".into(), "memfd".into()],
            fd_socket: Some("/run/tacflow/tacflowd.fd.sock".into()),
            attention_pool: Some(AttentionPoolInfo {
                block_size: 16,
                total_bytes: 1 << 30,
                used_bytes: 0,
                blocks: 0,
                sequences: 0,
                steps_by_layer: vec![],
                attention: Default::default(),
            }),
        },
    );
    let session = SessionRequest {
        request_id: 2,
        session: t,
    };
    for (name, kind) in [
        ("ping_request", Kind::Ping),
        ("close_request", Kind::Close),
        ("stats_request", Kind::Stats),
        ("health_request", Kind::Health),
    ] {
        let (d, f) = req(kind);
        check(name, d, f, kind.name(), &session);
    }
    check(
        "ping_reply",
        "reply",
        Kind::Ping.reply_byte(),
        "ping",
        &PingReply {
            request_id: 2,
            lease_ms: 30_000,
        },
    );
    let (d, f) = req(Kind::RegisterRegion);
    check(
        "register_region_shm_request",
        d,
        f,
        "register_region",
        &RegisterRegionRequest {
            request_id: 3,
            session: t,
            region: RegionDesc::Shm {
                name: "psm_0a1b2c".into(),
                byte_size: 1 << 20,
            },
        },
    );
    check(
        "register_region_memfd_request",
        d,
        f,
        "register_region",
        &RegisterRegionRequest {
            request_id: 12,
            session: t,
            region: RegionDesc::Memfd {
                fd_token: 0x8000_0000_0000_0001,
                byte_size: 1 << 20,
            },
        },
    );
    check(
        "register_region_cuda_request",
        d,
        f,
        "register_region",
        &RegisterRegionRequest {
            request_id: 4,
            session: t,
            region: RegionDesc::Cuda {
                ipc_handle: (0u8..64).collect(),
                device_uuid: "GPU-00000000-1111-2222-3333-444444444444".into(),
                byte_size: 4096,
                offset: 0,
                event_handle: None,
            },
        },
    );
    check(
        "register_region_reply",
        "reply",
        Kind::RegisterRegion.reply_byte(),
        "register_region",
        &RegisterRegionReply {
            request_id: 3,
            region_id: 1,
            byte_size: 1 << 20,
            event_handle: None,
        },
    );
    let (d, f) = req(Kind::OpenSequence);
    check(
        "open_sequence_tactic_request",
        d,
        f,
        "open_sequence",
        &OpenSequenceRequest {
            request_id: 5,
            session: t,
            seq_id: 42,
            attention: AttentionPolicy::Tactic {
                p: 0.875,
                cluster_size: Some(16),
                recluster_limit: None,
            },
            sampling: SamplingParams {
                temperature: 0.5,
                top_p: 0.75,
                top_k: 40,
                seed: Some(7),
                logprobs: 3,
                ..SamplingParams::default()
            },
            diagnostics: true,
            blocks: BlockMode::Daemon,
            prefix: vec![],
            prompt_len: None,
            layout: None,
        },
    );
    check(
        "open_sequence_full_request",
        d,
        f,
        "open_sequence",
        &OpenSequenceRequest {
            request_id: 6,
            session: t,
            seq_id: u64::MAX,
            attention: AttentionPolicy::Full,
            sampling: SamplingParams {
                seed: Some(0),
                ..SamplingParams::default()
            },
            diagnostics: false,
            blocks: BlockMode::Daemon,
            prefix: vec![],
            prompt_len: None,
            layout: None,
        },
    );
    check(
        "open_sequence_named_request",
        d,
        f,
        "open_sequence",
        &OpenSequenceRequest {
            request_id: 12,
            session: t,
            seq_id: 50,
            attention: AttentionPolicy::Full,
            sampling: SamplingParams {
                temperature: 0.75,
                seed: None,
                min_p: 0.125,
                presence_penalty: 0.5,
                frequency_penalty: -0.25,
                repetition_penalty: 1.25,
                logit_bias: vec![(3, -100.0), (70_000, 2.5)],
                prompt_logprobs: Some(2),
                ..SamplingParams::default()
            },
            diagnostics: false,
            blocks: BlockMode::Named,
            prefix: vec![1, 2, 3],
            prompt_len: Some(5),
            layout: None,
        },
    );
    named_block_vectors(t);
    offload_vectors(t);
    let (d, f) = req(Kind::ForkSequence);
    check(
        "fork_sequence_request",
        d,
        f,
        "fork_sequence",
        &ForkSequenceRequest {
            request_id: 7,
            session: t,
            parent: 42,
            child: 43,
            sampling: None,
            attention: None,
            diagnostics: None,
        },
    );
    check(
        "fork_sequence_ab_request",
        d,
        f,
        "fork_sequence",
        &ForkSequenceRequest {
            request_id: 11,
            session: t,
            parent: 42,
            child: 44,
            sampling: Some(SamplingParams {
                seed: Some(9),
                ..SamplingParams::default()
            }),
            attention: Some(AttentionPolicy::OracleTopP { p: 0.9375 }),
            diagnostics: Some(true),
        },
    );
    let (d, f) = req(Kind::TruncateSequence);
    check(
        "truncate_sequence_request",
        d,
        f,
        "truncate_sequence",
        &TruncateSequenceRequest {
            request_id: 8,
            session: t,
            seq_id: 42,
            num_tokens: 3,
        },
    );
    check(
        "sequence_reply",
        "reply",
        Kind::TruncateSequence.reply_byte(),
        "truncate_sequence",
        &SequenceReply {
            request_id: 8,
            seq_id: 42,
            num_tokens: 17,
        },
    );
    let (d, f) = req(Kind::Step);
    check(
        "step_request",
        d,
        f,
        "step",
        &StepRequest {
            request_id: 9,
            session: t,
            entries: vec![
                StepEntry {
                    seq_id: 42,
                    tokens: vec![1, 300, 70_000],
                    positions: None,
                    sample: false,
                    logits: Some(TensorRef {
                        region_id: 1,
                        offset: 256,
                        dtype: DType::Bf16,
                        shape: vec![3, 512],
                        strides: None,
                    }),
                    blocks: None,
                },
                StepEntry {
                    seq_id: 43,
                    tokens: vec![5],
                    positions: Some(vec![17]),
                    sample: true,
                    logits: None,
                    blocks: None,
                },
            ],
        },
    );
    check(
        "step_empty_request",
        d,
        f,
        "step",
        &StepRequest {
            request_id: 10,
            session: t,
            entries: vec![],
        },
    );
    check(
        "step_reply",
        "reply",
        Kind::Step.reply_byte(),
        "step",
        &StepReply {
            request_id: 9,
            results: vec![
                StepResult {
                    seq_id: 42,
                    num_tokens: 3,
                    token: None,
                    logprob: None,
                    top_logprobs: vec![],
                    rank: None,
                    attention: None,
                    prompt_logprobs: vec![],
                    prompt_ranks: vec![],
                },
                StepResult {
                    seq_id: 43,
                    num_tokens: 18,
                    token: Some(77),
                    logprob: Some(-0.5),
                    top_logprobs: vec![(77, -0.5), (12, -1.25)],
                    rank: None,
                    attention: Some(AttentionDiagnostics {
                        policy: "tactic".into(),
                        tokens_read_fraction: 0.125,
                        selected_fraction: 0.0625,
                        true_mass: 0.9375,
                        estimated_mass: 0.90625,
                        min_true_mass: 0.75,
                        success_rate: 0.96875,
                    }),
                    prompt_logprobs: vec![],
                    prompt_ranks: vec![],
                },
            ],
            timing: StepTiming {
                queued_us: 12,
                run_us: 3456,
            },
        },
    );
    check(
        "error_reply",
        "reply",
        ERROR_KIND,
        "error",
        &ErrorReply::new(
            ErrorCode::OutOfKvBlocks,
            "step needs 9 KV blocks, 4 are free",
        )
        .with("needed", 9u64)
        .with("free", 4u64)
        .with("entry", 0u64)
        .for_request(9),
    );
    check(
        "error_reply_unreadable",
        "reply",
        ERROR_KIND,
        "error",
        &ErrorReply::bad_request("a request is [kind, header]; got 1 frame(s)"),
    );
    let fatal = ErrorReply::fatal(
        "executor_panic",
        "the daemon is going down: the executor panicked: index out of bounds",
    )
    .for_request(11);
    assert!(fatal.is_fatal());
    check("error_reply_fatal", "reply", ERROR_KIND, "error", &fatal);
    health_vectors();
}

/// `health` as a 1.2 daemon sends it when failing, and as a 1.1 daemon sent
/// it (without the 1.2 fields, which then decode as absent).
fn health_vectors() {
    let backend = BackendInfo {
        kind: "cpu".into(),
        device: "2 threads".into(),
    };
    check(
        "health_reply",
        "reply",
        Kind::Health.reply_byte(),
        "health",
        &HealthReply {
            request_id: 2,
            status: "failing".into(),
            instance_id: "00112233445566778899aabbccddeeff".into(),
            backend: backend.clone(),
            executor_idle_ms: 17,
            executor: Some("dead".into()),
            device: Some("failed".into()),
            reason: Some("device failed: an illegal memory access was encountered".into()),
        },
    );
    check(
        "health_reply_1_1",
        "reply",
        Kind::Health.reply_byte(),
        "health",
        &HealthReply {
            request_id: 2,
            status: "ok".into(),
            instance_id: "00112233445566778899aabbccddeeff".into(),
            backend,
            executor_idle_ms: 5,
            executor: None,
            device: None,
            reason: None,
        },
    );
}

#[test]
fn only_a_marked_internal_error_is_fatal() {
    assert!(!ErrorReply::internal("a bug, this request only").is_fatal());
    let marked = ErrorReply::new(ErrorCode::BadRequest, "x").with("fatal", 1u64);
    assert!(!marked.is_fatal(), "only `internal` can be fatal");
    assert!(ErrorReply::fatal("thread_panic", "going down").is_fatal());
}

#[test]
fn every_error_code_round_trips_as_a_string() {
    for code in ErrorCode::ALL {
        let bytes = to_msgpack(&code);
        let back: ErrorCode = from_msgpack(&bytes).unwrap();
        assert_eq!(back, code);
    }
    let unknown: ErrorCode = from_msgpack(&to_msgpack(&"from_the_future")).unwrap();
    assert_eq!(unknown, ErrorCode::Unknown);
}

/// The messages 1.3 added: reservations, named-block steps, the
/// sequence-state query, prompt log-probabilities and `unknown_block`.
/// (1.4) Attention offload: an attention-only open, one layer's request
/// and reply, a CUDA region with the client's event and the daemon's.
fn offload_vectors(t: SessionToken) {
    let (d, f) = req(Kind::OpenSequence);
    check(
        "open_sequence_attention_only_request",
        d,
        f,
        "open_sequence",
        &OpenSequenceRequest {
            request_id: 30,
            session: t,
            seq_id: 60,
            attention: AttentionPolicy::Tactic {
                p: 0.9,
                cluster_size: None,
                recluster_limit: None,
            },
            sampling: SamplingParams::default(),
            diagnostics: true,
            blocks: BlockMode::Daemon,
            prefix: vec![],
            prompt_len: None,
            layout: Some(AttentionLayout {
                num_layers: 30,
                num_heads: 9,
                num_kv_heads: 3,
                head_dim: 64,
                scale: 0.125,
                softcap: None,
                sliding_window: None,
                sinks: false,
            }),
        },
    );
    let tensor = |offset: u64, heads: u64, dtype: DType| TensorRef {
        region_id: 2,
        offset,
        dtype,
        shape: vec![5, heads, 64],
        strides: None,
    };
    let (d, f) = req(Kind::AttentionStep);
    check(
        "attention_step_request",
        d,
        f,
        "attention_step",
        &AttentionStepRequest {
            request_id: 31,
            session: t,
            layer: 7,
            seq_ids: vec![60, 61],
            num_tokens: vec![4, 1],
            positions: vec![0, 17],
            q: tensor(0, 9, DType::Bf16),
            k: tensor(5760, 3, DType::Bf16),
            v: tensor(7680, 3, DType::Bf16),
            out: TensorRef {
                strides: Some(vec![1152, 64, 1]),
                ..tensor(9600, 9, DType::F32)
            },
        },
    );
    check(
        "attention_step_reply",
        "reply",
        Kind::AttentionStep.reply_byte(),
        "attention_step",
        &AttentionStepReply {
            request_id: 31,
            layer: 7,
            num_tokens: vec![4, 18],
            attention: vec![
                None,
                Some(AttentionDiagnostics {
                    policy: "tactic".into(),
                    tokens_read_fraction: 0.25,
                    selected_fraction: 0.125,
                    true_mass: 0.9375,
                    estimated_mass: 0.90625,
                    min_true_mass: 0.875,
                    success_rate: 1.0,
                }),
            ],
            timing: StepTiming {
                queued_us: 9,
                run_us: 640,
            },
        },
    );
    let (d, f) = req(Kind::RegisterRegion);
    check(
        "register_region_cuda_event_request",
        d,
        f,
        "register_region",
        &RegisterRegionRequest {
            request_id: 32,
            session: t,
            region: RegionDesc::Cuda {
                ipc_handle: (0u8..64).collect(),
                device_uuid: "GPU-00000000-1111-2222-3333-444444444444".into(),
                byte_size: 1 << 20,
                offset: 4096,
                event_handle: Some((64u8..128).collect()),
            },
        },
    );
    check(
        "register_region_cuda_reply",
        "reply",
        Kind::RegisterRegion.reply_byte(),
        "register_region",
        &RegisterRegionReply {
            request_id: 32,
            region_id: 3,
            byte_size: 1 << 20,
            event_handle: Some((128u8..192).collect()),
        },
    );
}

fn named_block_vectors(t: SessionToken) {
    let (d, f) = req(Kind::ReserveBlocks);
    check(
        "reserve_blocks_request",
        d,
        f,
        "reserve_blocks",
        &ReserveBlocksRequest {
            request_id: 20,
            session: t,
            count: 64,
        },
    );
    check(
        "reserve_blocks_reply",
        "reply",
        Kind::ReserveBlocks.reply_byte(),
        "reserve_blocks",
        &ReserveBlocksReply {
            request_id: 20,
            blocks: 64,
            block_size: 16,
        },
    );
    let (d, f) = req(Kind::SequenceState);
    check(
        "sequence_state_request",
        d,
        f,
        "sequence_state",
        &SequenceStateRequest {
            request_id: 21,
            session: t,
            seq_id: 50,
        },
    );
    check(
        "sequence_state_reply",
        "reply",
        Kind::SequenceState.reply_byte(),
        "sequence_state",
        &SequenceStateReply {
            request_id: 21,
            seq_id: 50,
            num_tokens: 19,
            prompt_len: Some(5),
            mode: BlockMode::Named,
            attention: AttentionPolicy::Full,
            sampling: SamplingParams {
                temperature: 0.75,
                seed: Some(0x1234_5678_9abc_def0),
                repetition_penalty: 1.25,
                ..SamplingParams::default()
            },
            diagnostics: false,
            num_blocks: 2,
            block_ids: vec![7, 3],
        },
    );
    let (d, f) = req(Kind::Step);
    check(
        "step_named_request",
        d,
        f,
        "step",
        &StepRequest {
            request_id: 22,
            session: t,
            entries: vec![StepEntry {
                seq_id: 50,
                tokens: vec![4, 5],
                positions: None,
                sample: true,
                logits: None,
                blocks: Some(vec![7, 3, 9]),
            }],
        },
    );
    check(
        "step_rank_reply",
        "reply",
        Kind::Step.reply_byte(),
        "step",
        &StepReply {
            request_id: 23,
            results: vec![StepResult {
                seq_id: 51,
                num_tokens: 4,
                token: Some(8),
                logprob: Some(-2.5),
                top_logprobs: vec![(3, -0.5)],
                rank: Some(70),
                attention: None,
                prompt_logprobs: vec![None, Some((-1.5, vec![(9, -0.5)]))],
                prompt_ranks: vec![None, Some(2)],
            }],
            timing: StepTiming {
                queued_us: 1,
                run_us: 2,
            },
        },
    );
    check(
        "step_prompt_logprobs_reply",
        "reply",
        Kind::Step.reply_byte(),
        "step",
        &StepReply {
            request_id: 22,
            results: vec![StepResult {
                seq_id: 50,
                num_tokens: 5,
                token: Some(6),
                logprob: Some(-0.25),
                top_logprobs: vec![],
                rank: None,
                attention: None,
                prompt_logprobs: vec![None, Some((-1.5, vec![(9, -0.5), (5, -1.5)]))],
                prompt_ranks: vec![],
            }],
            timing: StepTiming {
                queued_us: 1,
                run_us: 2,
            },
        },
    );
    check(
        "error_reply_unknown_block",
        "reply",
        ERROR_KIND,
        "error",
        &ErrorReply::new(
            ErrorCode::UnknownBlock,
            "entry 0: block 64 is outside the session's reservation of 64",
        )
        .with("entry", 0u64)
        .with("block", 64u64)
        .with("reserved", 64u64)
        .for_request(22),
    );
}
