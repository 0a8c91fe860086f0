"""The shared vectors of ``ipc/vectors/``: both sides must agree byte for byte."""

from __future__ import annotations

from typing import Any, Callable

import msgpack
import pytest

from tacflow import errors
from tacflow.protocol import (
    ERROR_KIND,
    AttentionLayout,
    attention_step_body,
    REPLY_BIT,
    CudaRegion,
    Full,
    Kind,
    MemfdRegion,
    SamplingParams,
    ShmRegion,
    StepEntry,
    OracleTopP,
    Tactic,
    TensorRef,
    close_sequence_body,
    decode_reply,
    fork_sequence_body,
    hello_body,
    open_sequence_body,
    reserve_blocks_body,
    sequence_state_body,
    pack,
    register_region_body,
    session_body,
    step_body,
    truncate_sequence_body,
)
from tacflow.results import AttentionStepOutput, Health, HelloInfo, SequenceState, StepOutput

from .vectors import VECTOR_DIR, Vector, encode_exact, load_vectors, plain

VECTORS = load_vectors()
REQUESTS = [v for v in VECTORS if v.direction == "request"]
REPLIES = [v for v in VECTORS if v.direction == "reply"]
SESSION = bytes.fromhex("0123456789abcdeffedcba9876543210")


def ids(vs: list[Vector]) -> list[str]:
    return [v.name for v in vs]


def test_vectors_are_there() -> None:
    assert VECTOR_DIR.is_dir(), VECTOR_DIR
    assert len(REQUESTS) >= 10 and len(REPLIES) >= 5


def ordered(v: Any) -> Any:
    """A form where dict key order matters to ==."""
    if isinstance(v, dict):
        return [(k, ordered(x)) for k, x in v.items()]
    if isinstance(v, list):
        return [ordered(x) for x in v]
    return v


@pytest.mark.parametrize("vec", VECTORS, ids=ids(VECTORS))
def test_decodes_to_its_json(vec: Vector) -> None:
    decoded = msgpack.unpackb(vec.raw, raw=False)
    assert ordered(decoded) == ordered(plain(vec.body))


@pytest.mark.parametrize("vec", VECTORS, ids=ids(VECTORS))
def test_json_encodes_to_its_bytes(vec: Vector) -> None:
    # Checks float widths and integer forms too, which decoding cannot see.
    assert encode_exact(vec.body) == vec.raw


@pytest.mark.parametrize("vec", VECTORS, ids=ids(VECTORS))
def test_frame_byte_matches_kind(vec: Vector) -> None:
    if vec.kind == "error":
        assert vec.frame == ERROR_KIND
        return
    kind = Kind[vec.kind.upper()]
    assert vec.frame == (kind | REPLY_BIT if vec.direction == "reply" else kind)


# Each request vector rebuilt from the arguments a caller would pass.
BUILDERS: dict[str, Callable[[], dict[str, Any]]] = {
    "hello_request": lambda: hello_body(1, client="tacflow-py/0.1.0"),
    "ping_request": lambda: session_body(2, SESSION),
    "close_request": lambda: session_body(2, SESSION),
    "stats_request": lambda: session_body(2, SESSION),
    "health_request": lambda: session_body(2, SESSION),
    "register_region_shm_request": lambda: register_region_body(
        3, SESSION, ShmRegion("psm_0a1b2c", 1 << 20)
    ),
    "register_region_memfd_request": lambda: register_region_body(
        12, SESSION, MemfdRegion(0x8000_0000_0000_0001, 1 << 20)
    ),
    "register_region_cuda_request": lambda: register_region_body(
        4,
        SESSION,
        CudaRegion(bytes(range(64)), "GPU-00000000-1111-2222-3333-444444444444", 4096),
    ),
    "open_sequence_tactic_request": lambda: open_sequence_body(
        5,
        SESSION,
        42,
        Tactic(0.875, cluster_size=16),
        SamplingParams(temperature=0.5, top_p=0.75, top_k=40, seed=7, logprobs=3),
        diagnostics=True,
    ),
    "open_sequence_full_request": lambda: open_sequence_body(6, SESSION, 2**64 - 1, Full()),
    "fork_sequence_request": lambda: fork_sequence_body(7, SESSION, 42, 43),
    "fork_sequence_ab_request": lambda: fork_sequence_body(
        11, SESSION, 42, 44, SamplingParams(seed=9), OracleTopP(0.9375), True
    ),
    "truncate_sequence_request": lambda: truncate_sequence_body(8, SESSION, 42, 3),
    "step_request": lambda: step_body(
        9,
        SESSION,
        [
            StepEntry(42, [1, 300, 70000], sample=False, logits=TensorRef(1, 256, "bf16", (3, 512))),
            StepEntry(43, [5], positions=[17]),
        ],
    ),
    "step_empty_request": lambda: step_body(10, SESSION, []),
    "open_sequence_named_request": lambda: open_sequence_body(
        12,
        SESSION,
        50,
        Full(),
        SamplingParams(
            temperature=0.75,
            min_p=0.125,
            presence_penalty=0.5,
            frequency_penalty=-0.25,
            repetition_penalty=1.25,
            logit_bias={3: -100.0, 70000: 2.5},
            prompt_logprobs=2,
        ),
        blocks="named",
        prefix=[1, 2, 3],
        prompt_len=5,
    ),
    "reserve_blocks_request": lambda: reserve_blocks_body(20, SESSION, 64),
    "sequence_state_request": lambda: sequence_state_body(21, SESSION, 50),
    "step_named_request": lambda: step_body(22, SESSION, [StepEntry(50, [4, 5], blocks=[7, 3, 9])]),
    "open_sequence_attention_only_request": lambda: open_sequence_body(
        30, SESSION, 60, Tactic(0.9), SamplingParams(), diagnostics=True,
        layout=AttentionLayout(30, 9, 3, 64, 0.125),
    ),
    "attention_step_request": lambda: attention_step_body(
        31,
        SESSION,
        7,
        [60, 61],
        TensorRef(2, 0, "bf16", (5, 9, 64)),
        TensorRef(2, 5760, "bf16", (5, 3, 64)),
        TensorRef(2, 7680, "bf16", (5, 3, 64)),
        TensorRef(2, 9600, "f32", (5, 9, 64), (1152, 64, 1)),
        num_tokens=[4, 1],
        positions=[0, 17],
    ),
    "register_region_cuda_event_request": lambda: register_region_body(
        32,
        SESSION,
        CudaRegion(
            bytes(range(64)),
            "GPU-00000000-1111-2222-3333-444444444444",
            1 << 20,
            offset=4096,
            event_handle=bytes(range(64, 128)),
        ),
    ),
}


