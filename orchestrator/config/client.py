"""Parsing and validation of the client agent's configuration (`role: client`, the file format
of templates/client.example.yaml); the dataclasses are in `client_model.py`. Errors name the file,
the line and the key, as for the other roles."""

from __future__ import annotations

from typing import Mapping

from orchestrator.config.client_model import ClientConfig, ClientNode, ClientQueue
from orchestrator.config.model import MAX_LABEL, MIN_LABEL, IPAddress, Role, Setup, pair_labels
from orchestrator.config.parser import Parser, YamlValue, parse_metrics

__all__ = ["CLIENT_KEYS", "ClientConfig", "parse_client"]

CLIENT_KEYS = ("role", "node", "interfaces", "labels", "vips", "sessions", "nfqueue", "metrics")
_REQUIRED = ("role", "interfaces", "labels", "vips")


def _node(p: Parser, v: YamlValue) -> ClientNode:
    m = p.mapping(v, ("control_socket", "control_group", "setup"))
    return ClientNode(
        control_socket=p.string(m["control_socket"]) if "control_socket" in m else ClientNode.control_socket,
        setup=p.choice(m["setup"], Setup, "setup mode") if "setup" in m else ClientNode.setup,
        control_group=p.group(m["control_group"]) if "control_group" in m else None,
    )


def _range(p: Parser, v: YamlValue) -> tuple[int, int]:
    m = p.mapping(v, ("range",), ("range",))
    rv = m["range"]
    rng = p.int_pair(rv, MIN_LABEL, MAX_LABEL, strict=True, what="label")
    if pair_labels(*rng) == 0:
        raise p.error(rv.vline, rv.path, "the range holds no (odd C2S, even S2C) label pair")
    return rng


def _vips(p: Parser, v: YamlValue) -> tuple[IPAddress, ...]:
    items = p.sequence(v)
    if not items:
        raise p.error(v.vline, v.path, "at least one VIP is required")
    out: list[IPAddress] = []
    for item in items:
        addr = p.address(item)
        if addr in out:
            raise p.error(item.vline, item.path, f"VIP {addr} is listed twice")
        out.append(addr)
    return tuple(out)


def _sessions(p: Parser, v: YamlValue) -> tuple[float, float]:
    m = p.mapping(v, ("persistence_timeout", "answer_timeout"))
    return (
        p.duration(m["persistence_timeout"]) if "persistence_timeout" in m else ClientConfig.persistence_timeout,
        p.duration(m["answer_timeout"]) if "answer_timeout" in m else ClientConfig.answer_timeout,
    )


def _nfqueue(p: Parser, v: YamlValue) -> ClientQueue:
    m = p.mapping(v, ("queue", "batch"))
    return ClientQueue(
        queue=p.integer(m["queue"], 0, 65535, "queue") if "queue" in m else ClientQueue.queue,
        batch=p.integer(m["batch"], 1, None, "batch") if "batch" in m else ClientQueue.batch,
    )


def parse_client(p: Parser, root: YamlValue, source: str, elsewhere: Mapping[str, str] | None = None) -> ClientConfig:
    """A `role: client` document (its role already read by `p.role`); `elsewhere` explains the
    other roles' top-level keys when they appear here."""
    top = p.mapping(root, CLIENT_KEYS, _REQUIRED, elsewhere)
    interfaces = p.mapping(top["interfaces"], ("balancer",), ("balancer",))
    persistence, answers = (
        _sessions(p, top["sessions"])
        if "sessions" in top
        else (ClientConfig.persistence_timeout, ClientConfig.answer_timeout)
    )
    return ClientConfig(
        role=p.choice(top["role"], Role, "role"),
        node=_node(p, top["node"]) if "node" in top else ClientNode(),
        balancer=p.devices(interfaces["balancer"]),
        label_range=_range(p, top["labels"]),
        vips=_vips(p, top["vips"]),
        persistence_timeout=persistence,
        answer_timeout=answers,
        nfqueue=_nfqueue(p, top["nfqueue"]) if "nfqueue" in top else ClientQueue(),
        source=source,
        metrics=parse_metrics(p, top["metrics"]) if "metrics" in top else None,
    )
