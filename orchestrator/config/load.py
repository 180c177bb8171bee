"""Parse and validate a configuration file of either role.

`parse_config` reads `role` first, then the keys of that role: the balancer's sections are parsed
here, the server's in `server.py`; the YAML walker with its line-marked errors is `parser.py`.
The first error found is raised as `ConfigError` ("FILE:LINE: KEY.PATH: message"). Nothing here
touches the kernel or the network.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from yaml.nodes import ScalarNode

from orchestrator.config.client import CLIENT_KEYS, ClientConfig, parse_client
from orchestrator.config.cluster import parse_cluster
from orchestrator.config.model import (
    MAX_LABEL,
    MIN_LABEL,
    Admission,
    BalancerConfig,
    ClientsConfig,
    FailPolicy,
    HealthCheck,
    HealthCheckType,
    Interfaces,
    LabelAllocation,
    LabelConfig,
    NfqueueConfig,
    NodeConfig,
    Pool,
    Protocol,
    RateLimit,
    RateUnit,
    RefuseWith,
    Role,
    Scheduler,
    Server,
    ServerFailure,
    Service,
    SessionKeyKind,
    SessionsConfig,
    Setup,
    pair_labels,
)
from orchestrator.config.parser import ConfigError, Parser, YamlValue, did_you_mean, join_path
from orchestrator.config.parser import parse_metrics as _metrics
from orchestrator.config.server import SERVER_KEYS, ServerConfig, parse_server
from orchestrator.dataplane.handles import FILTERS_PER_SESSION
from orchestrator.dataplane.ops import OffloadPolicy

__all__ = [
    "ConfigError",
    "load_balancer_config",
    "load_client_config",
    "load_config",
    "load_server_config",
    "parse_config",
]

MAX_WORKERS = 64  # nfqueue.workers: worker processes (each one queue, one share of the labels)
_RATE_RE = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+)\s*$")

# ---- sections ----

_TOP = (
    "role",
    "node",
    "interfaces",
    "clients",
    "labels",
    "nfqueue",
    "sessions",
    "pools",
    "services",
    "metrics",
    "cluster",
)
_TOP_REQUIRED = ("role", "node", "interfaces", "labels", "pools", "services")


def _node(p: Parser, v: YamlValue) -> NodeConfig:
    m = p.mapping(v, ("transport_label", "control_socket", "control_group", "setup"), ("transport_label",))
    label = p.integer(m["transport_label"], MIN_LABEL, MAX_LABEL, "transport label")
    sock = p.string(m["control_socket"]) if "control_socket" in m else NodeConfig.control_socket
    setup = p.choice(m["setup"], Setup, "setup mode") if "setup" in m else NodeConfig.setup
    group = p.group(m["control_group"]) if "control_group" in m else None
    return NodeConfig(label, sock, setup, group)


def _interfaces(p: Parser, v: YamlValue) -> Interfaces:
    keys = ("clients", "fabric", "fabric_next_hop")
    m = p.mapping(v, (*keys, "offload"), keys)
    clients = p.devices(m["clients"])
    fabric = p.devices(m["fabric"])
    both = [d for d in fabric if d in clients]
    if both:
        raise p.error(
            m["fabric"].vline,
            m["fabric"].path,
            f"interface {both[0]!r} is also in interfaces.clients: client-facing and fabric "
            "interfaces must be disjoint",
        )
    offload = (
        _offload(p, m["offload"], fabric) if "offload" in m else tuple((dev, OffloadPolicy.AUTO) for dev in fabric)
    )
    return Interfaces(clients, fabric, p.address(m["fabric_next_hop"]), offload)


def _offload(p: Parser, v: YamlValue, fabric: tuple[str, ...]) -> tuple[tuple[str, OffloadPolicy], ...]:
    """`interfaces.offload`: one word for every fabric interface, or a mapping of fabric
    interface -> word; every fabric interface gets its policy (`auto` where not given), so what
    `config show` prints reads back equal."""
    if isinstance(v.node, ScalarNode):
        policy = p.choice(v, OffloadPolicy, "offload policy")
        return tuple((dev, policy) for dev in fabric)
    given = {}
    for dev, value in p.mapping(v, None).items():
        if dev not in fabric:
            raise p.error(
                value.line,
                value.path,
                f"interface {dev!r} is not in interfaces.fabric: the offload "
                "policy is for the fabric links, where the filters are" + did_you_mean(dev, fabric),
            )
        given[dev] = p.choice(value, OffloadPolicy, "offload policy")
    return tuple((dev, given.get(dev, OffloadPolicy.AUTO)) for dev in fabric)


def _clients(p: Parser, v: YamlValue, client_devs: tuple[str, ...]) -> ClientsConfig:
    m = p.mapping(v, ("label_aware", "label_aware_interfaces"))
    devs: tuple[str, ...] = ()
    if "label_aware_interfaces" in m and not p.is_null(m["label_aware_interfaces"]):
        dv = m["label_aware_interfaces"]
        devs = p.devices(dv) if p.sequence(dv) else ()
        for i, dev in enumerate(devs):
            if dev not in client_devs:
                item = p.sequence(dv)[i]
                raise p.error(
                    item.vline,
                    item.path,
                    f"interface {dev!r} is not in interfaces.clients: MPLS input is enabled only on "
                    "client interfaces that label-aware clients send from" + did_you_mean(dev, client_devs),
                )
    if "label_aware" not in m or p.is_null(m["label_aware"]):
        return ClientsConfig(label_aware_interfaces=devs)
    out: list[Any] = []
    for item in p.sequence(m["label_aware"]):
        net = p.prefix(item)
        if net in out:
            raise p.error(item.vline, item.path, f"prefix {net} is listed twice")
        out.append(net)
    return ClientsConfig(tuple(out), devs)


def _labels(p: Parser, v: YamlValue) -> LabelConfig:
    m = p.mapping(v, ("range", "allocation", "hold_down"), ("range",))
    rng = p.int_pair(m["range"], MIN_LABEL, MAX_LABEL, strict=True, what="label")
    if pair_labels(*rng) == 0:
        raise p.error(m["range"].vline, m["range"].path, "the range holds no (odd C2S, even S2C) label pair")
    alloc = (
        p.choice(m["allocation"], LabelAllocation, "label allocation") if "allocation" in m else LabelConfig.allocation
    )
    hold = p.duration(m["hold_down"]) if "hold_down" in m else LabelConfig.hold_down
    return LabelConfig(rng, alloc, hold)


def _rate_limit(p: Parser, v: YamlValue) -> RateLimit | None:
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


def _nfqueue(p: Parser, v: YamlValue) -> NfqueueConfig:
    m = p.mapping(v, ("queues", "batch", "rate_limit", "global_rate_limit", "workers"))
    d = NfqueueConfig()
    queues = p.int_pair(m["queues"], 0, 65535, strict=False, what="queue") if "queues" in m else d.queues
    batch = p.integer(m["batch"], 1, None, "batch") if "batch" in m else d.batch
    rate = _rate_limit(p, m["rate_limit"]) if "rate_limit" in m else d.rate_limit
    total = _rate_limit(p, m["global_rate_limit"]) if "global_rate_limit" in m else d.global_rate_limit
    workers = p.integer(m["workers"], 1, MAX_WORKERS, "workers") if "workers" in m else d.workers
    if workers > 1:
        # One queue per worker: a single queue given is the first of them.
        first, last = queues
        if last == first:
            queues = (first, first + workers - 1)
        if queues[1] > 65535 or queues[1] - queues[0] + 1 != workers:
            where = m["queues"] if "queues" in m else m["workers"]
            raise p.error(
                where.vline,
                where.path,
                f"{workers} workers need {workers} queues: a single first queue, or [first, last] holding {workers}",
            )
    return NfqueueConfig(queues, batch, rate, total, workers)


def _balancer_sessions(p: Parser, v: YamlValue) -> SessionsConfig:
    m = p.mapping(v, ("embryonic_timeout",))
    if "embryonic_timeout" not in m:
        return SessionsConfig()
    if p.is_null(m["embryonic_timeout"]):
        return SessionsConfig(None)
    timeout = p.duration(m["embryonic_timeout"])
    if timeout <= 0:
        raise p.error(m["embryonic_timeout"].vline, m["embryonic_timeout"].path, "must be > 0 (null turns it off)")
    return SessionsConfig(timeout)


_SERVER_KEYS = ("address", "transport_label", "weight", "max_sessions", "label_block")


def _server(p: Parser, name: str, v: YamlValue) -> Server:
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


_HC_COMMON = ("type", "port", "interval", "timeout", "rise", "fall")
_HC_ONLY = {
    "path": HealthCheckType.HTTP,
    "expect_status": HealthCheckType.HTTP,
    "host": HealthCheckType.HTTP,
    "send": HealthCheckType.UDP,
    "expect": HealthCheckType.UDP,
}
_PATH_RE = re.compile(r"^/[\x21-\x7e]*\Z")  # no spaces or control characters: one request line
_HOST_RE = re.compile(r"^[\x21-\x7e]+\Z")


def _octets(p: Parser, v: YamlValue) -> bytes:
    """A string whose every character is one byte (latin-1), so that YAML's "\\xNN" escapes can
    write a binary request (a DNS query) exactly."""
    text = p.string(v)
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError as e:
        raise p.error(
            v.vline,
            v.path,
            f"character {text[e.start]!r} is not a byte: every character must be "
            'U+0000..U+00FF (write binary as "\\xNN" escapes)',
        ) from None


def _health_check(p: Parser, v: YamlValue) -> HealthCheck | None:
    """`pools.P.health_check`; null means no check. Keys of another check type are refused, so a
    wrong type cannot silently ignore the path or payload the operator wrote."""
    if p.is_null(v):
        return None
    m = p.mapping(v, _HC_COMMON + tuple(_HC_ONLY), ("type", "port"))
    kind = p.choice(m["type"], HealthCheckType, "health check type")
    for key, only in _HC_ONLY.items():
        if key in m and kind is not only:
            raise p.error(
                m[key].line, m[key].path, f"{key} is only used with type: {only.value}, this check is {kind.value}"
            )
    d = HealthCheck(kind, 0)
    interval = p.duration(m["interval"]) if "interval" in m else d.interval
    if interval <= 0:
        raise p.error(m["interval"].vline, m["interval"].path, "must be > 0")
    timeout = p.duration(m["timeout"]) if "timeout" in m else d.timeout
    if timeout <= 0 or timeout > interval:
        tv = m.get("timeout") or m["interval"]
        raise p.error(
            tv.vline,
            tv.path,
            f"timeout {timeout:g}s must be > 0 and <= interval {interval:g}s (a check ends before the next one starts)",
        )
    check = HealthCheck(
        type=kind,
        port=p.integer(m["port"], 1, 65535, "port"),
        interval=interval,
        timeout=timeout,
        rise=p.integer(m["rise"], 1, 100, "rise") if "rise" in m else d.rise,
        fall=p.integer(m["fall"], 1, 100, "fall") if "fall" in m else d.fall,
    )
    if kind is HealthCheckType.HTTP:
        path = p.string(m["path"]) if "path" in m else d.path
        if not _PATH_RE.match(path):
            raise p.error(
                m["path"].vline,
                m["path"].path,
                f"{path!r} is not a request path: it starts with '/' and has no spaces or control characters",
            )
        status = d.expect_status
        if "expect_status" in m:
            sv = m["expect_status"]
            items = [sv] if isinstance(sv.node, ScalarNode) else p.sequence(sv)
            if not items:
                raise p.error(sv.vline, sv.path, "must list at least one status")
            codes: list[int] = []
            for i in items:
                code = p.integer(i, 100, 599, "status")
                if code in codes:
                    raise p.error(i.vline, i.path, f"status {code} is listed twice")
                codes.append(code)
            status = tuple(codes)
        host = None
        if "host" in m and not p.is_null(m["host"]):
            host = p.string(m["host"])
            if not _HOST_RE.match(host):
                raise p.error(m["host"].vline, m["host"].path, f"{host!r} is not a Host header value")
        return replace(check, path=path, expect_status=status, host=host)
    if kind is HealthCheckType.UDP:
        if "send" not in m:
            raise p.error(v.line, join_path(v.path, "send"), "required key is missing (type udp sends a request)")
        expect = None
        if "expect" in m and not p.is_null(m["expect"]):
            expect = _octets(p, m["expect"])
        return replace(check, send=_octets(p, m["send"]), expect=expect)
    return check


def _pools(p: Parser, v: YamlValue) -> tuple[Pool, ...]:
    pools: list[Pool] = []
    entries = p.mapping(v, None)
    if not entries:
        raise p.error(v.vline, v.path, "at least one pool is required")
    for pname, pv in entries.items():
        p.name(pname, pv.path, pv.line, "pool")
        pm = p.mapping(pv, ("servers", "health_check"), ("servers",))
        sv = pm["servers"]
        servers = []
        sentries = p.mapping(sv, None)
        if not sentries:
            raise p.error(sv.vline, sv.path, "a pool needs at least one server")
        for sname, s in sentries.items():
            p.name(sname, s.path, s.line, "server")
            servers.append(_server(p, sname, s))
        check = _health_check(p, pm["health_check"]) if "health_check" in pm else None
        pools.append(Pool(pname, tuple(servers), check))
    return tuple(pools)


_SERVICE_KEYS = (
    "vip",
    "protocol",
    "ports",
    "pool",
    "session_key",
    "persistence_timeout",
    "scheduler",
    "admission",
    "fail_policy",
    "on_server_failure",
)


def _ports(p: Parser, v: YamlValue) -> tuple[int, ...]:
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


def _admission(p: Parser, v: YamlValue | None, protocol: Protocol) -> Admission:
    default_refuse = RefuseWith.RST if protocol is Protocol.TCP else RefuseWith.ICMP
    if v is None:
        return Admission(refuse_with=default_refuse)
    m = p.mapping(v, ("max_sessions", "min_free_labels", "refuse_with"))
    max_sessions = None
    if "max_sessions" in m and not p.is_null(m["max_sessions"]):
        max_sessions = p.integer(m["max_sessions"], 1, None, "max_sessions")
    free = (
        p.integer(m["min_free_labels"], 0, None, "min_free_labels")
        if "min_free_labels" in m
        else Admission.min_free_labels
    )
    refuse = default_refuse
    if "refuse_with" in m:
        refuse = p.choice(m["refuse_with"], RefuseWith, "refusal")
        if refuse is RefuseWith.RST and protocol is not Protocol.TCP:
            raise p.error(
                m["refuse_with"].vline,
                m["refuse_with"].path,
                f"rst can only refuse tcp sessions, this service is {protocol.value}; use icmp",
            )
    return Admission(max_sessions, free, refuse)


def _service(p: Parser, name: str, v: YamlValue) -> Service:
    m = p.mapping(v, _SERVICE_KEYS, ("vip", "protocol", "pool"))
    vip = p.address(m["vip"])
    protocol = p.choice(m["protocol"], Protocol, "protocol")
    if protocol is Protocol.ESP:
        if "ports" in m:
            raise p.error(m["ports"].line, m["ports"].path, "esp has no ports: remove the key")
        ports: tuple[int, ...] = ()
    elif "ports" not in m:
        raise p.error(v.line, join_path(v.path, "ports"), "required key is missing")
    else:
        ports = _ports(p, m["ports"])
    key = p.choice(m["session_key"], SessionKeyKind, "session key") if "session_key" in m else Service.session_key
    if key is not SessionKeyKind.FIVE_TUPLE and len(ports) > FILTERS_PER_SESSION:
        # Each client address takes one C2S filter per port, all under the session's C2S label.
        raise p.error(
            m["ports"].line,
            m["ports"].path,
            f"{len(ports)} ports, but a session's filter handles hold at most {FILTERS_PER_SESSION} "
            "filters (one per port); split the service, or use session_key: five-tuple",
        )
    if key in (SessionKeyKind.IPV6_IID, SessionKeyKind.MIP6_HOME_ADDRESS) and vip.version != 6:
        raise p.error(
            m["session_key"].vline, m["session_key"].path, f"{key.value} keys IPv6 clients, but vip {vip} is IPv4"
        )
    return Service(
        name=name,
        vip=vip,
        protocol=protocol,
        ports=ports,
        pool=p.string(m["pool"]),
        session_key=key,
        persistence_timeout=p.duration(m["persistence_timeout"])
        if "persistence_timeout" in m
        else Service.persistence_timeout,
        scheduler=p.choice(m["scheduler"], Scheduler, "scheduler") if "scheduler" in m else Service.scheduler,
        admission=_admission(p, m.get("admission"), protocol),
        fail_policy=p.choice(m["fail_policy"], FailPolicy, "fail policy")
        if "fail_policy" in m
        else Service.fail_policy,
        on_server_failure=p.choice(m["on_server_failure"], ServerFailure, "server failure policy")
        if "on_server_failure" in m
        else Service.on_server_failure,
    )


def _services(p: Parser, v: YamlValue) -> tuple[Service, ...]:
    entries = p.mapping(v, None)
    if not entries:
        raise p.error(v.vline, v.path, "at least one service is required")
    out = []
    for name, sv in entries.items():
        p.name(name, sv.path, sv.line, "service")
        out.append(_service(p, name, sv))
    return tuple(out)


# ---- cross-checks ----


def _check(p: Parser, cfg: BalancerConfig) -> None:
    labels = cfg.labels
    first, last = labels.range

    if cfg.cluster is not None and cfg.nfqueue.workers > 1:
        # Both split the label pool (workers by shares, members by leased blocks); not yet together.
        raise p.at("nfqueue.workers", "cluster: runs one worker per balancer for now (docs/scale.md); set workers: 1")

    # A server in two pools must be defined identically there; it is then one server.
    where: dict[str, tuple[str, Server]] = {}
    for pool in cfg.pools:
        for s in pool.servers:
            if s.name in where and where[s.name][1] != s:
                other = where[s.name][0]
                path = f"pools.{pool.name}.servers.{s.name}"
                raise p.error(
                    p.key_lines.get(path),
                    path,
                    f"server {s.name!r} is also defined in pool {other!r} "
                    f"(pools.{other}.servers.{s.name}) with different settings; "
                    "a server in several pools must be defined identically",
                )
            where.setdefault(s.name, (pool.name, s))
    servers = {name: (pool_name, s) for name, (pool_name, s) in where.items()}

    # Transport labels: unique across the node and all servers, outside the session label range.
    owners: dict[int, str] = {cfg.node.transport_label: "node"}
    if first <= cfg.node.transport_label <= last:
        raise p.at(
            "node.transport_label",
            f"transport label {cfg.node.transport_label} lies inside labels.range {first}..{last}",
        )
    for name, (pool_name, s) in servers.items():
        path = f"pools.{pool_name}.servers.{name}.transport_label"
        if s.transport_label in owners:
            raise p.at(path, f"transport label {s.transport_label} is already used by {owners[s.transport_label]}")
        if first <= s.transport_label <= last:
            raise p.at(path, f"transport label {s.transport_label} lies inside labels.range {first}..{last}")
        owners[s.transport_label] = f"server {name!r}"
    member_label = cfg.cluster.member_label if cfg.cluster is not None else None
    if member_label is not None and member_label in owners:
        raise p.at("cluster.member_label", f"member label {member_label} is already used by {owners[member_label]}")

    # Label blocks.
    blocks: list[tuple[int, int, str]] = []
    for name, (pool_name, s) in servers.items():
        path = f"pools.{pool_name}.servers.{name}"
        if labels.allocation is LabelAllocation.POOL:
            if s.label_block is not None:
                raise p.at(path + ".label_block", "label_block is only used with labels.allocation: server-blocks")
            continue
        if s.label_block is None:
            raise p.error(
                p.key_lines.get(path),
                path + ".label_block",
                "required key is missing (labels.allocation is server-blocks)",
            )
        bf, bl = s.label_block
        if not (first <= bf and bl <= last):
            raise p.at(path + ".label_block", f"block {bf}..{bl} is not inside labels.range {first}..{last}")
        if pair_labels(bf, bl) == 0:
            raise p.at(path + ".label_block", f"block {bf}..{bl} holds no (odd C2S, even S2C) label pair")
        for of, ol, other in blocks:
            if bf <= ol and of <= bl:
                raise p.at(
                    path + ".label_block",
                    f"block {bf}..{bl} of server {name!r} overlaps block {of}..{ol} of server {other!r}",
                )
        blocks.append((bf, bl, name))

    # Services: pools exist, no two services claim the same vip/protocol/port, label headroom.
    pool_names = [pl.name for pl in cfg.pools]
    claimed: dict[tuple[Any, ...], str] = {}
    for svc in cfg.services:
        base = f"services.{svc.name}"
        if svc.pool not in pool_names:
            raise p.at(base + ".pool", f"no pool named {svc.pool!r}" + did_you_mean(svc.pool, pool_names))
        for port in svc.ports or (None,):
            k = (svc.vip, svc.protocol, port)
            if k in claimed:
                what = f"{svc.vip} {svc.protocol.value}" + (f" port {port}" if port is not None else "")
                raise p.at(
                    base + (".ports" if port is not None else ".vip"),
                    f"{what} is already served by service {claimed[k]!r}",
                )
            claimed[k] = svc.name
        if labels.allocation is LabelAllocation.POOL:
            size, drawn_from = labels.size, "the label pool"
        else:
            pool = cfg.pool(svc.pool)
            size = sum(pair_labels(*s.label_block) for s in pool.servers if s.label_block)
            drawn_from = f"the label blocks of pool {svc.pool!r}"
        size //= cfg.nfqueue.workers  # each worker draws on its own share
        if cfg.nfqueue.workers > 1:
            drawn_from += f" shared by {cfg.nfqueue.workers} workers"
        if svc.admission.min_free_labels >= size:
            path = base + ".admission.min_free_labels"
            line = p.lines.get(path, p.key_lines.get(base + ".admission", p.key_lines.get(base)))
            raise p.error(
                line, path, f"{svc.admission.min_free_labels} must be smaller than {drawn_from} ({size} usable labels)"
            )


def _parse_balancer(p: Parser, root: YamlValue, source: str) -> BalancerConfig:
    top = p.mapping(root, _TOP, _TOP_REQUIRED, elsewhere=_SERVER_ONLY)
    labels = _labels(p, top["labels"])
    interfaces = _interfaces(p, top["interfaces"])
    cfg = BalancerConfig(
        role=p.choice(top["role"], Role, "role"),
        node=_node(p, top["node"]),
        interfaces=interfaces,
        labels=labels,
        pools=_pools(p, top["pools"]),
        services=_services(p, top["services"]),
        nfqueue=_nfqueue(p, top["nfqueue"]) if "nfqueue" in top else NfqueueConfig(),
        clients=_clients(p, top["clients"], interfaces.clients) if "clients" in top else ClientsConfig(),
        source=source,
        metrics=_metrics(p, top["metrics"]) if "metrics" in top else None,
        sessions=_balancer_sessions(p, top["sessions"]) if "sessions" in top else SessionsConfig(),
        cluster=parse_cluster(p, top["cluster"], labels) if "cluster" in top else None,
    )
    _check(p, cfg)
    return cfg


# A key of the other role's files is named as such rather than answered with a spelling suggestion.
_SERVER_ONLY = {k: "a key of role server, but this file has role: balancer" for k in SERVER_KEYS if k not in _TOP}
_BALANCER_ONLY = {k: "a key of role balancer, but this file has role: server" for k in _TOP if k not in SERVER_KEYS}
_NOT_CLIENT = {
    **{k: "a key of role server, but this file has role: client" for k in SERVER_KEYS if k not in CLIENT_KEYS},
    **{k: "a key of role balancer, but this file has role: client" for k in _TOP if k not in CLIENT_KEYS},
}


def parse_config(
    text: str, source: str = "<string>", role: Role | None = None
) -> BalancerConfig | ServerConfig | ClientConfig:
    """Parse and validate a configuration of the role its `role` key names; raise ConfigError on the
    first problem. With `role`, a file of another role is refused too (a daemon must not start on
    the other role's file)."""
    p = Parser(source)
    root = p.compose(text)
    found = p.role(root)
    if role is not None and found is not role:
        raise p.at("role", f"this is a {found.value} configuration, but a {role.value} configuration is needed here")
    if found is Role.SERVER:
        return parse_server(p, root, source, _BALANCER_ONLY)
    if found is Role.CLIENT:
        return parse_client(p, root, source, _NOT_CLIENT)
    return _parse_balancer(p, root, source)


def load_config(path: str | Path, role: Role | None = None) -> BalancerConfig | ServerConfig | ClientConfig:
    """Read, parse and validate a configuration file (of `role`, when given)."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(source, None, None, "cannot read the configuration: no such file") from None
    except UnicodeDecodeError as e:
        raise ConfigError(source, None, None, f"cannot read the configuration: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise ConfigError(source, None, None, f"cannot read the configuration: {e.strerror or e}") from None
    return parse_config(text, source, role)


def load_balancer_config(path: str | Path) -> BalancerConfig:
    """`load_config` for the balancer daemon: a server file is a ConfigError at its `role` line."""
    cfg = load_config(path, Role.BALANCER)
    assert isinstance(cfg, BalancerConfig)
    return cfg


def load_server_config(path: str | Path) -> ServerConfig:
    """`load_config` for the server agent: a balancer file is a ConfigError at its `role` line."""
    cfg = load_config(path, Role.SERVER)
    assert isinstance(cfg, ServerConfig)
    return cfg


def load_client_config(path: str | Path) -> ClientConfig:
    """`load_config` for the client agent: another role's file is a ConfigError at its `role` line."""
    cfg = load_config(path, Role.CLIENT)
    assert isinstance(cfg, ClientConfig)
    return cfg
