"""The node's routes to its clients, remembered until the kernel says a route may have changed.

The balancer needs, for each first packet, its node's next hop towards the client (the S2C label
route can only name a neighbour). Asking the kernel (RTM_GETROUTE) for every batch costs a round
trip for clients whose answer is already known; instead the answers are kept, and a netlink socket
subscribed to the groups that can change them (links, addresses, IPv4/IPv6 routes and rules)
tells when to forget them all: any message on it, or a lost one (ENOBUFS), clears the cache
before the next lookup. Route changes are rare on a balancer, so forgetting everything is cheap
and never wrong.

Order that keeps it right: the notifications are read before the kernel is asked, so an answer
older than a change is cleared at the next lookup at the latest."""

from __future__ import annotations

import socket
from typing import Callable, Generic, Iterable, TypeVar

from orchestrator.dataplane.netlink.constants import (
    NETLINK_ROUTE,
    RTNLGRP_IPV4_IFADDR,
    RTNLGRP_IPV4_ROUTE,
    RTNLGRP_IPV4_RULE,
    RTNLGRP_IPV6_IFADDR,
    RTNLGRP_IPV6_ROUTE,
    RTNLGRP_IPV6_RULE,
    RTNLGRP_LINK,
)
from orchestrator.dataplane.netlink.nlsocket import open_netlink

GROUPS = (
    RTNLGRP_LINK,
    RTNLGRP_IPV4_IFADDR,
    RTNLGRP_IPV4_ROUTE,
    RTNLGRP_IPV4_RULE,
    RTNLGRP_IPV6_IFADDR,
    RTNLGRP_IPV6_ROUTE,
    RTNLGRP_IPV6_RULE,
)
MAX_ENTRIES = 1 << 18  # clients remembered; past it the cache starts again (bounded memory)

T = TypeVar("T")


def group_mask(groups: Iterable[int]) -> int:
    """The bind() mask of rtnetlink groups (all of ours are below 32)."""
    mask = 0
    for group in groups:
        mask |= 1 << (group - 1)
    return mask


class RouteChanges:
    """A netlink socket subscribed to GROUPS; `changed()` drains it without blocking."""

    def __init__(self, netns: str | None = None, sock: socket.socket | None = None) -> None:
        self._sock = sock if sock is not None else open_netlink(NETLINK_ROUTE, netns, 1 << 20)
        if sock is None:
            self._sock.bind((0, group_mask(GROUPS)))
        self._sock.setblocking(False)
        self._buf = bytearray(1 << 16)

    def changed(self) -> bool:
        """Whether anything arrived since the last call (a lost notification counts)."""
        seen = False
        while True:
            try:
                if not self._sock.recv_into(self._buf):
                    return seen
            except BlockingIOError:
                return seen
            except OSError:  # ENOBUFS: notifications were lost, so something changed
                pass
            seen = True

    def close(self) -> None:
        self._sock.close()


class RouteCache(Generic[T]):
    """Answers of a route lookup by address, forgotten whenever `changed()` says so."""

    def __init__(self, changed: Callable[[], bool], max_entries: int = MAX_ENTRIES) -> None:
        self._changed = changed
        self._max = max_entries
        self._known: dict[str, T] = {}
        self.lookups = 0  # addresses the kernel was asked about
        self.invalidations = 0

    def resolve(
        self,
        addresses: Iterable[str],
        lookup: Callable[[list[str]], dict[str, T]],
        mirror: Callable[[list[str]], tuple[dict[str, T], list[str]]] | None = None,
    ) -> dict[str, T]:
        """Each address's answer: remembered ones as they are, the others from `mirror` (the
        answers it has, and the addresses it leaves to the kernel: fibmirror.FibMirror.split)
        and then from one `lookup` of those left (none when every address is answered)."""
        if self._changed():
            self._known.clear()
            self.invalidations += 1
        known = self._known
        wanted = list(dict.fromkeys(addresses))
        missing = [a for a in wanted if a not in known]
        if missing:
            found: dict[str, T] = {}
            if mirror is not None:
                found, missing = mirror(missing)
            if missing:
                self.lookups += len(missing)
                found.update(lookup(missing))
            if len(known) + len(found) > self._max:
                known.clear()
            known.update(found)
        return {a: known[a] for a in wanted}
