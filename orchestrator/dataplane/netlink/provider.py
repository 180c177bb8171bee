"""The netlink dataplane provider: applies operations to the kernel in batches and dumps ours.
The only place (with the rest of this subpackage) that speaks netlink."""

from __future__ import annotations

import contextlib
import errno
import gc
import struct
from typing import Iterator, Sequence

from orchestrator.dataplane import ops
from orchestrator.dataplane.netlink import decode, encode, nla
from orchestrator.dataplane.netlink.constants import (
    AF_INET, AF_INET6, AF_MPLS, AF_UNSPEC, IFLA_IFNAME, RT_PROTO, RTM_GETLINK, RTM_GETQDISC,
    RTM_GETROUTE, RTM_GETRULE, RTM_GETTFILTER, RTM_NEWLINK, TC_H_CLSACT,
)
from orchestrator.dataplane.netlink.nlsocket import KernelError, NetlinkSocket

_IFINFO = struct.Struct("=BxHiII")
_RTMSG = struct.Struct("=BBBBBBBBI")
_TCMSG = struct.Struct("=BBHiIII")


class UnknownDevice(KeyError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class NetlinkProvider:
    """Provider for the kernel of one network namespace (None: ours)."""

    def __init__(self, netns: str | None = None) -> None:
        self._sock = NetlinkSocket(netns)
        self._by_name: dict[str, int] = {}
        self._by_index: dict[int, str] = {}
        self._links_fresh = False

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "NetlinkProvider":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- links ------------------------------------------------------------------------------
    def _load_links(self) -> None:
        self._by_name.clear()
        self._by_index.clear()
        for kind, body in self._sock.dump(RTM_GETLINK, _IFINFO.pack(AF_UNSPEC, 0, 0, 0, 0)):
            if kind != RTM_NEWLINK:
                continue
            index = _IFINFO.unpack_from(body)[2]
            attrs = nla.attrs(body, _IFINFO.size)
            if IFLA_IFNAME in attrs:
                name = nla.get_str(attrs[IFLA_IFNAME])
                self._by_name[name] = index
                self._by_index[index] = name
        self._links_fresh = True

    def ifindex(self, name: str) -> int:
        """The index of a device; the link table is re-read once per batch on a miss."""
        index = self._by_name.get(name)
        if index is None and not self._links_fresh:
            self._load_links()
            index = self._by_name.get(name)
        if index is None:
            raise UnknownDevice(name)
        return index

    def ifname(self, index: int) -> str:
        name = self._by_index.get(index)
        if name is None:
            self._load_links()
            name = self._by_index.get(index, f"if{index}")
        return name

    # -- apply --------------------------------------------------------------------------------
    def apply(self, operations: Sequence[ops.Operation]) -> list[ops.OpResult]:
        with _cyclic_gc_paused():
            return self._apply(operations)

    def _apply(self, operations: Sequence[ops.Operation]) -> list[ops.OpResult]:
        self._links_fresh = False
        results: list[ops.OpResult | None] = [None] * len(operations)
        requests: list[tuple[int, int, bytes]] = []
        sent: list[int] = []
        for i, op in enumerate(operations):
            try:
                requests.append(encode.encode(op, self.ifindex))
                sent.append(i)
            except UnknownDevice as exc:
                results[i] = ops.OpResult(op, f"no such device {exc.name}", errno.ENODEV)
            except (ValueError, KeyError) as exc:
                results[i] = ops.OpResult(op, f"invalid: {exc}", errno.EINVAL)
        for i, error in zip(sent, self._sock.transact(requests)):
            op = operations[i]
            results[i] = ops.OpResult(op) if error is None else ops.OpResult(
                op, _explain(op, error), error.errno)
        return [r for r in results if r is not None]

    # -- dump ---------------------------------------------------------------------------------
    def dump(self) -> list[ops.Installed]:
        self._load_links()
        out: list[ops.Installed] = []
        for family in (AF_MPLS, AF_INET, AF_INET6):
            # With strict checking the kernel itself keeps only routes of our protocol.
            request = _RTMSG.pack(family, 0, 0, 0, 0, RT_PROTO, 0, 0, 0)
            for _kind, body in self._sock.dump(RTM_GETROUTE, request):
                installed = decode.route(body, self.ifname)
                if installed is not None:
                    out.append(installed)
        for family in (AF_INET, AF_INET6):
            for _kind, body in self._sock.dump(RTM_GETRULE, _RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
                installed = decode.rule(body)
                if installed is not None:
                    out.append(installed)
        out.extend(self._dump_tc())
        return out

    def _dump_tc(self) -> list[ops.Installed]:
        """Our flower filters, and the clsact qdiscs that hold at least one of them."""
        out: list[ops.Installed] = []
        qdiscs = self._sock.dump(RTM_GETQDISC, _TCMSG.pack(AF_UNSPEC, 0, 0, 0, 0, 0, 0))
        for _kind, body in qdiscs:
            ifindex, _handle, parent, _info = decode.tc_header(body)
            if parent != TC_H_CLSACT or decode.qdisc_kind(body) != "clsact":
                continue
            filters = []
            for direction in ops.Direction:
                request = _TCMSG.pack(AF_UNSPEC, 0, 0, ifindex, 0, encode.filter_parent(direction), 0)
                for _k, fbody in self._sock.dump(RTM_GETTFILTER, request):
                    installed = decode.flower(fbody, self.ifname)
                    if installed is not None:
                        filters.append(installed)
            if filters:
                out.append(ops.Installed(ops.ClsactQdisc(self.ifname(ifindex))))
                out.extend(filters)
        return out

    def dump_filters(self, dev: str, direction: ops.Direction = ops.Direction.EGRESS,
                     ours_only: bool = True) -> list[ops.Installed]:
        """Flower filters of one device, optionally including others' (to compare with tc)."""
        request = _TCMSG.pack(AF_UNSPEC, 0, 0, self.ifindex(dev), 0, encode.filter_parent(direction), 0)
        out = []
        for _kind, body in self._sock.dump(RTM_GETTFILTER, request):
            installed = decode.flower(body, self.ifname, require_cookie=ours_only)
            if installed is not None:
                out.append(installed)
        return out


@contextlib.contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """Encoding a batch allocates many short-lived objects and no reference cycles; the cyclic
    collector would otherwise walk the whole heap again and again (measured: 40 % of encoding)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _explain(op: ops.Operation, error: KernelError) -> str:
    """The kernel's words, plus what they mean for this operation where they are terse."""
    obj = op.obj
    if (isinstance(obj, ops.FlowerFilter) and obj.offload == ops.OffloadPolicy.REQUIRED
            and error.errno in (errno.EOPNOTSUPP, errno.EINVAL)):
        return f"offload required but device {obj.dev} cannot offload this filter: {error}"
    if isinstance(obj, ops.FlowerFilter) and error.errno == errno.EINVAL and "Qdisc" in error.message:
        return f"{error}; device {obj.dev} needs a clsact qdisc first"
    return str(error)
