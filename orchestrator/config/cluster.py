"""`cluster:` of the balancer configuration: several balancers sharing the session table in etcd
(docs/configuration.md, docs/scale.md). Parsed like every other section, errors with their line."""

from __future__ import annotations

import ipaddress
import re

from orchestrator.config.model import (
    MAX_LABEL,
    MIN_LABEL,
    ClusterConfig,
    ClusterTls,
    LabelAllocation,
    LabelConfig,
    StoreDown,
    pair_labels,
)
from orchestrator.config.parser import Parser, YamlValue

__all__ = ["parse_cluster"]

_ENDPOINT_RES = (re.compile(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)\Z"), re.compile(r"^([A-Za-z0-9.-]+):(\d+)\Z"))
_PREFIX_RE = re.compile(r"^/[A-Za-z0-9._/-]*/\Z")
_KEYS = ("name", "endpoints", "tls", "lease_ttl", "label_block", "prefix", "when_store_down", "member_label")


def _endpoint(p: Parser, v: YamlValue) -> tuple[str, int]:
    text = p.string(v)
    text = text.removeprefix("http://")
    match = _ENDPOINT_RES[0].match(text) or _ENDPOINT_RES[1].match(text)
    if match is None:
        raise p.error(v.vline, v.path, f'{text!r} is not an etcd endpoint: write "HOST:PORT", e.g. "10.0.0.5:2379"')
    host, port = match.group(1), int(match.group(2))
    if text.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise p.error(v.vline, v.path, f"{host!r} is not an IPv6 address") from None
    if not 1 <= port <= 65535:
        raise p.error(v.vline, v.path, f"port {port} is out of range: must be 1..65535")
    return host, port


def _tls(p: Parser, v: YamlValue) -> ClusterTls | None:
    if p.is_null(v):
        return None
    m = p.mapping(v, ("ca", "cert", "key"), ("ca", "cert", "key"))
    return ClusterTls(p.string(m["ca"]), p.string(m["cert"]), p.string(m["key"]))


def parse_cluster(p: Parser, v: YamlValue, labels: LabelConfig) -> ClusterConfig | None:
    """`cluster:`; null is the same as absent (one balancer)."""
    if p.is_null(v):
        return None
    m = p.mapping(v, _KEYS, ("name", "endpoints"))
    name = p.name(p.string(m["name"]), m["name"].path, m["name"].vline, "member")
    items = p.sequence(m["endpoints"])
    if not items:
        raise p.error(m["endpoints"].vline, m["endpoints"].path, "at least one etcd endpoint is needed")
    endpoints: list[tuple[str, int]] = []
    for item in items:
        endpoint = _endpoint(p, item)
        if endpoint in endpoints:
            raise p.error(item.vline, item.path, f"endpoint {item.node.value} is listed twice")
        endpoints.append(endpoint)
    tls = _tls(p, m["tls"]) if "tls" in m else None
    ttl = p.integer(m["lease_ttl"], 2, 3600, "lease_ttl") if "lease_ttl" in m else ClusterConfig.lease_ttl
    block = p.integer(m["label_block"], 1, None, "label_block") if "label_block" in m else ClusterConfig.label_block
    prefix = ClusterConfig.prefix
    if "prefix" in m:
        prefix = p.string(m["prefix"])
        if not _PREFIX_RE.match(prefix):
            raise p.error(
                m["prefix"].vline,
                m["prefix"].path,
                f"{prefix!r} is not a key prefix: it starts and ends with '/' (letters, digits, '.', '_', '-')",
            )
    down = ClusterConfig.when_store_down
    if "when_store_down" in m:
        down = p.choice(m["when_store_down"], StoreDown, "policy")
    if labels.allocation is LabelAllocation.SERVER_BLOCKS:
        raise p.at(
            "labels.allocation",
            "server-blocks is not supported with cluster: the balancers lease blocks of the one pool (docs/scale.md)",
        )
    pairs = pair_labels(*labels.range) // 2
    if block > pairs:
        path = m["label_block"].path if "label_block" in m else "cluster.label_block"
        line = m["label_block"].vline if "label_block" in m else m["name"].vline
        raise p.error(line, path, f"a block of {block} pairs is larger than labels.range ({pairs} pairs)")
    member_label = None
    if "member_label" in m and not p.is_null(m["member_label"]):
        member_label = p.integer(m["member_label"], MIN_LABEL, MAX_LABEL, "member label")
        if labels.range[0] <= member_label <= labels.range[1]:
            raise p.error(
                m["member_label"].vline,
                m["member_label"].path,
                f"member label {member_label} lies inside labels.range {labels.range[0]}..{labels.range[1]}",
            )
    return ClusterConfig(name, tuple(endpoints), tls, ttl, block, prefix, down, member_label)
