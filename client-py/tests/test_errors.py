"""Error codes -> exception classes, and the daemon-restart rule."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tacflow import errors
from tacflow.errors import (
    ERROR_CLASSES,
    DaemonRestarted,
    DaemonUnavailable,
    RequestTimeout,
    TacflowError,
    UnknownSession,
    error_from_reply,
)

PROTOCOL_MD = Path(__file__).resolve().parents[2] / "ipc" / "PROTOCOL.md"


def protocol_codes() -> list[str]:
    """The codes of the table in PROTOCOL.md §5, read from the document itself."""
    text = PROTOCOL_MD.read_text()
    section = text.split("## 5. Errors", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.M)


EXPECTED = {
    "bad_request": errors.BadRequest,
    "unsupported_version": errors.UnsupportedVersion,
    "unknown_session": errors.UnknownSession,
    "unknown_sequence": errors.UnknownSequence,
    "sequence_exists": errors.SequenceExists,
    "unknown_region": errors.UnknownRegion,
    "out_of_bounds": errors.OutOfBounds,
    "shape_mismatch": errors.ShapeMismatch,
    "dtype_mismatch": errors.DtypeMismatch,
    "out_of_kv_blocks": errors.OutOfKvBlocks,
    "context_too_long": errors.ContextTooLong,
    "limit_exceeded": errors.LimitExceeded,
    "permission_denied": errors.PermissionDenied,
    "busy": errors.Busy,
    "shutting_down": errors.ShuttingDown,
    "unsupported": errors.Unsupported,
    "internal": errors.Internal,
    "unknown_block": errors.UnknownBlock,
}


def test_every_protocol_code_has_its_class() -> None:
    codes = protocol_codes()
    assert len(codes) == 18, codes
    assert set(codes) == set(ERROR_CLASSES) == set(EXPECTED)


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_code_maps_to_class(code: str) -> None:
    body = {"request_id": 3, "code": code, "message": "m", "detail": {"n": 1, "x": 0.5, "s": "t"}}
    err = error_from_reply(body, instance_id="abc")
    assert type(err) is EXPECTED[code]
    assert isinstance(err, TacflowError)
    assert (err.code, err.message, err.request_id) == (code, "m", 3)
    assert err.detail == {"n": 1, "x": 0.5, "s": "t"}
    assert code in str(err) and "n=1" in str(err)


def test_unknown_code_is_the_base_class() -> None:
    err = error_from_reply({"request_id": 1, "code": "quota_exhausted", "message": "later"})
    assert type(err) is TacflowError
    assert err.code == "quota_exhausted" and err.detail == {}


def test_missing_code_is_a_protocol_error() -> None:
    assert type(error_from_reply({"message": "?"})) is errors.ProtocolError


def unknown_session(instance: str | None) -> dict:
    detail = {} if instance is None else {"instance_id": instance}
    return {"request_id": 4, "code": "unknown_session", "message": "no such session", "detail": detail}


def test_other_instance_means_restart() -> None:
    err = error_from_reply(unknown_session("new"), instance_id="old")
    assert type(err) is DaemonRestarted
    assert isinstance(err, UnknownSession)
    assert "restarted" in err.message and "gone" in err.message
    assert err.detail["instance_id"] == "new" and err.request_id == 4


def test_same_instance_is_a_plain_unknown_session() -> None:
    # The same daemon forgot the session: lease expired or closed.
    assert type(error_from_reply(unknown_session("old"), instance_id="old")) is UnknownSession


def test_no_instance_to_compare_is_a_plain_unknown_session() -> None:
    assert type(error_from_reply(unknown_session(None), instance_id="old")) is UnknownSession
    assert type(error_from_reply(unknown_session("new"), instance_id=None)) is UnknownSession


def test_client_side_errors_are_builtin_kinds_too() -> None:
    t = RequestTimeout("timeout", "no reply")
    assert isinstance(t, TimeoutError) and isinstance(t, TacflowError)
    u = DaemonUnavailable("unavailable", "nobody home")
    assert isinstance(u, ConnectionError) and isinstance(u, TacflowError)
    assert str(u) == "unavailable: nobody home"
    with pytest.raises(TimeoutError):
        raise t
