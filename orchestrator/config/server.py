"""The server role's configuration parser: the file format of templates/server.example.yaml into the
dataclasses of `server_model.py`. It shares the balancer's YAML walker (`parser.py`), so a broken server file
fails exactly like a broken balancer file: "FILE:LINE: KEY.PATH: message". `parse_config` and
`load_config` (load.py) read `role` first and come here for `role: server`.
"""

from __future__ import annotations

from typing import Mapping

from yaml.nodes import SequenceNode

from orchestrator.config.model import MAX_LABEL, MIN_LABEL, IPAddress, Role, Setup, pair_labels
from orchestrator.config.parser import Parser, YamlValue, parse_metrics
from orchestrator.config.server_model import KERNEL_TABLES, MAX_TABLE, ServerConfig, ServerNode, ServerQueue, Vip

__all__ = ["SERVER_KEYS", "ServerConfig", "ServerNode", "ServerQueue", "Vip", "parse_server"]

SERVER_KEYS = ("role", "node", "balancer", "interfaces", "labels", "vips", "sessions", "nfqueue", "metrics")
_REQUIRED = ("role", "node", "balancer", "interfaces", "labels", "vips")


def _node(p: Parser, v: YamlValue) -> ServerNode:
    m = p.mapping(v, ("transport_label", "control_socket", "control_group", "setup"), ("transport_label",))
    return ServerNode(
        transport_label=p.integer(m["transport_label"], MIN_LABEL, MAX_LABEL, "transport label"),
        control_socket=p.string(m["control_socket"]) if "control_socket" in m else ServerNode.control_socket,
        setup=p.choice(m["setup"], Setup, "setup mode") if "setup" in m else ServerNode.setup,
        control_group=p.group(m["control_group"]) if "control_group" in m else None,
    )


def _balancer(p: Parser, v: YamlValue) -> int:
    m = p.mapping(v, ("transport_label",), ("transport_label",))
    return p.integer(m["transport_label"], MIN_LABEL, MAX_LABEL, "transport label")


def _next_hops(p: Parser, v: YamlValue) -> tuple[IPAddress, ...]:
    """One address, or a list of at most one address per family."""
    if not isinstance(v.node, SequenceNode):
        return (p.address(v),)
    items = p.sequence(v)
    if not items:
        raise p.error(v.vline, v.path, "must give at least one address (at most one per address family)")
    hops: list[IPAddress] = []
    for i in items:
        hop = p.address(i)
        for other in hops:
            if other.version == hop.version:
                raise p.error(
                    i.vline,
                    i.path,
                    f"a second IPv{hop.version} next hop ({other} is the first): give at most one per address family",
                )
        hops.append(hop)
    return tuple(hops)


def _interfaces(p: Parser, v: YamlValue) -> tuple[tuple[str, ...], tuple[IPAddress, ...]]:
    keys = ("fabric", "fabric_next_hop")
    m = p.mapping(v, keys, keys)
    return p.devices(m["fabric"]), _next_hops(p, m["fabric_next_hop"])


def _block(p: Parser, v: YamlValue) -> tuple[int, int]:
    m = p.mapping(v, ("block",), ("block",))
    bv = m["block"]
    block = p.int_pair(bv, MIN_LABEL, MAX_LABEL, strict=True, what="label")
    if pair_labels(*block) == 0:
        raise p.error(
            bv.vline,
            bv.path,
            f"block {block[0]}..{block[1]} holds no odd C2S label whose S2C label (C2S + 1) is inside it too",
        )
    return block


