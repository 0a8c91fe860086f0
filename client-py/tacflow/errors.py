"""Exceptions of the tacflow client.

Every failure the daemon reports is an error reply ``{code, message, detail}``
(PROTOCOL.md §5). Each wire code gets its own exception class so that callers
can write ``except OutOfKvBlocks`` instead of comparing strings; a code this
client does not know (sent by a newer daemon, as §6 allows) becomes the base
class :class:`TacflowError`, which is what "treat it as a generic error" means
in Python.

Three exceptions are the client's own, not wire codes: :class:`RequestTimeout`
(no reply in time), :class:`DaemonUnavailable` (nothing to connect to) and
:class:`ProtocolError` (a reply that does not follow the protocol). The first
two also derive from the built-in ``TimeoutError`` / ``ConnectionError`` so
that generic retry code that knows nothing of tacflow still recognises them.
"""

from __future__ import annotations

from typing import Any, Mapping

__all__ = [
    "TacflowError", "BadRequest", "UnsupportedVersion", "UnknownSession",
    "UnknownSequence", "SequenceExists", "UnknownRegion", "OutOfBounds",
    "ShapeMismatch", "DtypeMismatch", "OutOfKvBlocks", "ContextTooLong",
    "LimitExceeded", "PermissionDenied", "Busy", "ShuttingDown", "Unsupported",
    "Internal", "UnknownBlock", "DaemonFailing", "DaemonRestarted", "RequestTimeout",
    "DaemonUnavailable",
    "ProtocolError", "ERROR_CLASSES", "error_from_reply",
]


