"""The netlink dataplane provider: applies operations to the kernel in batches and dumps ours.
The only place (with the rest of this subpackage) that speaks netlink."""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import gc
import socket
from typing import Callable, Iterable, Iterator, Mapping, Sequence

from orchestrator.dataplane import offload, ops
from orchestrator.dataplane.netlink import decode, encode, fibmirror, layouts, nla, routewatch
from orchestrator.dataplane.netlink.constants import (
    AF_INET,
    AF_INET6,
    AF_MPLS,
    AF_UNSPEC,
    IFA_ADDRESS,
    IFA_LOCAL,
    IFLA_IFNAME,
    RT_PROTO,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETQDISC,
    RTM_GETROUTE,
    RTM_GETRULE,
    RTM_GETTFILTER,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTM_NEWTFILTER,
    TC_H_CLSACT,
)
from orchestrator.dataplane.netlink.nlsocket import KernelError, NetlinkSocket, NftBatchSocket
from orchestrator.dataplane.provider import UnknownDevice

PIPELINE_PIECE = 4096  # operations encoded while the previous piece is in the kernel


class NetlinkProvider:
    """Provider for the kernel of one network namespace (None: ours)."""

    def __init__(
        self,
        netns: str | None = None,
        sock: NetlinkSocket | None = None,
        links: Mapping[str, int] | None = None,
        nft_sock: NftBatchSocket | None = None,
    ) -> None:
        """`sock` (and `nft_sock`) instead of new sockets in `netns`, and `links` (name -> index)
        as a fixed link table instead of the kernel's (never dumped): how tests run the provider
        against a scripted kernel. The nf_tables socket is opened when first needed."""
        self._sock = sock if sock is not None else NetlinkSocket(netns)
        self._netns = netns
        self._nft = nft_sock
        self._static_links = links is not None
        self._by_name: dict[str, int] = dict(links or {})
        self._by_index: dict[int, str] = {index: name for name, index in self._by_name.items()}
        self._links_fresh = self._static_links
        # A scripted kernel (tests) answers every lookup; over the kernel's sockets the answers
        # are remembered, watched from the first lookup on.
        self._watch_routes = sock is None
        self._changes: routewatch.RouteChanges | None = None
        self._routes: routewatch.RouteCache[ops.NextHop | None] | None = None
        self._fib: fibmirror.FibMirror | None = None
        self._nexthops: bool | None = None  # nexthop objects: not asked yet

    def close(self) -> None:
        self._sock.close()
        if self._changes is not None:
            self._changes.close()
        if self._nft is not None:
            self._nft.close()

    def _nft_socket(self) -> NftBatchSocket:
        if self._nft is None:
            self._nft = NftBatchSocket(self._netns)
        return self._nft

    def __enter__(self) -> NetlinkProvider:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- links ------------------------------------------------------------------------------
    def _load_links(self) -> None:
        if self._static_links:
            return
        self._by_name.clear()
        self._by_index.clear()
        for kind, body in self._sock.dump(RTM_GETLINK, nla.IFINFOMSG.pack(AF_UNSPEC, 0, 0, 0, 0)):
            if kind != RTM_NEWLINK:
                continue
            index = nla.IFINFOMSG.unpack_from(body)[2]
            attrs = nla.attrs(body, nla.IFINFOMSG.size)
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
            return self._apply_all(operations)

    def _apply_all(self, operations: Sequence[ops.Operation]) -> list[ops.OpResult]:
        """Set elements travel on their own socket (NETLINK_NETFILTER; routes and filters on
        NETLINK_ROUTE), so the batch goes in three steps that keep the fast path safe: element
        deletes first (no new flow is admitted to a session whose objects are going), then the
        rtnetlink operations, then element adds (a flow the kernel admits finds its session's
        C2S filter in place). Each step is many messages per sendmsg."""
        elements = [i for i, op in enumerate(operations) if isinstance(op.obj, ops.FastPathElement)]
        if not elements:
            return self._apply(operations)
        chosen = set(elements)
        steps = (
            [i for i in elements if isinstance(operations[i], ops.Delete)],
            [i for i in range(len(operations)) if i not in chosen],
            [i for i in elements if not isinstance(operations[i], ops.Delete)],
        )
        results: list[ops.OpResult | None] = [None] * len(operations)
        for step, apply in zip(steps, (self._apply_nft, self._apply, self._apply_nft)):
            if step:
                for i, result in zip(step, apply([operations[i] for i in step])):
                    results[i] = result
        return [r for r in results if r is not None]

    def _apply_nft(self, operations: Sequence[ops.Operation]) -> list[ops.OpResult]:
        """Set elements, many to a message: each run of operations of one kind on one set goes
        as messages of up to ELEMENTS_PER_MESSAGE elements (a restart's 100,000 elements in a few
        hundred messages, not 100,000 each acknowledged). A message the kernel refuses changed
        nothing (the batch is a transaction), so its operations go again one per message, and
        each gets its own result."""
        results: list[ops.OpResult | None] = [None] * len(operations)
        groups: list[list[int]] = []
        requests: list[tuple[int, int, bytes]] = []
        for group in _element_runs(operations):
            try:
                for i in group:
                    ops.validate(operations[i])
                requests.append(
                    encode.set_elements(operations[group[0]], [operations[i].obj for i in group])  # type: ignore[misc]
                )
            except (ValueError, KeyError):  # one of them cannot be encoded: each gets its answer
                self._apply_singly(operations, group, results)
                continue
            groups.append(group)
        errors = self._nft_socket().transact(requests) if requests else []
        for group, error in zip(groups, errors):
            if error is None:
                for i in group:
                    results[i] = ops.OpResult(operations[i])
            else:
                self._apply_singly(operations, group, results)
        return [r for r in results if r is not None]

    def _apply_singly(
        self, operations: Sequence[ops.Operation], group: list[int], results: list[ops.OpResult | None]
    ) -> None:
        """Element operations one per message: each its own result."""
        chosen = [operations[i] for i in group]
        partial: list[ops.OpResult | None] = [None] * len(chosen)
        sent, requests = self._encode(chosen, 0, partial)
        if requests:
            self._finish(chosen, sent, self._nft_socket().transact(requests), partial)
        for i, result in zip(group, partial):
            results[i] = result

    def _apply(self, operations: Sequence[ops.Operation]) -> list[ops.OpResult]:
        """Encode and send in pieces of PIPELINE_PIECE operations; a big batch is sent by one
        sender thread while the next piece is encoded. The kernel handles a sendmsg in the
        sender's system call, with the GIL released, so encoding (Python) and installing
        (kernel) overlap on two CPUs; one sender keeps the operations in order."""
        self._links_fresh = False
        results: list[ops.OpResult | None] = [None] * len(operations)
        pieces = range(0, len(operations), PIPELINE_PIECE)
        if len(pieces) < 2:
            sent, requests = self._encode(operations, 0, results)
            self._finish(operations, sent, self._sock.transact(requests), results)
            return [r for r in results if r is not None]
        self._load_links()  # now, so no device lookup dumps on the socket while the sender uses it
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as sender:
            pending = []
            for start in pieces:
                sent, requests = self._encode(operations[start : start + PIPELINE_PIECE], start, results)
                pending.append((sent, sender.submit(self._sock.transact, requests)))
            for sent, future in pending:
                self._finish(operations, sent, future.result(), results)
        return [r for r in results if r is not None]

    def _encode(
        self, operations: Sequence[ops.Operation], offset: int, results: list[ops.OpResult | None]
    ) -> tuple[list[int], list[tuple[int, int, bytes]]]:
        """Requests for the operations that encode; the others get their result now."""
        requests: list[tuple[int, int, bytes]] = []
        sent: list[int] = []
        for i, op in enumerate(operations, start=offset):
            try:
                requests.append(encode.encode(op, self.ifindex))
                sent.append(i)
            except UnknownDevice as exc:
                results[i] = ops.OpResult(op, f"no such device {exc.name}", errno.ENODEV)
            except (ValueError, KeyError) as exc:
                results[i] = ops.OpResult(op, f"invalid: {exc}", errno.EINVAL)
        return sent, requests

    @staticmethod
    def _finish(
        operations: Sequence[ops.Operation],
        sent: list[int],
        errors: Sequence[KernelError | None],
        results: list[ops.OpResult | None],
    ) -> None:
        for i, error in zip(sent, errors):
            op = operations[i]
            results[i] = ops.OpResult(op) if error is None else ops.OpResult(op, _explain(op, error), error.errno)

    # -- dump ---------------------------------------------------------------------------------
    def twin(self) -> NetlinkProvider:
        return NetlinkProvider(self._netns)

    def dump(self, elements: bool = True) -> list[ops.Installed]:
        self._load_links()
        out: list[ops.Installed] = []
        for family in (AF_MPLS, AF_INET, AF_INET6):
            # With strict checking the kernel itself keeps only routes of our protocol.
            request = nla.RTMSG.pack(family, 0, 0, 0, 0, RT_PROTO, 0, 0, 0)
            for _kind, body in self._sock.dump(RTM_GETROUTE, request):
                installed = decode.route(body, self.ifname)
                if installed is not None:
                    out.append(installed)
        out.extend(self._dump_nexthops())
        for family in (AF_INET, AF_INET6):
            for _kind, body in self._sock.dump(RTM_GETRULE, nla.RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0)):
                installed = decode.rule(body)
                if installed is not None:
                    out.append(installed)
        out.extend(self._dump_tc())
        if elements:
            out.extend(self.dump_elements())
        return out

    def offload_counts(self, keep: Callable[[ops.Installed], bool] | None = None) -> dict[str, int]:
        """`offload.counts` of `dump(elements=False)` (of the objects `keep` takes), counted as
        each object is decoded: no list of every object (at 500,000 sessions about a million,
        built every few seconds by the sampler, daemon.offload_sampler, whose memory the process
        kept fragmented; issue 15). Only routes and tc filters report an offload state
        (offload.REPORTING), so nexthop objects, rules and qdiscs are not asked for."""
        self._load_links()
        out = dict.fromkeys(ops.OFFLOAD_STATES, 0)

        def count(
            decoder: Callable[[memoryview], ops.Installed | None],
        ) -> Callable[[Iterable[tuple[int, memoryview]]], dict[str, int]]:
            def fold(messages: Iterable[tuple[int, memoryview]]) -> dict[str, int]:
                decoded = (decoder(body) for _kind, body in messages)
                return offload.counts(i for i in decoded if i is not None and (keep is None or keep(i)))

            return fold

        def add(counts: dict[str, int]) -> None:
            for state, n in counts.items():
                out[state] += n

        route = count(lambda body: decode.route(body, self.ifname))
        for family in (AF_MPLS, AF_INET, AF_INET6):
            request = nla.RTMSG.pack(family, 0, 0, 0, 0, RT_PROTO, 0, 0, 0)  # as `dump`
            add(self._sock.fold_dump(RTM_GETROUTE, request, route))
        tc_filter = count(lambda body: decode.tc_filter(body, self.ifname))
        for _kind, body in self._sock.dump(RTM_GETQDISC, nla.TCMSG.pack(AF_UNSPEC, 0, 0, 0, 0, 0, 0)):
            ifindex, _handle, parent, _info = decode.tc_header(body)
            if parent != TC_H_CLSACT or decode.qdisc_kind(body) != "clsact":
                continue
            for direction in ops.Direction:
                request = nla.TCMSG.pack(AF_UNSPEC, 0, 0, ifindex, 0, encode.filter_parent(direction), 0)
                add(self._sock.fold_dump(RTM_GETTFILTER, request, tc_filter))
        return out

    def _dump_nexthops(self) -> list[ops.Installed]:
        """Our nexthop objects; none on a kernel without them (EOPNOTSUPP, remembered)."""
        if self._nexthops is False:
            return []
        kind, body = encode.nexthops_dump()
        try:
            replies = self._sock.dump(kind, body)
        except OSError as exc:
            if exc.errno != errno.EOPNOTSUPP:
                raise
            self._nexthops = False
            return []
        self._nexthops = True
        return [i for _kind, mbody in replies if (i := decode.nexthop(mbody, self.ifname)) is not None]

    def supports_nexthops(self) -> bool:
        """Whether this kernel has nexthop objects (RTM_GETNEXTHOP answers): asked once."""
        if self._nexthops is None:
            self._dump_nexthops()
        return bool(self._nexthops)

    def dump_elements(self) -> list[ops.Installed]:
        """The elements of the balancer's fast-path sets (NFT_MSG_GETSETELEM per set); none where
        the table or a set is not there (a server's ruleset has none, or no ruleset is loaded)."""
        out: list[ops.Installed] = []
        for name in decode.FAST_PATH_SETS:
            kind, body = encode.set_elements_dump(name)
            try:
                replies = self._nft_socket().dump(kind, body)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    continue
                raise
            for _kind, mbody in replies:
                out.extend(ops.Installed(element) for element in decode.set_elements(mbody))
        return out

    def _dump_tc(self) -> list[ops.Installed]:
        """Our flower filters, and the clsact qdiscs that hold at least one of them (flower
        filters decoded by layout: layouts.py)."""
        out: list[ops.Installed] = []
        flower = layouts.FlowerDecoder()
        qdiscs = self._sock.dump(RTM_GETQDISC, nla.TCMSG.pack(AF_UNSPEC, 0, 0, 0, 0, 0, 0))
        for _kind, body in qdiscs:
            ifindex, _handle, parent, _info = decode.tc_header(body)
            if parent != TC_H_CLSACT or decode.qdisc_kind(body) != "clsact":
                continue
            filters = []
            for direction in ops.Direction:
                request = nla.TCMSG.pack(AF_UNSPEC, 0, 0, ifindex, 0, encode.filter_parent(direction), 0)
                for _k, fbody in self._sock.dump(RTM_GETTFILTER, request):
                    installed = flower(fbody, self.ifname) or decode.u32(fbody, self.ifname)
                    if installed is not None:
                        filters.append(installed)
            if filters:
                out.append(ops.Installed(ops.ClsactQdisc(self.ifname(ifindex))))
                out.extend(filters)
        return out

    # -- route lookups --------------------------------------------------------------------------
    def routes_to(self, addresses: Iterable[str]) -> dict[str, ops.NextHop | None]:
        """This node's route to each address: device and gateway (None as gateway: on-link), or
        None where there is no usable route (the kernel's error, e.g. ENETUNREACH, or a route
        that is not unicast out of a device). All lookups go in one sendmsg; the answers are
        matched to their address by sequence number. The balancer asks this of each batch's
        client addresses: an S2C label route can only name a neighbour. On the kernel's own
        sockets the answers are remembered until a route, rule, address or link changes
        (routewatch): a known client costs no lookup; and a new IPv4 client is answered from a
        mirror of the IPv4 tables (fibmirror), rebuilt after such a change, wherever the mirror
        can be exact: only the others cost a lookup."""
        if not self._watch_routes:
            return self._routes_to(list(addresses))
        if self._routes is None:
            self._changes = routewatch.RouteChanges(self._netns)
            self._fib = fibmirror.FibMirror(self._sock.dump, self.ifname)
            self._routes = routewatch.RouteCache(self._routes_changed)
        assert self._fib is not None
        return self._routes.resolve(addresses, self._routes_to, self._fib.split)

    def _routes_changed(self) -> bool:
        """Whether the kernel said a route may have changed (then the mirror is read again)."""
        assert self._changes is not None and self._fib is not None
        if self._changes.changed():
            self._fib.mark_stale()
            return True
        return False

    def route_counters(self) -> dict[str, int]:
        """How `routes_to` answered since the start: kernel lookups (RTM_GETROUTE per address),
        addresses the FIB mirror answered, the mirror's rebuilds, the cache's invalidations."""
        cache, fib = self._routes, self._fib
        return {
            "kernel_lookups": cache.lookups if cache is not None else 0,
            "mirror_answers": fib.answered if fib is not None else 0,
            "mirror_rebuilds": fib.rebuilds if fib is not None else 0,
            "invalidations": cache.invalidations if cache is not None else 0,
        }

    def _routes_to(self, addresses: list[str]) -> dict[str, ops.NextHop | None]:
        out: dict[str, ops.NextHop | None] = {}
        wanted: list[str] = []
        requests: list[tuple[int, int, bytes]] = []
        for address in dict.fromkeys(addresses):
            out[address] = None
            try:
                requests.append(encode.route_query(address))
            except ValueError:  # not an address: no route to it
                continue
            wanted.append(address)
        answers = self._sock.query(requests) if requests else []
        for address, answer in zip(wanted, answers):
            if isinstance(answer, tuple) and answer[0] == RTM_NEWROUTE:
                out[address] = decode.next_hop(answer[1], self.ifname)
        return out

    def filter_packets(self, filters: Sequence[ops.FlowerFilter | ops.U32Filter]) -> list[int | None]:
        """How many packets went through each filter (one RTM_GETTFILTER each, all in one
        sendmsg, as `routes_to`); None for a filter the kernel does not have or cannot report."""
        out: list[int | None] = [None] * len(filters)
        wanted: list[int] = []
        requests: list[tuple[int, int, bytes]] = []
        for i, flt in enumerate(filters):
            try:
                requests.append(encode.filter_get(flt, self.ifindex))
            except (KeyError, ValueError):  # a device gone (UnknownDevice), or not encodable
                continue
            wanted.append(i)
        answers = self._sock.query(requests) if requests else []
        for i, answer in zip(wanted, answers):
            if isinstance(answer, tuple) and answer[0] == RTM_NEWTFILTER:
                out[i] = decode.filter_packets(memoryview(answer[1]))
        return out

    def addresses(self, dev: str) -> list[str]:
        """The IP addresses on `dev`, without prefix length (the server agent checks that every
        VIP is on lo). Raises UnknownDevice."""
        index = self.ifindex(dev)
        out = []
        for family in (AF_INET, AF_INET6):
            for kind, body in self._sock.dump(RTM_GETADDR, nla.IFADDRMSG.pack(family, 0, 0, 0, index)):
                if kind != RTM_NEWADDR or nla.IFADDRMSG.unpack_from(body)[4] != index:
                    continue
                attrs = nla.attrs(body, nla.IFADDRMSG.size)
                raw = attrs.get(IFA_LOCAL, attrs.get(IFA_ADDRESS))
                if raw is not None:
                    out.append(socket.inet_ntop(socket.AF_INET6 if family == AF_INET6 else socket.AF_INET, bytes(raw)))
        return out

    def add_address(self, dev: str, address: str) -> None:
        """Put ADDRESS (with its prefix length, e.g. a VIP as 10.0.0.100/32) on `dev` with one
        RTM_NEWADDR, for `node.setup: apply`. An address already there (EEXIST) counts as done, so
        applying twice, or racing an operator, is no failure. Raises OSError with the kernel's
        errno (ENODEV for an unknown device), ValueError for what is not an address."""
        self._links_fresh = False  # a device made since the last lookup is found
        try:
            index = self.ifindex(dev)
        except UnknownDevice:
            raise OSError(errno.ENODEV, f"no such device {dev}") from None
        [error] = self._sock.transact([encode.address_add(address, index)])
        if error is not None and error.errno != errno.EEXIST:
            raise OSError(error.errno, str(error))

    def dump_filters(
        self, dev: str, direction: ops.Direction = ops.Direction.EGRESS, ours_only: bool = True
    ) -> list[ops.Installed]:
        """Flower filters of one device, optionally including others' (to compare with tc)."""
        request = nla.TCMSG.pack(AF_UNSPEC, 0, 0, self.ifindex(dev), 0, encode.filter_parent(direction), 0)
        out = []
        for _kind, body in self._sock.dump(RTM_GETTFILTER, request):
            installed = decode.flower(body, self.ifname, require_cookie=ours_only)
            if installed is not None:
                out.append(installed)
        return out


ELEMENTS_PER_MESSAGE = 256  # about 14 KiB of IPv4 elements, 26 KiB of IPv6 ones


def _element_runs(operations: Sequence[ops.Operation]) -> Iterator[list[int]]:
    """Indexes of consecutive set element operations of one kind on one set, at most
    ELEMENTS_PER_MESSAGE each."""
    run: list[int] = []
    kind: tuple[type, str] | None = None
    for i, op in enumerate(operations):
        obj = op.obj
        this = (type(op), obj.set_name if isinstance(obj, ops.FastPathElement) else "")
        if run and (this != kind or len(run) == ELEMENTS_PER_MESSAGE):
            yield run
            run = []
        kind = this
        run.append(i)
    if run:
        yield run


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
    if (
        isinstance(obj, ops.FlowerFilter)
        and obj.offload == ops.OffloadPolicy.REQUIRED
        and error.errno in (errno.EOPNOTSUPP, errno.EINVAL)
    ):
        return f"offload required but device {obj.dev} cannot offload this filter: {error}"
    if isinstance(obj, ops.FlowerFilter) and error.errno == errno.EINVAL and "Qdisc" in error.message:
        return f"{error}; device {obj.dev} needs a clsact qdisc first"
    return str(error)