@pytest.mark.parametrize("vec", REQUESTS, ids=ids(REQUESTS))
def test_builder_packs_to_the_vector(vec: Vector) -> None:
    assert vec.name in BUILDERS, f"no builder case for new vector {vec.name}"
    assert pack(BUILDERS[vec.name]()) == vec.raw


def test_open_sequence_defaults_match_full_vector() -> None:
    # No attention and no sampling given: the same bytes as the explicit vector.
    raw = (VECTOR_DIR / "open_sequence_full_request.msgpack").read_bytes()
    assert pack(open_sequence_body(6, SESSION, 2**64 - 1)) == raw


def test_close_sequence_body_order() -> None:
    body = close_sequence_body(1, SESSION, 9)
    assert list(body) == ["request_id", "session", "seq_id"]


# ---------------------------------------------------------------- replies


def reply_frames(name: str) -> list[bytes]:
    vec = next(v for v in REPLIES if v.name == name)
    return [bytes([vec.frame]), vec.raw]


def test_hello_reply() -> None:
    kind, body = decode_reply(reply_frames("hello_reply"))
    assert kind == Kind.HELLO
    info = HelloInfo.from_wire(body)
    assert info.session == SESSION
    assert info.instance_id == "00112233445566778899aabbccddeeff"
    assert info.protocol == (1, 4)
    assert info.attention_pool is not None and info.attention_pool.total_bytes == 1 << 30
    assert info.region_kinds == ("shm", "memfd")
    assert info.fd_socket == "/run/tacflow/tacflowd.fd.sock"
    assert info.model.name == "tiny" and info.model.vocab_size == 512
    assert info.model.bos_token_id == 1 and info.model.eos_token_ids == (2,)
    assert info.backend.kind == "cpu"
    assert (info.kv.block_size, info.kv.total_blocks, info.kv.free_blocks) == (16, 1024, 1000)
    assert info.attention_policies == ("full", "tactic")
    assert info.lease_ms == 30000
    assert info.limits.max_mapped_bytes == 17179869184
    assert info.limits.max_step_tokens == 65536


def test_ping_register_and_sequence_replies() -> None:
    assert decode_reply(reply_frames("ping_reply")) == (Kind.PING, {"request_id": 2, "lease_ms": 30000})
    kind, body = decode_reply(reply_frames("register_region_reply"))
    assert kind == Kind.REGISTER_REGION and body["region_id"] == 1 and body["byte_size"] == 1 << 20
    kind, body = decode_reply(reply_frames("sequence_reply"))
    assert kind == Kind.TRUNCATE_SEQUENCE and body["num_tokens"] == 17


