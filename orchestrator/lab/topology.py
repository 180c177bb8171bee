"""Lab topology: a YAML file parsed into frozen dataclasses.

Validation happens here, once, so the builder (netns.py) can trust every name, address and label;
each error names the offending key path (e.g. `segments.lan.members.c9`) and what is wrong.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# A label-aware client runs the client agent (role: client configuration); apart from "client" so
# that what counts or loops over the plain clients is unchanged by it.
ROLES: tuple[str, ...] = ("client", "balancer", "fabric", "server", "label-aware-client")
CLIENT_ROLES: frozenset[str] = frozenset({"client", "label-aware-client"})
LABELED_ROLES: frozenset[str] = frozenset({"balancer", "server"})
SWITCH_NETNS = "mplsorch-sw"  # hidden namespace holding the bridges of >2-member segments
MAX_LABEL = 1048575  # 20-bit MPLS label space
FIRST_UNRESERVED_LABEL = 16
_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_DEV_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")


class TopologyError(ValueError):
    """A topology file is unusable; the message names the key and the problem."""


@dataclass(frozen=True)
class Route:
    """A static route of a node: `to` is a prefix or 'default'."""

    to: str
    via: IPAddress
    dev: str | None = None


@dataclass(frozen=True)
class Node:
    name: str
    role: str
    transport_label: int | None = None
    routes: tuple[Route, ...] = ()


@dataclass(frozen=True)
class Member:
    """One node's attachment to a segment: `address` is the first of `addresses` (at most one
    per address family, so a segment can be dual-stack)."""

    node: str
    dev: str
    address: IPAddress
    addresses: tuple[IPAddress, ...] = ()

    def __post_init__(self) -> None:
        if not self.addresses:
            object.__setattr__(self, "addresses", (self.address,))

    def of_version(self, version: int) -> IPAddress | None:
        return next((a for a in self.addresses if a.version == version), None)


@dataclass(frozen=True)
class Segment:
    """An L2 segment: a veth pair with 2 members, a bridge in SWITCH_NETNS with more."""

    name: str
    subnet: IPNetwork
    members: tuple[Member, ...]
    subnets: tuple[IPNetwork, ...] = ()  # all of them, `subnet` first: one per address family

    def __post_init__(self) -> None:
        if not self.subnets:
            object.__setattr__(self, "subnets", (self.subnet,))

    def prefixlen(self, version: int) -> int:
        return next(n.prefixlen for n in self.subnets if n.version == version)

    @property
    def is_bridge(self) -> bool:
        return len(self.members) > 2

    def member(self, node: str) -> Member | None:
        return next((m for m in self.members if m.node == node), None)


@dataclass(frozen=True)
class Topology:
    nodes: tuple[Node, ...]
    segments: tuple[Segment, ...]
    vips: tuple[IPAddress, ...]
    platform_labels: int = 100000
    source: str = "default"
    _by_name: dict[str, Node] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_name", {n.name: n for n in self.nodes})

    def node(self, name: str) -> Node:
        return self._by_name[name]

    def names(self, role: str | None = None) -> list[str]:
        return [n.name for n in self.nodes if role is None or n.role == role]

    def attachments(self, node: str) -> list[tuple[Segment, Member]]:
        """The node's interfaces, in segment order."""
        return [(s, m) for s in self.segments for m in s.members if m.node == node]

    def neighbours(self, node: str, role: str) -> list[tuple[Segment, Member, Member]]:
        """(segment, node's member, neighbour's member) for each neighbour of `role`."""
        out = []
        for seg, mine in self.attachments(node):
            out += [(seg, mine, m) for m in seg.members if m.node != node and self.node(m.node).role == role]
        return out


