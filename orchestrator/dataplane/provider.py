"""The interface every dataplane provider implements (netlink for the kernel, fake for tests): all
that the daemons and the node setup ask of the node's dataplane, so a daemon runs over either."""

from __future__ import annotations

from typing import Callable, Iterable, Protocol, Sequence

from orchestrator.dataplane.ops import FlowerFilter, Installed, NextHop, Operation, OpResult, U32Filter


class UnknownDevice(KeyError):
    """A device name the node does not have."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class Provider(Protocol):
    def apply(self, ops: Sequence[Operation]) -> list[OpResult]:
        """Apply every operation in order; one result per operation, in the same order.
        A failed operation never stops the ones after it."""
        ...

    def dump(self, elements: bool = True) -> list[Installed]:
        """Our own objects as currently installed (nothing of other route owners); without the
        fast-path set elements when `elements` is false (a restore needs none, and the kernel
        dumps a set's elements in time quadratic in their number)."""
        ...

    def offload_counts(self, keep: Callable[[Installed], bool] | None = None) -> dict[str, int]:
        """`offload.counts(dump(elements=False))` of the objects `keep` takes (all without it),
        with no list of every object where the provider can count as it reads."""
        ...

    def dump_elements(self) -> list[Installed]:
        """The elements of the balancer's fast-path sets (none without its ruleset): the part of
        `dump` that a ruleset load empties."""
        ...

    def supports_nexthops(self) -> bool:
        """Whether the node's kernel has nexthop objects (RTM_NEWNEXTHOP; Linux 5.3 and later):
        without, the server agent installs plain encap routes."""
        ...

    def routes_to(self, addresses: Iterable[str]) -> dict[str, NextHop | None]:
        """The node's route to each address (all looked up in one request batch): its device and
        gateway, or None where there is no usable route (unreachable, or a local address)."""
        ...

    def filter_packets(self, filters: Sequence[FlowerFilter | U32Filter]) -> list[int | None]:
        """How many packets went through each of these filters of ours so far, in order; None
        for one the node does not have (the balancer tells embryonic sessions by it)."""
        ...

    def addresses(self, dev: str) -> list[str]:
        """The IP addresses on `dev`, without prefix length (a server checks its VIPs are on lo)."""
        ...

    def add_address(self, dev: str, address: str) -> None:
        """Put `address` (with prefix length, e.g. 10.0.0.100/32) on `dev`, as `node.setup: apply`
        does for a VIP missing from lo. An address already there counts as success, so applying
        again changes nothing. Raises OSError (ENODEV for an unknown device)."""
        ...

    def ifindex(self, name: str) -> int:
        """The index of device `name`; UnknownDevice when there is none."""
        ...

    def ifname(self, index: int) -> str:
        """The name of the device with `index` (NFQUEUE names input devices by index)."""
        ...

    def close(self) -> None:
        """Release the provider's sockets; the daemon calls it last."""
        ...

    def twin(self) -> Provider:
        """A provider of the same node on sockets of its own, for dumps in another thread (the
        balancer's offload counts, daemon.offload_sampler); the caller closes it."""
        ...
