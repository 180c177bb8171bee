"""The interface every dataplane provider implements (netlink for the kernel, fake for tests)."""

from __future__ import annotations

from typing import Protocol, Sequence

from orchestrator.dataplane.ops import Installed, OpResult, Operation


class Provider(Protocol):
    def apply(self, ops: Sequence[Operation]) -> list[OpResult]:
        """Apply every operation in order; one result per operation, in the same order.
        A failed operation never stops the ones after it."""
        ...

    def dump(self) -> list[Installed]:
        """Our own objects as currently installed (nothing of other route owners)."""
        ...