class TacflowError(Exception):
    """A failure reported by the daemon, or by the client on its behalf.

    ``code`` is the wire code (``"out_of_kv_blocks"``, ...), ``detail`` the
    reply's small ``{str: int|float|str}`` map, ``request_id`` the id of the
    request it answers (``None`` when the daemon could not read the request).
    """

    #: The wire code this class stands for; ``None`` on the base class.
    code_name: str | None = None

    def __init__(
        self,
        code: str,
        message: str,
        detail: Mapping[str, Any] | None = None,
        request_id: int | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail: dict[str, Any] = dict(detail or {})
        self.request_id = request_id

    def __str__(self) -> str:
        text = f"{self.code}: {self.message}"
        if self.detail:
            pairs = ", ".join(f"{k}={v!r}" for k, v in self.detail.items())
            text += f" ({pairs})"
        return text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(code={self.code!r}, message={self.message!r}, "
            f"detail={self.detail!r}, request_id={self.request_id!r})"
        )


# One class per code of PROTOCOL.md §5, in the table's order.


class BadRequest(TacflowError):
    """Malformed frames or msgpack, unknown kind, or invalid field values."""

    code_name = "bad_request"


class UnsupportedVersion(TacflowError):
    """The daemon speaks another protocol major (``detail.daemon_major``)."""

    code_name = "unsupported_version"


class UnknownSession(TacflowError):
    """The session token is not live: closed, lease expired, or another daemon."""

    code_name = "unknown_session"


class UnknownSequence(TacflowError):
    code_name = "unknown_sequence"


class SequenceExists(TacflowError):
    code_name = "sequence_exists"


class UnknownRegion(TacflowError):
    code_name = "unknown_region"


class OutOfBounds(TacflowError):
    code_name = "out_of_bounds"


class ShapeMismatch(TacflowError):
    code_name = "shape_mismatch"


class DtypeMismatch(TacflowError):
    code_name = "dtype_mismatch"


class OutOfKvBlocks(TacflowError):
    """The step needs more KV blocks than are free; the step changed nothing.

    ``detail.needed`` and ``detail.free`` say by how much. A scheduler reacts
    by preempting a sequence and retrying (see :mod:`tacflow.engine`).
    """

    code_name = "out_of_kv_blocks"


class ContextTooLong(TacflowError):
    code_name = "context_too_long"


class LimitExceeded(TacflowError):
    code_name = "limit_exceeded"


class PermissionDenied(TacflowError):
    code_name = "permission_denied"


class Busy(TacflowError):
    """The executor's queue is full: retry later."""

    code_name = "busy"


class ShuttingDown(TacflowError):
    code_name = "shutting_down"


class Unsupported(TacflowError):
    code_name = "unsupported"


class UnknownBlock(TacflowError):
    """(1.3) A step named a KV block id outside the session's reservation
    (``detail.block``, ``detail.reserved``); the step changed nothing."""

    code_name = "unknown_block"


class Internal(TacflowError):
    """A failure inside the daemon. Per request by default: the daemon keeps
    serving and other requests are fine. When the daemon is going down the
    class raised is its subclass :class:`DaemonFailing`."""

    code_name = "internal"


class DaemonFailing(Internal):
    """The daemon hit a fatal fault and is going down (protocol 1.2: an
    ``internal`` error with ``detail.fatal``).

    ``detail["reason"]`` names the fault: ``executor_panic``,
    ``device_failed`` or ``thread_panic``. Every request waiting in the daemon
    gets this once; the daemon then exits non-zero, its supervisor restarts
    it, and the restarted daemon has a new instance id (its replies to this
    client's session are :class:`DaemonRestarted`): open a new client and
    replay the sequences. It is an :class:`Internal`, so code that only
    handles that still works.
    """

    @property
    def reason(self) -> str | None:
        r = self.detail.get("reason")
        return r if isinstance(r, str) else None


class DaemonRestarted(UnknownSession):
    """The daemon that answered is not the one this client's ``hello`` reached.

    Raised for an ``unknown_session`` error whose ``detail.instance_id``
    differs from the instance id the client saw: the daemon restarted, and
    every sequence, region and KV block of the session is gone. It is an
    :class:`UnknownSession`, so code that only handles that still works.
    """


class RequestTimeout(TacflowError, TimeoutError):
    """No reply arrived within the client's timeout.

    The request may still run; its late reply is discarded when it arrives
    (replies are matched by ``request_id``).
    """

    code_name = "timeout"


class DaemonUnavailable(TacflowError, ConnectionError):
    """No daemon to talk to: no socket file found, or no answer to ``hello``."""

    code_name = "unavailable"


class ProtocolError(TacflowError):
    """A reply that breaks the protocol (wrong kind byte, missing fields...)."""

    code_name = "protocol_error"


#: Wire code -> exception class, for every code of PROTOCOL.md §5.
ERROR_CLASSES: dict[str, type[TacflowError]] = {
    cls.code_name: cls  # type: ignore[misc]
    for cls in (
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
        UnknownBlock,
    )
}


def error_from_reply(
    body: Mapping[str, Any], instance_id: str | None = None
) -> TacflowError:
    """Turns an error reply body (kind ``0xFF``) into the exception to raise.

    ``instance_id`` is the one the client's ``hello`` returned; with it, an
    ``unknown_session`` from another daemon instance becomes
    :class:`DaemonRestarted`.
    """
    code = body.get("code")
    message = body.get("message", "")
    detail = body.get("detail") or {}
    request_id = body.get("request_id")
    if not isinstance(code, str):
        return ProtocolError(
            "protocol_error", f"error reply without a code: {dict(body)!r}", {}, request_id
        )
    if not isinstance(detail, Mapping):
        detail = {"detail": repr(detail)}
    if code == UnknownSession.code_name and instance_id is not None:
        other = detail.get("instance_id")
        if isinstance(other, str) and other != instance_id:
            text = (
                f"the daemon restarted (instance {instance_id} is gone, "
                f"{other} answered): every sequence, region and KV block of "
                f"this session is gone; open a new client ({message})"
            )
            return DaemonRestarted(code, text, detail, request_id)
    if code == Internal.code_name and detail.get("fatal") not in (None, 0, False):
        return DaemonFailing(code, str(message), detail, request_id)
    cls = ERROR_CLASSES.get(code, TacflowError)
    return cls(code, str(message), detail, request_id)
