"""Which of vLLM's KV block ids hold what vLLM believes they hold.

vLLM's block ids name KV blocks of the daemon (PROTOCOL.md §4.8). While one
daemon instance serves the executor, every block vLLM counts as computed
was written by a step of that instance. A new daemon instance (a restart
under a running vLLM) starts with every block empty, but vLLM's prefix
cache still maps prompt prefixes onto those block ids and its running
requests still count their tokens as computed: from then on a block id is
only trusted once a step of the current instance has written it.

:class:`BlockValidity` is that bookkeeping, apart from vLLM and the daemon
so that it can be tested alone. Until the first loss it trusts every block
and costs nothing per step.
"""

from __future__ import annotations


class BlockValidity:
    """The block ids written in the current daemon instance.

    A block counts as written once any step of this instance wrote any of
    its slots. That is enough: vLLM shares only full blocks between
    requests, and a request fills its own partial block in order, within
    one daemon instance (a loss makes every block untrusted again).
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        #: None until the first loss: every block is trusted.
        self._written: set[int] | None = None
        #: Daemon instances lost so far (for logs and tests).
        self.losses = 0

    @property
    def tracking(self) -> bool:
        return self._written is not None

    def lost(self) -> None:
        """A new daemon instance: no block holds anything any more."""
        self._written = set()
        self.losses += 1

    def is_valid(self, block: int) -> bool:
        return self._written is None or block in self._written

    def usable_prefix(self, blocks: list[int], computed: int) -> int:
        """How many of a request's first ``computed`` tokens its blocks
        really hold: up to the first block that is not valid."""
        if self._written is None or computed == 0:
            return computed
        bs = self.block_size
        for i in range(-(-computed // bs)):
            if i >= len(blocks) or blocks[i] not in self._written:
                return min(i * bs, computed)
        return computed

    def written(self, blocks: list[int], start: int, end: int) -> None:
        """A step of the current instance wrote tokens ``start..end`` of a
        request whose block table is ``blocks``."""
        if self._written is None or end <= start:
            return
        bs = self.block_size
        self._written.update(blocks[start // bs : -(-end // bs)])
