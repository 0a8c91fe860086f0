"""The executor's link to tacflowd: the connection and its start-up checks,
the lease kept alive while vLLM idles, a lost daemon noticed (a probe on a
second connection during a long step, a ping after an idle gap), and the
move to a new daemon instance after a restart (see
:mod:`tacflow.vllm.executor` for what a restart means for vLLM's requests).

:class:`DaemonLink` is a mixin of :class:`~tacflow.vllm.executor.TacflowExecutor`:
its methods use the executor's state (``_client``, ``info``, ``_lock``,
``_requests``, ``validity``, ...), set up in ``_init_executor``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from vllm import __version__ as VLLM_VERSION

from ..client import Client
from ..errors import (
    DaemonFailing,
    DaemonUnavailable,
    RequestTimeout,
    ShuttingDown,
    TacflowError,
    UnknownSession,
)
from .checks import StartupRefused, check_model, check_scheduler

logger = logging.getLogger("vllm.tacflow")

#: How long the daemon's I/O thread may take to answer ping, health, stats.
QUICK_TIMEOUT_S = 10.0
#: A step running longer than this has the daemon's health probed this
#: often on a second connection.
PROBE_EVERY_S = 5.0

#: A step after this long without a daemon request starts with a ping
#: (quick timeout): opening and closing sequences wait as long as a step,
#: and cannot be abandoned, so a daemon that died while vLLM idled is
#: found by the ping rather than by an open waiting out the step timeout.
IDLE_CHECK_S = 1.0
#: How long a lost daemon may take to come back before vLLM's engine fails.
RESTART_WAIT_ENV = "TACFLOW_VLLM_RESTART_WAIT_S"
RESTART_WAIT_DEFAULT_S = 60.0
#: While waiting for it, a log line this often.
RESTART_LOG_EVERY_S = 5.0

#: Errors that may mean the daemon instance is gone (the answer of a new
#: instance, or no answer at all); a daemon that still answers as itself
#: after one of these was not lost, and the error stands.
_LOSS = (UnknownSession, RequestTimeout, DaemonUnavailable, DaemonFailing, ShuttingDown)
#: Of those, the ones a daemon still answering as itself is going down with.
_GOING_DOWN = (DaemonFailing, ShuttingDown)


class DaemonLost(RuntimeError):
    """The daemon is gone and no usable new instance came back in time."""


class DaemonLink:
    """The connection half of the executor (see the module's text)."""

    def _connect(self, address: str | None, connect_timeout_s: float) -> Client:
        return Client(
            address,
            timeout_s=self._timeout_s,
            client_name=f"tacflow-vllm/{VLLM_VERSION}",
            connect_timeout_s=connect_timeout_s,
        )

    def _check_daemon(self, info: Any) -> None:
        """What the daemon must be for this vLLM: at start, and again for a
        new instance after a restart."""
        if tuple(info.protocol) < (1, 3):
            raise StartupRefused(
                f"tacflowd speaks protocol {info.protocol[0]}.{info.protocol[1]}; "
                "vLLM needs 1.3 (named KV blocks)"
            )
        check_model(self.model_config, info)
        check_scheduler(self.vllm_config, info)
        if self.cache_config.block_size != info.kv.block_size:
            raise StartupRefused(
                f"--block-size {self.cache_config.block_size}: tacflowd's KV blocks hold "
                f"{info.kv.block_size} tokens (leave --block-size out)"
            )

    def _keep_alive(self) -> None:
        """Renews the session's lease while vLLM has nothing to run (every
        daemon request renews it), and notices a lost daemon: idle, by the
        renewal's answer; during a step that runs long, by asking the
        daemon's health on a connection of its own (the step's connection
        is busy), so that a daemon killed mid-step (OOM, SIGKILL) fails
        vLLM's engine in seconds rather than after the step's timeout."""
        period = max(self.info.lease_ms / 1000.0 / 3.0, 0.5)
        tick = min(period, PROBE_EVERY_S)
        while not self._closed.wait(tick):
            started = self._step_started
            if started is not None:
                if time.monotonic() - started > PROBE_EVERY_S and self._lost is None:
                    self._lost = self._probe()
                continue
            if time.monotonic() - self._last_request < period:
                continue
            with self._lock:
                if self._closed.is_set() or self._failed is not None:
                    return
                try:
                    self._with_daemon(lambda: self._quick(self._client.ping))
                except Exception as exc:  # noqa: BLE001 - the engine fails with it
                    self._fail(exc)
                    return
                self._last_request = time.monotonic()

    def _probe(self) -> str | None:
        """Why the daemon is gone, or None when it answers as itself."""
        try:
            with Client(
                self._client.address,
                timeout_s=QUICK_TIMEOUT_S,
                connect_timeout_s=QUICK_TIMEOUT_S,
                client_name="tacflow-vllm/probe",
            ) as probe:
                if probe.instance_id != self.info.instance_id:
                    return f"tacflowd restarted (instance {probe.instance_id}, was {self.info.instance_id})"
                health = probe.health()
                if health.status not in ("ok", "wedged"):
                    return f"tacflowd is {health.status}: {health.reason or ''}"
        except TacflowError as exc:
            return f"tacflowd does not answer: {exc}"
        return None

    def _quick(self, request: Callable[[], Any]) -> Any:
        """A request the daemon's I/O thread answers at once (ping, health,
        stats), under a short timeout instead of a step's: a daemon that is
        gone is noticed in seconds. The caller holds the lock."""
        saved = self._client.timeout_s
        self._client.timeout_s = QUICK_TIMEOUT_S
        try:
            return request()
        finally:
            self._client.timeout_s = saved

    def _fail(self, exc: BaseException) -> None:
        if self._failed is None:
            self._failed = exc
            logger.error("tacflow: the daemon failed: %s", exc)
            for cb in self._failure_callbacks:
                cb()

    def _with_daemon(self, work: Callable[[], Any]) -> Any:
        """``work()``, run again on a new daemon instance when the daemon
        was lost under it (see the module's text). ``work`` must be safe to
        repeat: after a recovery every request's sequence is to be reopened,
        and ``work`` reopens those it needs. The caller holds the lock."""
        while True:
            try:
                return work()
            except TacflowError as exc:
                self._recover(exc)

    def _recover(self, cause: TacflowError) -> None:
        """Waits for a new daemon instance and moves to it, or raises: the
        ``cause`` when the daemon was not lost (it still answers as itself),
        :class:`DaemonLost` when none came back in time, StartupRefused when
        the new one cannot serve this vLLM."""
        if not isinstance(cause, _LOSS) or self._restart_wait_s <= 0:
            raise cause
        old = self.info.instance_id
        address = self._client.address
        logger.warning(
            "tacflow: lost tacflowd instance %s (%s); waiting up to %g s for a new instance at %s",
            old, cause, self._restart_wait_s, address,
        )
        start = time.monotonic()
        deadline = start + self._restart_wait_s
        next_log = start + RESTART_LOG_EVERY_S
        last: BaseException = cause
        while True:
            now = time.monotonic()
            if now >= deadline:
                raise DaemonLost(
                    f"tacflowd at {address} is gone and no new instance answered within "
                    f"{self._restart_wait_s:g} s ({RESTART_WAIT_ENV}); last error: {last}"
                ) from last
            if now >= next_log:
                logger.warning(
                    "tacflow: still waiting for tacflowd at %s (%.0f s left; %s)", address, deadline - now, last
                )
                next_log = now + RESTART_LOG_EVERY_S
            try:
                client = self._connect(address, max(min(QUICK_TIMEOUT_S, deadline - now), 0.1))
            except TacflowError as exc:
                last = exc
                time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))
                continue
            if client.instance_id == old:
                client.close()
                if not isinstance(cause, _GOING_DOWN):
                    raise cause  # the same daemon answers: it was not lost
                last = cause
                time.sleep(0.5)
                continue
            try:
                self._adopt(client)
            except BaseException:
                client.close()
                raise
            return

    def _adopt(self, client: Client) -> None:
        """Moves to a new daemon instance: the same checks as at start, the
        same reservation, and every block and sequence of the old one gone."""
        info = client.info
        self._check_daemon(info)
        try:
            reserved = client.reserve_blocks(self._reserved)
        except TacflowError as exc:
            raise StartupRefused(
                f"the restarted tacflowd could not reserve vLLM's {self._reserved} KV blocks: {exc} "
                "(start it with at least the --kv-blocks it had)"
            ) from exc
        if reserved != self._reserved:
            raise StartupRefused(f"the restarted tacflowd reserved {reserved} KV blocks, not {self._reserved}")
        old, self._client, self.info = self._client, client, info
        old.timeout_s = 1.0  # its session died with the old instance
        old.close()
        self.validity.lost()
        for r in self._requests.values():
            r.open = False
            if r.open_at is None:
                r.open_at = r.computed
        self._lost = None
        self._last_request = time.monotonic()
        logger.warning(
            "tacflow: continuing on tacflowd instance %s (%d KV blocks reserved again); its KV blocks "
            "are empty: %d open request(s) are recomputed and vLLM's prefix cache is refilled as "
            "requests hit it",
            info.instance_id, reserved, len(self._requests),
        )

    def register_failure_callback(self, callback: Callable[[], None]) -> None:
        self._failure_callbacks.append(callback)