def test_step_reply() -> None:
    kind, body = decode_reply(reply_frames("step_reply"))
    assert kind == Kind.STEP
    out = StepOutput.from_wire(body)
    first, second = out.results
    assert (first.seq_id, first.num_tokens, first.token, first.attention) == (42, 3, None, None)
    assert first.top_logprobs == ()
    assert (second.seq_id, second.num_tokens, second.token, second.logprob) == (43, 18, 77, -0.5)
    assert second.top_logprobs == ((77, -0.5), (12, -1.25))
    att = second.attention
    assert att is not None and att.policy == "tactic"
    assert (att.tokens_read_fraction, att.selected_fraction) == (0.125, 0.0625)
    assert (att.true_mass, att.estimated_mass, att.min_true_mass, att.success_rate) == (
        0.9375, 0.90625, 0.75, 0.96875,
    )
    assert (out.timing.queued_us, out.timing.run_us) == (12, 3456)


def test_error_reply_raises_its_class() -> None:
    with pytest.raises(errors.OutOfKvBlocks) as info:
        decode_reply(reply_frames("error_reply"))
    err = info.value
    assert err.code == "out_of_kv_blocks" and err.request_id == 9
    assert err.detail == {"entry": 0, "free": 4, "needed": 9}
    assert "9 KV blocks" in err.message


def test_unreadable_error_reply_has_no_request_id() -> None:
    with pytest.raises(errors.BadRequest) as info:
        decode_reply(reply_frames("error_reply_unreadable"))
    assert info.value.request_id is None and info.value.detail == {}


def test_fatal_internal_raises_daemon_failing() -> None:
    with pytest.raises(errors.DaemonFailing) as info:
        decode_reply(reply_frames("error_reply_fatal"))
    err = info.value
    assert isinstance(err, errors.Internal), "code that handles Internal still catches it"
    assert err.code == "internal" and err.request_id == 11
    assert err.reason == "executor_panic" and err.detail["fatal"] == 1
    assert "going down" in err.message


def test_plain_internal_is_not_fatal() -> None:
    err = errors.error_from_reply({"request_id": 1, "code": "internal", "message": "x"})
    assert type(err) is errors.Internal


def test_health_reply_of_a_failing_daemon() -> None:
    kind, body = decode_reply(reply_frames("health_reply"))
    assert kind == Kind.HEALTH
    h = Health.from_wire(body)
    assert (h.status, h.executor, h.device) == ("failing", "dead", "failed")
    assert h.reason is not None and "illegal memory access" in h.reason
    assert not h.ok and h.executor_idle_ms == 17


def test_health_reply_of_a_1_1_daemon() -> None:
    kind, body = decode_reply(reply_frames("health_reply_1_1"))
    h = Health.from_wire(body)
    assert h.ok and h.backend.kind == "cpu"
    assert (h.executor, h.device, h.reason) == (None, None, None)


def test_1_3_replies() -> None:
    from tacflow.errors import UnknownBlock

    kind, body = decode_reply(reply_frames("sequence_state_reply"))
    assert kind == Kind.SEQUENCE_STATE
    state = SequenceState.from_wire(body)
    assert (state.num_tokens, state.mode, state.block_ids) == (19, "named", (7, 3))
    assert state.sampling["seed"] == 0x1234_5678_9ABC_DEF0
    kind, body = decode_reply(reply_frames("step_prompt_logprobs_reply"))
    out = StepOutput.from_wire(body)
    assert out.results[0].prompt_logprobs == (None, (-1.5, ((9, -0.5), (5, -1.5))))
    kind, body = decode_reply(reply_frames("reserve_blocks_reply"))
    assert kind == Kind.RESERVE_BLOCKS and body["blocks"] == 64
    with pytest.raises(UnknownBlock) as err:
        decode_reply(reply_frames("error_reply_unknown_block"))
    assert err.value.detail["block"] == 64


def test_1_4_replies() -> None:
    kind, body = decode_reply(reply_frames("step_rank_reply"))
    res = StepOutput.from_wire(body).results[0]
    assert (res.token, res.rank, res.prompt_ranks) == (8, 70, (None, 2))
    kind, body = decode_reply(reply_frames("step_prompt_logprobs_reply"))
    res = StepOutput.from_wire(body).results[0]
    assert (res.rank, res.prompt_ranks) == (None, ()), "a 1.3 reply has no ranks"
    kind, body = decode_reply(reply_frames("attention_step_reply"))
    assert kind == Kind.ATTENTION_STEP
    out = AttentionStepOutput.from_wire(body)
    assert (out.layer, out.num_tokens) == (7, [4, 18])
    assert out.attention[0] is None
    att = out.attention[1]
    assert att is not None and att.policy == "tactic" and att.tokens_read_fraction == 0.25
    assert (out.timing.queued_us, out.timing.run_us) == (9, 640)
    kind, body = decode_reply(reply_frames("register_region_cuda_reply"))
    assert kind == Kind.REGISTER_REGION and body["event_handle"] == bytes(range(128, 192))