def _mapping(value: Any, path: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TopologyError(f"{path}: must be a mapping, got {type(value).__name__}")
    return value


def _keys(value: dict[str, Any], path: str, required: set[str], optional: set[str]) -> None:
    for key in value:
        if key not in required | optional:
            raise TopologyError(f"{path}.{key}: unknown key (allowed: {', '.join(sorted(required | optional))})")
    for key in sorted(required):
        if key not in value:
            raise TopologyError(f"{path}.{key}: missing key")


def _address(value: Any, path: str) -> IPAddress:
    try:
        return ipaddress.ip_address(str(value))
    except ValueError:
        raise TopologyError(f"{path}: {value!r} is not an IP address") from None


def _label(value: Any, path: str, platform_labels: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TopologyError(f"{path}: must be an integer label, got {value!r}")
    if not FIRST_UNRESERVED_LABEL <= value < platform_labels:
        raise TopologyError(
            f"{path}: label {value} outside {FIRST_UNRESERVED_LABEL}..{platform_labels - 1} "
            "(0-15 are reserved; platform_labels bounds the table)"
        )
    return value


def _routes(value: Any, path: str) -> tuple[Route, ...]:
    if not isinstance(value, list):
        raise TopologyError(f"{path}: must be a list of {{to, via[, dev]}}")
    out = []
    for i, raw in enumerate(value):
        rpath = f"{path}[{i}]"
        r = _mapping(raw, rpath)
        _keys(r, rpath, {"to", "via"}, {"dev"})
        to = str(r["to"])
        if to != "default":
            try:
                to = str(ipaddress.ip_network(to, strict=True))
            except ValueError as e:
                raise TopologyError(f"{rpath}.to: {to!r} is not a prefix or 'default' ({e})") from None
        dev = r.get("dev")
        if dev is not None and not _DEV_RE.match(str(dev)):
            raise TopologyError(f"{rpath}.dev: {dev!r} is not a valid interface name")
        out.append(Route(to=to, via=_address(r["via"], f"{rpath}.via"), dev=None if dev is None else str(dev)))
    return tuple(out)


def _nodes(raw: Any, platform_labels: int) -> tuple[Node, ...]:
    nodes = []
    labels: dict[int, str] = {}
    for name, spec in _mapping(raw, "nodes").items():
        path = f"nodes.{name}"
        if not isinstance(name, str) or not _NAME_RE.match(name) or name == SWITCH_NETNS:
            raise TopologyError(
                f"{path}: bad node name (lower-case letter, then [a-z0-9-], at most 32; not {SWITCH_NETNS!r})"
            )
        spec = _mapping(spec if spec is not None else {}, path)
        _keys(spec, path, {"role"}, {"transport_label", "routes"})
        role = spec["role"]
        if role not in ROLES:
            raise TopologyError(f"{path}.role: unknown role {role!r} (one of {', '.join(ROLES)})")
        label = spec.get("transport_label")
        if label is not None:
            if role not in LABELED_ROLES:
                raise TopologyError(f"{path}.transport_label: only balancer and server nodes have one, not {role}")
            label = _label(label, f"{path}.transport_label", platform_labels)
            if label in labels:
                raise TopologyError(f"{path}.transport_label: {label} already used by node {labels[label]}")
            labels[label] = name
        nodes.append(Node(name, role, label, _routes(spec.get("routes", []), f"{path}.routes")))
    if not nodes:
        raise TopologyError("nodes: no nodes defined")
    return tuple(nodes)


def _subnets(raw: Any, path: str) -> tuple[IPNetwork, ...]:
    """One subnet, or a list of at most one per address family (dual stack)."""
    out: list[IPNetwork] = []
    for value in raw if isinstance(raw, list) else [raw]:
        try:
            net = ipaddress.ip_network(str(value), strict=True)
        except ValueError as e:
            raise TopologyError(f"{path}: {value!r} is not a network ({e})") from None
        if any(n.version == net.version for n in out):
            raise TopologyError(f"{path}: two IPv{net.version} subnets (one per family)")
        out.append(net)
    if not out:
        raise TopologyError(f"{path}: no subnet")
    return tuple(out)


def _segments(raw: Any, nodes: dict[str, Node]) -> tuple[Segment, ...]:
    segments = []
    seen_addr: dict[IPAddress, str] = {}
    seen_dev: dict[tuple[str, str], str] = {}
    for name, spec in _mapping(raw, "segments").items():
        path = f"segments.{name}"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise TopologyError(f"{path}: bad segment name (lower-case letter, then [a-z0-9-], at most 32)")
        spec = _mapping(spec, path)
        _keys(spec, path, {"subnet", "members"}, set())
        subnets = _subnets(spec["subnet"], f"{path}.subnet")
        members = []
        for node, mspec in _mapping(spec["members"], f"{path}.members").items():
            mpath = f"{path}.members.{node}"
            if node not in nodes:
                raise TopologyError(f"{mpath}: not a node (nodes: {', '.join(nodes)})")
            mspec = _mapping(mspec, mpath)
            _keys(mspec, mpath, {"dev", "address"}, set())
            dev = str(mspec["dev"])
            if not _DEV_RE.match(dev) or dev == "lo":
                raise TopologyError(f"{mpath}.dev: {dev!r} is not a valid interface name (at most 15 chars, not lo)")
            if (node, dev) in seen_dev:
                raise TopologyError(f"{mpath}.dev: {node} already has {dev} on segment {seen_dev[node, dev]}")
            seen_dev[node, dev] = name
            raw_addrs = mspec["address"] if isinstance(mspec["address"], list) else [mspec["address"]]
            addrs: list[IPAddress] = []
            for addr in (_address(a, f"{mpath}.address") for a in raw_addrs):
                subnet = next((n for n in subnets if n.version == addr.version), None)
                if subnet is None or addr not in subnet:
                    raise TopologyError(
                        f"{mpath}.address: {addr} is outside the subnet {' and '.join(map(str, subnets))}"
                    )
                if (
                    subnet.version == 4
                    and subnet.prefixlen < 31
                    and addr in (subnet.network_address, subnet.broadcast_address)
                ):
                    raise TopologyError(f"{mpath}.address: {addr} is the network or broadcast address of {subnet}")
                if addr in seen_addr:
                    raise TopologyError(f"{mpath}.address: duplicate address {addr} (also {seen_addr[addr]})")
                if any(a.version == addr.version for a in addrs):
                    raise TopologyError(f"{mpath}.address: two IPv{addr.version} addresses (one per family)")
                seen_addr[addr] = mpath
                addrs.append(addr)
            if not addrs:
                raise TopologyError(f"{mpath}.address: no address")
            members.append(Member(node, dev, addrs[0], tuple(addrs)))
        if len(members) < 2:
            raise TopologyError(f"{path}.members: a segment needs at least 2 members, has {len(members)}")
        segments.append(Segment(name, subnets[0], tuple(members), subnets))
    return tuple(segments)


def _check_reachability(topo: Topology) -> None:
    """Refuse topologies where a derived route or label route would have no next hop."""
    for node in topo.nodes:
        has_default = any(r.to == "default" for r in node.routes)
        if node.role in CLIENT_ROLES and not has_default and not topo.neighbours(node.name, "balancer"):
            raise TopologyError(
                f"nodes.{node.name}: client shares no segment with a balancer "
                "(attach it to one, or give it a 'default' route)"
            )
        if node.role == "server" and not has_default and not topo.neighbours(node.name, "fabric"):
            raise TopologyError(
                f"nodes.{node.name}: server shares no segment with a fabric node "
                "(attach it to one, or give it a 'default' route)"
            )
        if node.role == "balancer" and topo.vips and not topo.neighbours(node.name, "fabric"):
            raise TopologyError(
                f"nodes.{node.name}: balancer shares no segment with a fabric node, "
                "so the VIPs cannot be routed into the fabric"
            )
        if node.transport_label is not None and topo.names("fabric") and not topo.neighbours(node.name, "fabric"):
            raise TopologyError(f"nodes.{node.name}.transport_label: node shares no segment with a fabric node")
        if not topo.attachments(node.name):
            raise TopologyError(f"nodes.{node.name}: node is a member of no segment")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (plain YAML keeps the last one silently)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise TopologyError(f"duplicate key {key!r} (line {key_node.start_mark.line + 1})")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse(text: str, source: str = "<string>") -> Topology:
    """Parse and validate a topology document."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as e:
        raise TopologyError(f"{source}: not valid YAML: {e}") from None
    top = _mapping(raw, "topology")
    _keys(top, "topology", {"nodes", "segments"}, {"vips", "platform_labels"})
    platform_labels = top.get("platform_labels", 100000)
    if (
        not isinstance(platform_labels, int)
        or isinstance(platform_labels, bool)
        or not FIRST_UNRESERVED_LABEL < platform_labels <= MAX_LABEL + 1
    ):
        raise TopologyError(
            f"platform_labels: must be an integer in {FIRST_UNRESERVED_LABEL + 1}..{MAX_LABEL + 1}, "
            f"got {platform_labels!r}"
        )
    nodes = _nodes(top["nodes"], platform_labels)
    by_name = {n.name: n for n in nodes}
    segments = _segments(top["segments"], by_name)
    vips_raw = top.get("vips", [])
    if not isinstance(vips_raw, list):
        raise TopologyError("vips: must be a list of addresses")
    vips = tuple(_address(v, f"vips[{i}]") for i, v in enumerate(vips_raw))
    used = {m.address for s in segments for m in s.members}
    for i, vip in enumerate(vips):
        if vip in used or vips.index(vip) != i:
            raise TopologyError(f"vips[{i}]: duplicate address {vip}")
    topo = Topology(nodes, segments, vips, platform_labels, source)
    _check_reachability(topo)
    return topo


def load(path: str | None = None) -> Topology:
    """Load a topology file, or the embedded default when `path` is None."""
    if path is None:
        text = resources.files("orchestrator.lab").joinpath("default.yaml").read_text(encoding="utf-8")
        return parse(text, "default")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise TopologyError(f"{path}: cannot read topology file: {e.strerror}") from None
    return parse(text, path)


def default_text() -> str:
    """The embedded default topology, verbatim (for documentation and `lab` commands)."""
    return resources.files("orchestrator.lab").joinpath("default.yaml").read_text(encoding="utf-8")
