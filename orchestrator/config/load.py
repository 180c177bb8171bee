"""Parse and validate a balancer configuration file.

The YAML is composed (SafeLoader) into a node tree that keeps line marks, and walked here by hand,
so that every error says where it is: `ConfigError` reads "FILE:LINE: KEY.PATH: message". The first
error found is raised. Nothing here touches the kernel or the network.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from orchestrator.config.model import (
    MAX_LABEL, MIN_LABEL, Admission, BalancerConfig, FailPolicy, Interfaces, IPAddress, LabelAllocation,
    LabelConfig, NfqueueConfig, NodeConfig, Pool, Protocol, RateLimit, RateUnit, RefuseWith, Role, Scheduler,
    Server, Service, SessionKeyKind, pair_labels,
)

E = TypeVar("E", bound=Enum)

_TAG = "tag:yaml.org,2002:"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_DEV_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,14}$")   # IFNAMSIZ - 1, no '/' or spaces
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)\s*$")
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class ConfigError(ValueError):
    """A configuration is unusable. str(): "FILE:LINE: KEY.PATH: message" (LINE and KEY.PATH are
    left out when unknown, e.g. for a file that cannot be read)."""

    def __init__(self, source: str, line: int | None, path: str | None, message: str) -> None:
        self.source, self.line, self.path, self.message = source, line, path, message
        parts = [source] + ([str(line)] if line is not None else [])
        text = ":".join(parts) + ": " + (f"{path}: " if path else "") + message
        super().__init__(text)


@dataclass
class _V:
    """A YAML node at a key path; `line` is the line of the key that introduced it."""
    node: Node
    path: str
    line: int

    @property
    def vline(self) -> int:
        """Line of the value itself."""
        return self.node.start_mark.line + 1


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(node: Node) -> str:
    if isinstance(node, MappingNode):
        return "a mapping"
    if isinstance(node, SequenceNode):
        return "a list"
    if node.tag == _TAG + "null":
        return "nothing (null)"
    return repr(node.value)


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class _Parser:
    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[str, int] = {}          # key path -> line of its value, for semantic errors
        self.key_lines: dict[str, int] = {}      # key path -> line of its key
        self._constructor = yaml.constructor.SafeConstructor()

    # ---- errors ----
    def error(self, line: int | None, path: str | None, message: str) -> ConfigError:
        return ConfigError(self.source, line, path, message)

    def at(self, path: str, message: str) -> ConfigError:
        """An error on a value already parsed (semantic checks)."""
        return self.error(self.lines.get(path), path, message)

    def _seen(self, v: _V) -> _V:
        self.lines[v.path] = v.vline
        return v

    # ---- structure ----
    def mapping(self, v: _V, allowed: Iterable[str] | None, required: Iterable[str] = ()) -> dict[str, _V]:
        """A mapping's entries by key; rejects duplicate keys, unknown keys (when `allowed` is given)
        and missing required keys."""
        self._seen(v)
        if not isinstance(v.node, MappingNode):
            raise self.error(v.vline, v.path or "(document)", f"expected a mapping, got {_describe(v.node)}")
        allowed = list(allowed) if allowed is not None else None
        out: dict[str, _V] = {}
        for knode, vnode in v.node.value:
            kline = knode.start_mark.line + 1
            if isinstance(knode, ScalarNode) and knode.tag == _TAG + "merge":
                raise self.error(kline, _join(v.path, "<<"), "merge keys (<<) are not supported")
            if not isinstance(knode, ScalarNode) or knode.tag != _TAG + "str":
                raise self.error(kline, v.path or "(document)",
                                 f"keys must be plain strings, got {_describe(knode)}")
            key = knode.value
            path = _join(v.path, key)
            if key in out:
                raise self.error(kline, path, f"duplicate key (first given at line {out[key].line})")
            if allowed is not None and key not in allowed:
                raise self.error(kline, path, "unknown key" + _did_you_mean(key, allowed))
            out[key] = self._seen(_V(vnode, path, kline))
            self.key_lines[path] = kline
        for key in required:
            if key not in out:
                raise self.error(v.line, _join(v.path, key), "required key is missing")
        return out

    def sequence(self, v: _V) -> list[_V]:
        if not isinstance(v.node, SequenceNode):
            raise self.error(v.vline, v.path, f"expected a list, got {_describe(v.node)}")
        return [self._seen(_V(n, f"{v.path}[{i}]", n.start_mark.line + 1)) for i, n in enumerate(v.node.value)]

    # ---- scalars ----
    def _scalar(self, v: _V, want: str) -> Any:
        if not isinstance(v.node, ScalarNode):
            raise self.error(v.vline, v.path, f"expected {want}, got {_describe(v.node)}")
        return self._constructor.construct_object(v.node)

    def is_null(self, v: _V) -> bool:
        return isinstance(v.node, ScalarNode) and v.node.tag == _TAG + "null"

    def integer(self, v: _V, lo: int | None = None, hi: int | None = None, what: str = "") -> int:
        value = self._scalar(v, "an integer")
        if v.node.tag != _TAG + "int":
            raise self.error(v.vline, v.path, f"expected an integer, got {_describe(v.node)}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            rng = f"{lo}..{hi}" if lo is not None and hi is not None else (f">= {lo}" if lo is not None
                                                                          else f"<= {hi}")
            raise self.error(v.vline, v.path, f"{(what + ' ') if what else ''}{value} is out of range: must be {rng}")
        return value

    def string(self, v: _V) -> str:
        self._scalar(v, "a string")
        if v.node.tag != _TAG + "str" or v.node.value == "":
            raise self.error(v.vline, v.path, f"expected a non-empty string, got {_describe(v.node)}")
        return v.node.value

    def name(self, key: str, path: str, line: int, what: str) -> str:
        if not _NAME_RE.match(key):
            raise self.error(line, path, f"invalid {what} name {key!r}: use letters, digits, '-' and '_' "
                                         "(at most 64, starting with a letter or digit)")
        return key

    def address(self, v: _V) -> IPAddress:
        self._scalar(v, "an IP address")
        text = v.node.value
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            raise self.error(v.vline, v.path, f"{text!r} is not an IP address") from None
        if addr.is_unspecified or addr.is_multicast:
            raise self.error(v.vline, v.path, f"{text!r} is not a usable unicast address")
        return addr

    def choice(self, v: _V, enum: type[E], what: str) -> E:
        text = self.string(v)
        try:
            return enum(text)
        except ValueError:
            names = [e.value for e in enum]
            raise self.error(v.vline, v.path, f"unknown {what} {text!r}; expected one of {', '.join(names)}"
                             + _did_you_mean(text, names)) from None

    def duration(self, v: _V) -> float:
        """"30s", "5m", "1h", "500ms" or a number of seconds; must be >= 0."""
        value = self._scalar(v, "a duration")
        tag = v.node.tag
        if tag in (_TAG + "int", _TAG + "float"):
            seconds = float(value)
        elif tag == _TAG + "str" and (m := _DURATION_RE.match(value)):
            seconds = float(m.group(1)) * _UNITS[m.group(2)]
        else:
            raise self.error(v.vline, v.path, f"{_describe(v.node)} is not a duration: write e.g. "
                                              "\"30s\", \"5m\", \"1h\", \"500ms\" or a number of seconds")
        if not seconds >= 0 or seconds == float("inf"):      # also rejects NaN
            raise self.error(v.vline, v.path, f"{v.node.value} is out of range: must be >= 0")
        return seconds

    def int_pair(self, v: _V, lo: int, hi: int, strict: bool, what: str) -> tuple[int, int]:
        """[first, last] with lo <= first (<|<=) last <= hi."""
        items = self.sequence(v)
        if len(items) != 2:
            raise self.error(v.vline, v.path, f"expected [first, last] (two integers), got {len(items)} items")
        first, last = (self.integer(i) for i in items)
        for n in (first, last):
            if not lo <= n <= hi:
                raise self.error(v.vline, v.path, f"{what} {n} is out of range: must be within {lo}..{hi}")
        if first > last or (strict and first == last):
            rel = "<" if strict else "<="
            raise self.error(v.vline, v.path, f"first {first} must be {rel} last {last}")
        return first, last


# ---- sections ----

_TOP = ("role", "node", "interfaces", "labels", "nfqueue", "pools", "services")
_TOP_REQUIRED = ("role", "node", "interfaces", "labels", "pools", "services")


def _node(p: _Parser, v: _V) -> NodeConfig:
    m = p.mapping(v, ("transport_label", "control_socket"), ("transport_label",))
    label = p.integer(m["transport_label"], MIN_LABEL, MAX_LABEL, "transport label")
    sock = p.string(m["control_socket"]) if "control_socket" in m else NodeConfig.control_socket
    return NodeConfig(label, sock)


def _devices(p: _Parser, v: _V) -> tuple[str, ...]:
    items = p.sequence(v)
    if not items:
        raise p.error(v.vline, v.path, "must name at least one interface")
    out: list[str] = []
    for i in items:
        dev = p.string(i)
        if not _DEV_RE.match(dev):
            raise p.error(i.vline, i.path, f"{dev!r} is not a valid interface name")
        if dev in out:
            raise p.error(i.vline, i.path, f"interface {dev!r} is listed twice")
        out.append(dev)
    return tuple(out)


def _interfaces(p: _Parser, v: _V) -> Interfaces:
    keys = ("clients", "fabric", "fabric_next_hop")
    m = p.mapping(v, keys, keys)
    clients = _devices(p, m["clients"])
    fabric = _devices(p, m["fabric"])
    both = [d for d in fabric if d in clients]
    if both:
        raise p.error(m["fabric"].vline, m["fabric"].path,
                      f"interface {both[0]!r} is also in interfaces.clients: client-facing and fabric "
                      "interfaces must be disjoint")
    return Interfaces(clients, fabric, p.address(m["fabric_next_hop"]))


def _labels(p: _Parser, v: _V) -> LabelConfig:
    m = p.mapping(v, ("range", "allocation", "hold_down"), ("range",))
    rng = p.int_pair(m["range"], MIN_LABEL, MAX_LABEL, strict=True, what="label")
    if pair_labels(*rng) == 0:
        raise p.error(m["range"].vline, m["range"].path, "the range holds no (odd C2S, even S2C) label pair")
    alloc = p.choice(m["allocation"], LabelAllocation, "label allocation") if "allocation" in m \
        else LabelConfig.allocation
    hold = p.duration(m["hold_down"]) if "hold_down" in m else LabelConfig.hold_down
    return LabelConfig(rng, alloc, hold)


def _rate_limit(p: _Parser, v: _V) -> RateLimit | None:
    if p.is_null(v):
        return None
    m = p.mapping(v, ("rate", "burst"), ("rate",))
    rv = m["rate"]
    text = p.string(rv)
    match = _RATE_RE.match(text)
    units = [u.value for u in RateUnit]
    if not match or match.group(2) not in units:
        raise p.error(rv.vline, rv.path, f"{text!r} is not a rate: write N/second or N/minute")
    count = int(match.group(1))
    if count < 1:
        raise p.error(rv.vline, rv.path, f"{text!r}: the rate must be at least 1")
    burst = p.integer(m["burst"], 1, None, "burst") if "burst" in m else RateLimit.burst
    return RateLimit(count, RateUnit(match.group(2)), burst)


def _nfqueue(p: _Parser, v: _V) -> NfqueueConfig:
    m = p.mapping(v, ("queues", "batch", "rate_limit"))
    d = NfqueueConfig()
    queues = p.int_pair(m["queues"], 0, 65535, strict=False, what="queue") if "queues" in m else d.queues
    batch = p.integer(m["batch"], 1, None, "batch") if "batch" in m else d.batch
    rate = _rate_limit(p, m["rate_limit"]) if "rate_limit" in m else d.rate_limit
    return NfqueueConfig(queues, batch, rate)


_SERVER_KEYS = ("address", "transport_label", "weight", "max_sessions", "label_block")


def _server(p: _Parser, name: str, v: _V) -> Server:
    m = p.mapping(v, _SERVER_KEYS, ("address", "transport_label"))
    max_sessions = None
    if "max_sessions" in m and not p.is_null(m["max_sessions"]):
        max_sessions = p.integer(m["max_sessions"], 1, None, "max_sessions")
    block = None
    if "label_block" in m:
        block = p.int_pair(m["label_block"], MIN_LABEL, MAX_LABEL, strict=True, what="label")
    return Server(
        name=name,
        address=p.address(m["address"]),
        transport_label=p.integer(m["transport_label"], MIN_LABEL, MAX_LABEL, "transport label"),
        weight=p.integer(m["weight"], 0, None, "weight") if "weight" in m else Server.weight,
        max_sessions=max_sessions,
        label_block=block,
    )


def _pools(p: _Parser, v: _V) -> tuple[Pool, ...]:
    pools: list[Pool] = []
    entries = p.mapping(v, None)
    if not entries:
        raise p.error(v.vline, v.path, "at least one pool is required")
    for pname, pv in entries.items():
        p.name(pname, pv.path, pv.line, "pool")
        pm = p.mapping(pv, ("servers",), ("servers",))
        sv = pm["servers"]
        servers = []
        sentries = p.mapping(sv, None)
        if not sentries:
            raise p.error(sv.vline, sv.path, "a pool needs at least one server")
        for sname, s in sentries.items():
            p.name(sname, s.path, s.line, "server")
            servers.append(_server(p, sname, s))
        pools.append(Pool(pname, tuple(servers)))
    return tuple(pools)


_SERVICE_KEYS = ("vip", "protocol", "ports", "pool", "session_key", "persistence_timeout", "scheduler",
                 "admission", "fail_policy")


def _ports(p: _Parser, v: _V) -> tuple[int, ...]:
    items = p.sequence(v)
    if not items:
        raise p.error(v.vline, v.path, "must list at least one port")
    out: list[int] = []
    for i in items:
        port = p.integer(i, 1, 65535, "port")
        if port in out:
            raise p.error(i.vline, i.path, f"port {port} is listed twice")
        out.append(port)
    return tuple(out)


def _admission(p: _Parser, v: _V | None, protocol: Protocol) -> Admission:
    default_refuse = RefuseWith.RST if protocol is Protocol.TCP else RefuseWith.ICMP
    if v is None:
        return Admission(refuse_with=default_refuse)
    m = p.mapping(v, ("max_sessions", "min_free_labels", "refuse_with"))
    max_sessions = None
    if "max_sessions" in m and not p.is_null(m["max_sessions"]):
        max_sessions = p.integer(m["max_sessions"], 1, None, "max_sessions")
    free = p.integer(m["min_free_labels"], 0, None, "min_free_labels") if "min_free_labels" in m \
        else Admission.min_free_labels
    refuse = default_refuse
    if "refuse_with" in m:
        refuse = p.choice(m["refuse_with"], RefuseWith, "refusal")
        if refuse is RefuseWith.RST and protocol is not Protocol.TCP:
            raise p.error(m["refuse_with"].vline, m["refuse_with"].path,
                          f"rst can only refuse tcp sessions, this service is {protocol.value}; use icmp")
    return Admission(max_sessions, free, refuse)


def _service(p: _Parser, name: str, v: _V) -> Service:
    m = p.mapping(v, _SERVICE_KEYS, ("vip", "protocol", "pool"))
    vip = p.address(m["vip"])
    protocol = p.choice(m["protocol"], Protocol, "protocol")
    if protocol is Protocol.ESP:
        if "ports" in m:
            raise p.error(m["ports"].line, m["ports"].path, "esp has no ports: remove the key")
        ports: tuple[int, ...] = ()
    elif "ports" not in m:
        raise p.error(v.line, _join(v.path, "ports"), "required key is missing")
    else:
        ports = _ports(p, m["ports"])
    key = p.choice(m["session_key"], SessionKeyKind, "session key") if "session_key" in m \
        else Service.session_key
    if key in (SessionKeyKind.IPV6_IID, SessionKeyKind.MIP6_HOME_ADDRESS) and vip.version != 6:
        raise p.error(m["session_key"].vline, m["session_key"].path,
                      f"{key.value} keys IPv6 clients, but vip {vip} is IPv4")
    return Service(
        name=name, vip=vip, protocol=protocol, ports=ports,
        pool=p.string(m["pool"]),
        session_key=key,
        persistence_timeout=p.duration(m["persistence_timeout"]) if "persistence_timeout" in m
        else Service.persistence_timeout,
        scheduler=p.choice(m["scheduler"], Scheduler, "scheduler") if "scheduler" in m else Service.scheduler,
        admission=_admission(p, m.get("admission"), protocol),
        fail_policy=p.choice(m["fail_policy"], FailPolicy, "fail policy") if "fail_policy" in m
        else Service.fail_policy,
    )


def _services(p: _Parser, v: _V) -> tuple[Service, ...]:
    entries = p.mapping(v, None)
    if not entries:
        raise p.error(v.vline, v.path, "at least one service is required")
    out = []
    for name, sv in entries.items():
        p.name(name, sv.path, sv.line, "service")
        out.append(_service(p, name, sv))
    return tuple(out)


# ---- cross-checks ----

def _check(p: _Parser, cfg: BalancerConfig) -> None:
    labels = cfg.labels
    first, last = labels.range

    # A server in two pools must be defined identically there; it is then one server.
    where: dict[str, tuple[str, Server]] = {}
    for pool in cfg.pools:
        for s in pool.servers:
            if s.name in where and where[s.name][1] != s:
                other = where[s.name][0]
                path = f"pools.{pool.name}.servers.{s.name}"
                raise p.error(p.key_lines.get(path), path,
                           f"server {s.name!r} is also defined in pool {other!r} "
                           f"(pools.{other}.servers.{s.name}) with different settings; "
                           "a server in several pools must be defined identically")
            where.setdefault(s.name, (pool.name, s))
    servers = {name: (pool, s) for name, (pool, s) in where.items()}

    # Transport labels: unique across the node and all servers, outside the session label range.
    owners: dict[int, str] = {cfg.node.transport_label: "node"}
    if first <= cfg.node.transport_label <= last:
        raise p.at("node.transport_label", f"transport label {cfg.node.transport_label} lies inside "
                                           f"labels.range {first}..{last}")
    for name, (pool, s) in servers.items():
        path = f"pools.{pool}.servers.{name}.transport_label"
        if s.transport_label in owners:
            raise p.at(path, f"transport label {s.transport_label} is already used by {owners[s.transport_label]}")
        if first <= s.transport_label <= last:
            raise p.at(path, f"transport label {s.transport_label} lies inside labels.range {first}..{last}")
        owners[s.transport_label] = f"server {name!r}"

    # Label blocks.
    blocks: list[tuple[int, int, str]] = []
    for name, (pool, s) in servers.items():
        path = f"pools.{pool}.servers.{name}"
        if labels.allocation is LabelAllocation.POOL:
            if s.label_block is not None:
                raise p.at(path + ".label_block", "label_block is only used with labels.allocation: server-blocks")
            continue
        if s.label_block is None:
            raise p.error(p.key_lines.get(path), path + ".label_block",
                          "required key is missing (labels.allocation is server-blocks)")
        bf, bl = s.label_block
        if not (first <= bf and bl <= last):
            raise p.at(path + ".label_block", f"block {bf}..{bl} is not inside labels.range {first}..{last}")
        if pair_labels(bf, bl) == 0:
            raise p.at(path + ".label_block", f"block {bf}..{bl} holds no (odd C2S, even S2C) label pair")
        for of, ol, other in blocks:
            if bf <= ol and of <= bl:
                raise p.at(path + ".label_block", f"block {bf}..{bl} of server {name!r} overlaps block "
                                                  f"{of}..{ol} of server {other!r}")
        blocks.append((bf, bl, name))

    # Services: pools exist, no two services claim the same vip/protocol/port, label headroom.
    pool_names = [pl.name for pl in cfg.pools]
    claimed: dict[tuple[Any, ...], str] = {}
    for svc in cfg.services:
        base = f"services.{svc.name}"
        if svc.pool not in pool_names:
            raise p.at(base + ".pool", f"no pool named {svc.pool!r}" + _did_you_mean(svc.pool, pool_names))
        for port in svc.ports or (None,):
            k = (svc.vip, svc.protocol, port)
            if k in claimed:
                what = f"{svc.vip} {svc.protocol.value}" + (f" port {port}" if port is not None else "")
                raise p.at(base + (".ports" if port is not None else ".vip"),
                           f"{what} is already served by service {claimed[k]!r}")
            claimed[k] = svc.name
        if labels.allocation is LabelAllocation.POOL:
            size, of = labels.size, "the label pool"
        else:
            pool = cfg.pool(svc.pool)
            size = sum(pair_labels(*s.label_block) for s in pool.servers if s.label_block)
            of = f"the label blocks of pool {svc.pool!r}"
        if svc.admission.min_free_labels >= size:
            path = base + ".admission.min_free_labels"
            line = p.lines.get(path, p.key_lines.get(base + ".admission", p.key_lines.get(base)))
            raise p.error(line, path, f"{svc.admission.min_free_labels} must be smaller than {of} "
                                      f"({size} usable labels)")


def parse_config(text: str, source: str = "<string>") -> BalancerConfig:
    """Parse and validate a balancer configuration; raise ConfigError on the first problem."""
    p = _Parser(source)
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        msg = " ".join(x for x in (e.context, e.problem) if x)
        raise p.error(line, "(yaml)", f"not valid YAML: {msg}") from None
    except yaml.YAMLError as e:
        raise p.error(None, "(yaml)", f"not valid YAML: {e}") from None
    if root is None:
        raise p.error(1, "(document)", "the configuration is empty")
    top = p.mapping(_V(root, "", root.start_mark.line + 1), _TOP, _TOP_REQUIRED)
    role = p.choice(top["role"], Role, "role")
    cfg = BalancerConfig(
        role=role,
        node=_node(p, top["node"]),
        interfaces=_interfaces(p, top["interfaces"]),
        labels=_labels(p, top["labels"]),
        pools=_pools(p, top["pools"]),
        services=_services(p, top["services"]),
        nfqueue=_nfqueue(p, top["nfqueue"]) if "nfqueue" in top else NfqueueConfig(),
        source=source,
    )
    _check(p, cfg)
    return cfg


def load_config(path: str | Path) -> BalancerConfig:
    """Read, parse and validate a balancer configuration file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, None, None, "cannot read the configuration: no such file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(source, None, None, f"cannot read the configuration: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise ConfigError(source, None, None, f"cannot read the configuration: {e.strerror or e}") from None
    return parse_config(text, source)
