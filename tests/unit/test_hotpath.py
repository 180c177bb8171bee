"""The first-packet hot path: the netlink provider's route cache (known clients cost no lookup,
and any notification on the watch socket, or a lost one, forgets every answer before the next
lookup) and the act_mpls template."""

from __future__ import annotations

import errno

from orchestrator.dataplane.netlink.routewatch import RouteCache, RouteChanges, group_mask


class Changes:
    def __init__(self) -> None:
        self.pending = False

    def __call__(self) -> bool:
        seen, self.pending = self.pending, False
        return seen


def test_known_addresses_are_not_looked_up_again() -> None:
    asked: list[list[str]] = []

    def lookup(addresses: list[str]) -> dict[str, str | None]:
        asked.append(addresses)
        return {a: f"via-{a}" for a in addresses}

    changes = Changes()
    cache: RouteCache[str | None] = RouteCache(changes)
    assert cache.resolve(["10.0.0.1", "10.0.0.2", "10.0.0.1"], lookup) == {
        "10.0.0.1": "via-10.0.0.1",
        "10.0.0.2": "via-10.0.0.2",
    }
    assert cache.resolve(["10.0.0.2", "10.0.0.3"], lookup) == {"10.0.0.2": "via-10.0.0.2", "10.0.0.3": "via-10.0.0.3"}
    assert cache.resolve(["10.0.0.1", "10.0.0.3"], lookup)["10.0.0.3"] == "via-10.0.0.3"
    assert asked == [["10.0.0.1", "10.0.0.2"], ["10.0.0.3"]]
    assert cache.lookups == 3
    changes.pending = True  # a route changed: everything is asked again
    cache.resolve(["10.0.0.1"], lookup)
    assert asked[-1] == ["10.0.0.1"] and cache.invalidations == 1


def test_the_cache_is_bounded() -> None:
    cache: RouteCache[None] = RouteCache(Changes(), max_entries=4)
    for i in range(10):
        cache.resolve([f"10.0.0.{i}"], lambda a: dict.fromkeys(a))
    assert len(cache._known) <= 4


def test_changes_drains_the_socket_and_counts_a_loss() -> None:
    class Lossy:
        def __init__(self, script: list[object]) -> None:
            self.script = script

        def setblocking(self, flag: bool) -> None:
            pass

        def recv_into(self, buf: bytearray) -> int:
            item = self.script.pop(0) if self.script else BlockingIOError()
            if isinstance(item, BaseException):
                raise item
            assert isinstance(item, int)
            return item

        def close(self) -> None:
            pass

    assert RouteChanges(sock=Lossy([])).changed() is False  # type: ignore[arg-type]
    assert RouteChanges(sock=Lossy([20, 20])).changed() is True  # type: ignore[arg-type]
    assert RouteChanges(sock=Lossy([OSError(errno.ENOBUFS, "lost")])).changed() is True  # type: ignore[arg-type]


def test_group_mask() -> None:
    assert group_mask([1, 7, 11]) == 1 | 1 << 6 | 1 << 10


def test_the_push_template_encodes_as_the_full_encoder() -> None:
    """The act_mpls push built from its template (label and cookie vary) is byte for byte the
    action mpls_action encodes in full."""
    from orchestrator.dataplane import ops
    from orchestrator.dataplane.netlink import encode, nla

    for order, label, cookie in ((1, 1001, b"mplsorch"), (2, 0xFFFFF, b"mplsorch\x01\x02\x03"), (3, 17, b"x" * 16)):
        full = nla.nest(order, encode.mpls_action(ops.MplsPush(label), cookie))
        assert encode._action_attr(order, ops.MplsPush(label), cookie) == full
