"""The one encoding of the cluster's keys and values in etcd (docs/scale.md, Keys):

    PREFIX members/NAME                 the member's record, under its lease: its lease id (decimal),
                                        or with a member label `{"lease":ID,"label":LABEL}` (JSON)
    PREFIX blocks/INDEX                 the name of the member holding label block INDEX, under its lease
                                        (its reserve's: without a lease)
    PREFIX reserve/NAME                 the index of member NAME's reserve block (when_store_down:
                                        local), without a lease: it outlives an etcd outage
    PREFIX sessions/SERVICE/KEY         a session row (JSON, `encode_session`), under its owner's lease

SERVICE is a service name (letters, digits, '-', '_'); KEY the session key's value as the core
writes it (an address, "spi:..", a five-tuple): neither holds '/' except an IPv6 five-tuple's
none, so the key splits at the first '/' after SERVICE. Pure: bytes in, bytes out.
"""

from __future__ import annotations

import json
from typing import Any

from orchestrator.core.remote import ClusterSession

__all__ = [
    "block_key",
    "decode_member",
    "encode_member",
    "decode_session",
    "encode_session",
    "member_key",
    "parse_key",
    "reserve_key",
    "session_key",
]

FORMAT = 1


def member_key(prefix: str, name: str) -> bytes:
    return f"{prefix}members/{name}".encode()


def encode_member(lease: int, label: int | None) -> bytes:
    """A member key's value: the lease id alone (no member label: as older versions wrote it),
    else JSON with the member's own transport label (cluster.member_label)."""
    if label is None:
        return str(lease).encode()
    return json.dumps({"lease": lease, "label": label}, separators=(",", ":")).encode()


def decode_member(raw: bytes) -> tuple[int, int | None] | None:
    """(lease id, member label or None) of a member key's value; None when damaged."""
    if raw.isdigit():
        return int(raw), None
    try:
        doc = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    lease, label = doc.get("lease"), doc.get("label")
    if not isinstance(lease, int) or not (label is None or isinstance(label, int)):
        return None
    return lease, label


def block_key(prefix: str, index: int) -> bytes:
    return f"{prefix}blocks/{index}".encode()


def reserve_key(prefix: str, name: str) -> bytes:
    return f"{prefix}reserve/{name}".encode()


def session_key(prefix: str, service: str, key: str) -> bytes:
    return f"{prefix}sessions/{service}/{key}".encode()


def parse_key(prefix: str, raw: bytes) -> tuple[str, str, str] | None:
    """What a key of the cluster names: ("member", NAME, ""), ("block", INDEX, ""),
    ("reserve", NAME, ""), ("session", SERVICE, KEY); None for anything else under the prefix."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return None
    if not text.startswith(prefix):
        return None
    kind, _, rest = text[len(prefix) :].partition("/")
    if kind == "members" and rest:
        return ("member", rest, "")
    if kind == "blocks" and rest.isdigit():
        return ("block", rest, "")
    if kind == "reserve" and rest:
        return ("reserve", rest, "")
    if kind == "sessions":
        service, _, key = rest.partition("/")
        if service and key:
            return ("session", service, key)
    return None


def encode_session(row: ClusterSession) -> bytes:
    """A session row as compact JSON (about 250 bytes): short names, the format's version."""
    doc: dict[str, Any] = {
        "v": FORMAT,
        "service": row.service,
        "kind": row.kind,
        "key": row.key,
        "clients": list(row.clients),
        "vip": row.vip,
        "proto": row.protocol,
        "port": row.port,
        "sport": row.sport,
        "server": row.server,
        "c2s": row.c2s,
        "owner": row.owner,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def decode_session(raw: bytes) -> ClusterSession | None:
    """A row written by `encode_session`; None for another format or a damaged value (counted
    by the daemon, never raised)."""
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("v") != FORMAT:
            return None
        port, sport, c2s = doc["port"], doc["sport"], doc["c2s"]
        clients = tuple(str(c) for c in doc["clients"])
        if not clients or not isinstance(c2s, int) or c2s % 2 != 1:
            return None
        for p in (port, sport):
            if p is not None and not isinstance(p, int):
                return None
        return ClusterSession(
            str(doc["service"]),
            str(doc["kind"]),
            str(doc["key"]),
            clients,
            str(doc["vip"]),
            str(doc["proto"]),
            port,
            sport,
            str(doc["server"]),
            c2s,
            str(doc["owner"]),
        )
    except (ValueError, KeyError, TypeError):
        return None