def _vips(p: Parser, v: YamlValue) -> tuple[tuple[Vip, ...], dict[IPAddress, str]]:
    """The VIPs in file order, and each one's key path (errors name the VIP as it was written)."""
    entries = p.mapping(v, None)
    if not entries:
        raise p.error(v.vline, v.path, "at least one VIP is required")
    vips: list[Vip] = []
    paths: dict[IPAddress, str] = {}
    tables: dict[int, str] = {}
    for key, kv in entries.items():
        addr = p.address_text(key, kv.line, kv.path)
        if addr in paths:
            raise p.error(
                kv.line, kv.path, f"VIP {addr} is already given as {paths[addr]} (line {p.key_lines[paths[addr]]})"
            )
        m = p.mapping(kv, ("table",), ("table",))
        tv = m["table"]
        table = p.integer(tv, 1, MAX_TABLE, "table")
        if table in KERNEL_TABLES:
            raise p.error(
                tv.vline,
                tv.path,
                f"table {table} is the kernel's {KERNEL_TABLES[table]} table "
                "(253 default, 254 main and 255 local are the kernel's own): "
                "use another",
            )
        if table in tables:
            raise p.error(
                tv.vline,
                tv.path,
                f"table {table} is already the return table of {tables[table]}: each VIP needs its own",
            )
        tables[table] = kv.path
        paths[addr] = kv.path
        vips.append(Vip(addr, table))
    return tuple(vips), paths


def _sessions(p: Parser, v: YamlValue) -> float:
    m = p.mapping(v, ("persistence_timeout",))
    return p.duration(m["persistence_timeout"]) if "persistence_timeout" in m else ServerConfig.persistence_timeout


def _nfqueue(p: Parser, v: YamlValue) -> ServerQueue:
    m = p.mapping(v, ("queue", "batch"))
    return ServerQueue(
        queue=p.integer(m["queue"], 0, 65535, "queue") if "queue" in m else ServerQueue.queue,
        batch=p.integer(m["batch"], 1, None, "batch") if "batch" in m else ServerQueue.batch,
    )


def _check(p: Parser, cfg: ServerConfig, vip_paths: dict[IPAddress, str]) -> None:
    """Rules between sections: transport labels against each other and the block, VIP families
    against the next hops."""
    first, last = cfg.block
    own = cfg.node.transport_label
    if first <= own <= last:
        raise p.at("node.transport_label", f"transport label {own} lies inside labels.block {first}..{last}")
    lb = cfg.balancer_transport_label
    if lb == own:
        raise p.at(
            "balancer.transport_label",
            f"transport label {lb} is this server's own (node.transport_label): the balancer's must differ",
        )
    if first <= lb <= last:
        raise p.at("balancer.transport_label", f"transport label {lb} lies inside labels.block {first}..{last}")
    for vip in cfg.vips:
        if cfg.next_hop(vip.address.version) is None:
            path = vip_paths[vip.address]
            n = vip.address.version
            raise p.error(
                p.key_lines.get(path),
                path,
                f"IPv{n} VIP needs an IPv{n} interfaces.fabric_next_hop (its S2C return routes go there)",
            )


def parse_server(p: Parser, root: YamlValue, source: str, elsewhere: Mapping[str, str] | None = None) -> ServerConfig:
    """A `role: server` document (its role already read by `p.role`); `elsewhere` explains the
    balancer's top-level keys when they appear here."""
    top = p.mapping(root, SERVER_KEYS, _REQUIRED, elsewhere)
    role = p.choice(top["role"], Role, "role")
    node = _node(p, top["node"])
    balancer_label = _balancer(p, top["balancer"])
    fabric, hops = _interfaces(p, top["interfaces"])
    block = _block(p, top["labels"])
    vips, vip_paths = _vips(p, top["vips"])
    cfg = ServerConfig(
        role=role,
        node=node,
        balancer_transport_label=balancer_label,
        fabric=fabric,
        fabric_next_hops=hops,
        block=block,
        vips=vips,
        persistence_timeout=_sessions(p, top["sessions"]) if "sessions" in top else ServerConfig.persistence_timeout,
        nfqueue=_nfqueue(p, top["nfqueue"]) if "nfqueue" in top else ServerQueue(),
        source=source,
        metrics=parse_metrics(p, top["metrics"]) if "metrics" in top else None,
    )
    _check(p, cfg, vip_paths)
    return cfg
