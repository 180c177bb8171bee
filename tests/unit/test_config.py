"""Balancer configuration: parsing, defaults, every validation rule (with its line and key path), CLI."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.config import (
    ConfigError,
    FailPolicy,
    LabelAllocation,
    Protocol,
    RateUnit,
    RefuseWith,
    Role,
    Scheduler,
    SessionKeyKind,
    load_config,
    parse_config,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "templates" / "balancer.example.yaml"

BASE = """\
role: balancer
node:
  transport_label: 100
interfaces:
  clients: [lan0]
  fabric: [fab0]
  fabric_next_hop: 10.255.0.2
labels:
  range: [1000, 1999]
pools:
  web:
    servers:
      s1: {address: 10.1.1.10, transport_label: 101}
      s2: {address: 10.1.1.11, transport_label: 102, weight: 2}
services:
  http:
    vip: 10.0.0.100
    protocol: tcp
    ports: [80]
    pool: web
"""

BLOCKS = (
    BASE.replace("  range: [1000, 1999]\n", "  range: [1000, 1999]\n  allocation: server-blocks\n")
    .replace("transport_label: 101}", "transport_label: 101, label_block: [1000, 1099]}")
    .replace("weight: 2}", "weight: 2, label_block: [1100, 1199]}")
)

SECOND_SERVICE = """\
  web2:
    vip: 10.0.0.100
    protocol: tcp
    ports: [443, 80]
    pool: web
"""


def _edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} must occur once"
    return text.replace(old, new)


def line_of(text: str, marker: str, nth: int = 1) -> int:
    """1-based line of the nth line containing marker."""
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if marker in line]
    assert len(hits) >= nth, f"{marker!r} not in text"
    return hits[nth - 1]


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "lb.yaml")
    return info.value


def assert_error(text: str, marker: str, path: str, fragment: str, nth: int = 1) -> ConfigError:
    e = error_of(text)
    line = line_of(text, marker, nth)
    assert (e.source, e.line, e.path) == ("lb.yaml", line, path), str(e)
    assert fragment in e.message, str(e)
    assert str(e) == f"lb.yaml:{line}: {path}: {e.message}"
    return e


# ---- the example and the defaults ----


def test_example_validates() -> None:
    cfg = load_config(EXAMPLE)
    assert cfg.role is Role.BALANCER and cfg.source == str(EXAMPLE)
    assert [s.name for s in cfg.services] == ["http", "dns", "mobile"]
    mobile = cfg.services[2]
    assert str(mobile.vip) == "fd00:100::100" and mobile.session_key.value == "mip6-home-address"
    assert [s.name for s in cfg.servers] == ["s1", "s2", "s3"]
    assert cfg.node.transport_label == 100 and cfg.node.control_socket == "/run/mplsorch/mplsorch.sock"
    assert cfg.interfaces.clients == ("lan0",) and cfg.interfaces.fabric == ("fab0",)
    assert cfg.interfaces.fabric_next_hop == ipaddress.ip_address("10.255.0.2")
    assert cfg.labels.range == (1000, 99999) and cfg.labels.allocation is LabelAllocation.POOL
    assert cfg.labels.hold_down == 2.0
    assert cfg.nfqueue.queues == (0, 1) and cfg.nfqueue.batch == 64
    rl = cfg.nfqueue.rate_limit
    assert rl is not None and (rl.count, rl.per, rl.burst, rl.per_second) == (200, RateUnit.SECOND, 400, 200.0)
    s3 = cfg.pool("web").server("s3")
    assert (str(s3.address), s3.transport_label, s3.weight, s3.max_sessions) == ("10.1.2.10", 103, 2, 50000)
    http, dns = cfg.service("http"), cfg.service("dns")
    assert http.protocol is Protocol.TCP and http.ports == (80,) and http.scheduler is Scheduler.RR
    assert http.session_key is SessionKeyKind.CLIENT_IP and http.persistence_timeout == 30.0
    assert http.admission.refuse_with is RefuseWith.RST and http.admission.max_sessions == 100000
    assert dns.scheduler is Scheduler.WRR and dns.admission.refuse_with is RefuseWith.ICMP
    assert dns.fail_policy is FailPolicy.OPEN


def test_defaults_filled_in() -> None:
    cfg = parse_config(BASE)
    assert cfg.labels.allocation is LabelAllocation.POOL and cfg.labels.hold_down == 2.0
    assert cfg.nfqueue.queues == (0, 0) and cfg.nfqueue.batch == 64
    assert cfg.nfqueue.rate_limit is not None and str(cfg.nfqueue.rate_limit) == "200/second"
    s1 = cfg.pool("web").server("s1")
    assert (s1.weight, s1.max_sessions, s1.label_block) == (1, None, None)
    http = cfg.service("http")
    assert http.session_key is SessionKeyKind.CLIENT_IP and http.scheduler is Scheduler.RR
    assert http.persistence_timeout == 30.0 and http.fail_policy is FailPolicy.OPEN
    assert (http.admission.max_sessions, http.admission.min_free_labels, http.admission.refuse_with) == (
        None,
        16,
        RefuseWith.RST,
    )
    udp = parse_config(_edit(BASE, "protocol: tcp", "protocol: udp"))
    assert udp.service("http").admission.refuse_with is RefuseWith.ICMP


def test_rate_limit_null_disables_it() -> None:
    cfg = parse_config(BASE + "nfqueue:\n  rate_limit: null\n")
    assert cfg.nfqueue.rate_limit is None
    cfg = parse_config(BASE + "nfqueue:\n  rate_limit: {rate: 600/minute}\n")
    assert cfg.nfqueue.rate_limit is not None and cfg.nfqueue.rate_limit.per_second == 10.0
    assert cfg.nfqueue.rate_limit.burst == 400


@pytest.mark.parametrize(
    "text,seconds",
    [
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("500ms", 0.5),
        ("7", 7.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ('"2s"', 2.0),
        ("0.5s", 0.5),
    ],
)
def test_durations(text: str, seconds: float) -> None:
    cfg = parse_config(
        _edit(BASE, "  range: [1000, 1999]\n", f"  range: [1000, 1999]\n  hold_down: {text}\n")
        + "    persistence_timeout: "
        + text
        + "\n"
    )
    assert cfg.labels.hold_down == seconds and cfg.service("http").persistence_timeout == seconds


@pytest.mark.parametrize("path", [EXAMPLE, None])
def test_show_output_is_a_valid_equal_configuration(path: Path | None) -> None:
    cfg = load_config(path) if path else parse_config(BLOCKS)
    assert parse_config(yaml.safe_dump(cfg.to_dict(), sort_keys=False)) == cfg
    assert parse_config(json.dumps(cfg.to_dict())) == cfg


def test_server_in_two_pools_with_the_same_definition() -> None:
    text = BASE + "  api:\n    vip: 10.0.0.101\n    protocol: tcp\n    ports: [80]\n    pool: other\n"
    text = _edit(
        text,
        "services:\n",
        "  other:\n    servers:\n"
        "      s1: {address: 10.1.1.10, transport_label: 101}\n"
        "      s9: {address: 10.1.1.19, transport_label: 109}\nservices:\n",
    )
    cfg = parse_config(text)
    assert [s.name for s in cfg.servers] == ["s1", "s2", "s9"]


def test_same_port_other_protocol_or_vip_is_fine() -> None:
    cfg = parse_config(BASE + SECOND_SERVICE.replace("tcp", "udp"))
    assert len(cfg.services) == 2
    cfg = parse_config(BASE + SECOND_SERVICE.replace("10.0.0.100", "2001:db8::100"))
    assert cfg.service("web2").vip.version == 6


def test_server_blocks_validate_and_size_admission() -> None:
    cfg = parse_config(BLOCKS)
    assert cfg.labels.allocation is LabelAllocation.SERVER_BLOCKS
    assert cfg.pool("web").server("s2").label_block == (1100, 1199)


def test_as_many_ports_as_filter_handles_are_accepted_and_five_tuple_sessions_take_any() -> None:
    """A five-tuple session has one filter per client address whatever the ports of its service."""
    assert len(parse_config(_edit(BASE, "ports: [80]", f"ports: {list(range(1, 257))}")).service("http").ports) == 256
    five = _edit(BASE, "ports: [80]", f"ports: {list(range(1, 401))}\n    session_key: five-tuple")
    assert len(parse_config(five).service("http").ports) == 400


def test_esp_service_has_no_ports() -> None:
    cfg = parse_config(
        _edit(_edit(BASE, "protocol: tcp", "protocol: esp"), "    ports: [80]\n", "    session_key: esp-spi\n")
    )
    svc = cfg.service("http")
    assert svc.protocol is Protocol.ESP and svc.ports == () and svc.admission.refuse_with is RefuseWith.ICMP


def test_weight_zero_is_allowed() -> None:
    assert parse_config(_edit(BASE, "weight: 2", "weight: 0")).pool("web").server("s2").weight == 0


# ---- one broken file per rule: (text, marker of the offending line, key path, message fragment) ----

CASES: dict[str, tuple[str, str, str, str]] = {
    # structure
    "unknown top key": (BASE + "nfqeue:\n  batch: 1\n", "nfqeue:", "nfqeue", "unknown key; did you mean 'nfqueue'?"),
    "unknown nested key": (
        _edit(BASE, "weight: 2", "weigth: 2"),
        "weigth",
        "pools.web.servers.s2.weigth",
        "did you mean 'weight'?",
    ),
    "unknown key far from any": (
        _edit(BASE, "    pool: web\n", "    pool: web\n    colour: blue\n"),
        "colour",
        "services.http.colour",
        "unknown key",
    ),
    "merge keys are not supported": (
        _edit(BASE, "    pool: web\n", "    pool: web\n    <<: {a: 1}\n"),
        "<<",
        "services.http.<<",
        "merge keys (<<) are not supported",
    ),
    "duplicate key": (
        _edit(BASE, "  transport_label: 100\n", "  transport_label: 100\n  transport_label: 99\n"),
        "transport_label: 99",
        "node.transport_label",
        "duplicate key (first given at line 3)",
    ),
    "duplicate service": (
        BASE + "  http:\n    vip: 10.0.0.1\n",
        "  http:",
        "services.http",
        "duplicate key",
    ),
    "missing required key": (
        _edit(BASE, "    pool: web\n", ""),
        "  http:",
        "services.http.pool",
        "required key is missing",
    ),
    "missing required section": (
        _edit(BASE, "labels:\n  range: [1000, 1999]\n", ""),
        "role:",
        "labels",
        "required key is missing",
    ),
    "missing server address": (
        _edit(BASE, "address: 10.1.1.11, ", ""),
        "s2:",
        "pools.web.servers.s2.address",
        "required key is missing",
    ),
    "missing ports": (
        _edit(BASE, "    ports: [80]\n", ""),
        "  http:",
        "services.http.ports",
        "required key is missing",
    ),
    "non-string key": (BASE + "1: x\n", "1: x", "(document)", "keys must be plain strings"),
    "bad name": (_edit(BASE, "  http:", "  ht.tp:"), "ht.tp", "services.ht.tp", "invalid service name"),
    "role": (_edit(BASE, "role: balancer", "role: balancr"), "role:", "role", "did you mean 'balancer'?"),
    # types
    "int as string": (
        _edit(BASE, "transport_label: 100", 'transport_label: "100"'),
        '"100"',
        "node.transport_label",
        "expected an integer, got '100'",
    ),
    "bool as int": (
        _edit(BASE, "weight: 2", "weight: true"),
        "weight: true",
        "pools.web.servers.s2.weight",
        "expected an integer",
    ),
    "null as int": (
        _edit(BASE, "transport_label: 100", "transport_label:"),
        "transport_label:",
        "node.transport_label",
        "got nothing (null)",
    ),
    "scalar instead of list": (
        _edit(BASE, "ports: [80]", "ports: 80"),
        "ports: 80",
        "services.http.ports",
        "expected a list, got '80'",
    ),
    "list instead of mapping": (
        _edit(BASE, "node:\n  transport_label: 100\n", "node: [100]\n"),
        "node:",
        "node",
        "expected a mapping, got a list",
    ),
    "mapping instead of string": (
        _edit(BASE, "    pool: web", "    pool: {name: web}"),
        "pool: {",
        "services.http.pool",
        "expected a string, got a mapping",
    ),
    # labels.range
    "range below 16": (
        _edit(BASE, "[1000, 1999]", "[15, 1999]"),
        "range:",
        "labels.range",
        "label 15 is out of range: must be within 16..1048575",
    ),
    "range above 20 bits": (
        _edit(BASE, "[1000, 1999]", "[1000, 1048576]"),
        "range:",
        "labels.range",
        "label 1048576 is out of range",
    ),
    "range reversed": (
        _edit(BASE, "[1000, 1999]", "[1999, 1000]"),
        "range:",
        "labels.range",
        "first 1999 must be < last 1000",
    ),
    "range empty": (
        _edit(BASE, "[1000, 1999]", "[1000, 1000]"),
        "range:",
        "labels.range",
        "first 1000 must be < last 1000",
    ),
    "range one item": (_edit(BASE, "[1000, 1999]", "[1000]"), "range:", "labels.range", "two integers"),
    "range without a pair": (_edit(BASE, "[1000, 1999]", "[1000, 1001]"), "range:", "labels.range", "no (odd C2S"),
    "allocation": (
        _edit(BASE, "  range: [1000, 1999]\n", "  range: [1000, 1999]\n  allocation: blocks\n"),
        "allocation:",
        "labels.allocation",
        "unknown label allocation 'blocks'",
    ),
    # label blocks
    "block missing": (
        _edit(BLOCKS, ", label_block: [1000, 1099]", ""),
        "s1:",
        "pools.web.servers.s1.label_block",
        "required key is missing (labels.allocation is",
    ),
    "block outside range": (
        _edit(BLOCKS, "[1100, 1199]", "[1900, 2100]"),
        "s2:",
        "pools.web.servers.s2.label_block",
        "block 1900..2100 is not inside labels.range",
    ),
    "block reversed": (
        _edit(BLOCKS, "[1100, 1199]", "[1199, 1100]"),
        "s2:",
        "pools.web.servers.s2.label_block",
        "first 1199 must be < last 1100",
    ),
    "blocks overlap": (
        _edit(BLOCKS, "[1100, 1199]", "[1050, 1199]"),
        "s2:",
        "pools.web.servers.s2.label_block",
        "block 1050..1199 of server 's2' overlaps block 1000..1099 of server 's1'",
    ),
    "block with pool allocation": (
        _edit(BASE, "transport_label: 101}", "transport_label: 101, label_block: [1000, 1099]}"),
        "s1:",
        "pools.web.servers.s1.label_block",
        "only used with labels.allocation: server-blocks",
    ),
    # transport labels
    "server transport label reserved": (
        _edit(BASE, "transport_label: 101", "transport_label: 15"),
        "s1:",
        "pools.web.servers.s1.transport_label",
        "transport label 15 is out of range: must be 16..1048575",
    ),
    "node transport label too big": (
        _edit(BASE, "transport_label: 100", "transport_label: 1048576"),
        "1048576",
        "node.transport_label",
        "out of range",
    ),
    "transport label twice": (
        _edit(BASE, "transport_label: 102", "transport_label: 101"),
        "s2:",
        "pools.web.servers.s2.transport_label",
        "transport label 101 is already used by server 's1'",
    ),
    "transport label of the node": (
        _edit(BASE, "transport_label: 101", "transport_label: 100"),
        "s1:",
        "pools.web.servers.s1.transport_label",
        "already used by node",
    ),
    "transport label in session range": (
        _edit(BASE, "transport_label: 102", "transport_label: 1500"),
        "s2:",
        "pools.web.servers.s2.transport_label",
        "lies inside labels.range",
    ),
    # servers in two pools
    "server redefined in another pool": (
        _edit(
            BASE + "  api:\n    vip: 10.0.0.101\n    protocol: tcp\n    ports: [80]\n    pool: other\n",
            "services:\n",
            "  other:\n    servers:\n      s1: {address: 10.1.1.99, transport_label: 101}\nservices:\n",
        ),
        "10.1.1.99",
        "pools.other.servers.s1",
        "also defined in pool 'web' (pools.web.servers.s1) with different",
    ),
    # addresses
    "vip": (
        _edit(BASE, "vip: 10.0.0.100", "vip: 10.0.0.x"),
        "vip:",
        "services.http.vip",
        "'10.0.0.x' is not an IP address",
    ),
    "vip multicast": (
        _edit(BASE, "vip: 10.0.0.100", "vip: 224.0.0.1"),
        "vip:",
        "services.http.vip",
        "not a usable unicast address",
    ),
    "server address": (
        _edit(BASE, "10.1.1.11", "10.1.1.300"),
        "s2:",
        "pools.web.servers.s2.address",
        "'10.1.1.300' is not an IP address",
    ),
    "fabric next hop": (
        _edit(BASE, "10.255.0.2", "router1"),
        "fabric_next_hop",
        "interfaces.fabric_next_hop",
        "'router1' is not an IP address",
    ),
    # ports
    "port 0": (
        _edit(BASE, "ports: [80]", "ports: [0]"),
        "ports:",
        "services.http.ports[0]",
        "port 0 is out of range: must be 1..65535",
    ),
    "port too big": (
        _edit(BASE, "ports: [80]", "ports:\n      - 80\n      - 65536"),
        "65536",
        "services.http.ports[1]",
        "port 65536 is out of range",
    ),
    "port twice": (_edit(BASE, "ports: [80]", "ports: [80, 80]"), "ports:", "services.http.ports[1]", "listed twice"),
    "no ports": (_edit(BASE, "ports: [80]", "ports: []"), "ports:", "services.http.ports", "at least one port"),
    "ports beyond the filter handles": (
        _edit(BASE, "ports: [80]", f"ports: {list(range(1, 258))}"),
        "ports:",
        "services.http.ports",
        "257 ports, but a session's filter handles hold at most 256 filters",
    ),
    "esp with ports": (
        _edit(BASE, "protocol: tcp", "protocol: esp"),
        "ports:",
        "services.http.ports",
        "esp has no ports",
    ),
    "protocol": (
        _edit(BASE, "protocol: tcp", "protocol: tcpp"),
        "protocol:",
        "services.http.protocol",
        "unknown protocol 'tcpp'",
    ),
    # names of schedulers and session keys
    "scheduler": (
        BASE + "    scheduler: wrrr\n",
        "scheduler:",
        "services.http.scheduler",
        "unknown scheduler 'wrrr'; expected one of rr, wrr, lc, wlc, response-time, maglev, "
        "source-hash; did you mean 'wrr'?",
    ),
    "session key": (
        BASE + "    session_key: client_ip\n",
        "session_key:",
        "services.http.session_key",
        "did you mean 'client-ip'?",
    ),
    "ipv6 key on ipv4 vip": (
        BASE + "    session_key: ipv6-iid\n",
        "session_key:",
        "services.http.session_key",
        "ipv6-iid keys IPv6 clients",
    ),
    "fail policy": (
        BASE + "    fail_policy: shut\n",
        "fail_policy:",
        "services.http.fail_policy",
        "unknown fail policy 'shut'",
    ),
    # durations
    "negative persistence": (
        BASE + "    persistence_timeout: -1\n",
        "persistence_timeout",
        "services.http.persistence_timeout",
        "-1 is out of range: must be >= 0",
    ),
    "bad duration": (
        BASE + "    persistence_timeout: 5x\n",
        "persistence_timeout",
        "services.http.persistence_timeout",
        "'5x' is not a duration",
    ),
    "negative hold down": (
        _edit(BASE, "  range: [1000, 1999]\n", "  range: [1000, 1999]\n  hold_down: -0.5\n"),
        "hold_down",
        "labels.hold_down",
        "out of range: must be >= 0",
    ),
    "negative hold down string": (
        _edit(BASE, "  range: [1000, 1999]\n", "  range: [1000, 1999]\n  hold_down: -2s\n"),
        "hold_down",
        "labels.hold_down",
        "is not a duration",
    ),
    # nfqueue
    "queues reversed": (
        BASE + "nfqueue:\n  queues: [3, 1]\n",
        "queues:",
        "nfqueue.queues",
        "first 3 must be <= last 1",
    ),
    "queue too big": (
        BASE + "nfqueue:\n  queues: [0, 65536]\n",
        "queues:",
        "nfqueue.queues",
        "queue 65536 is out of range: must be within 0..65535",
    ),
    "queue negative": (BASE + "nfqueue:\n  queues: [-1, 3]\n", "queues:", "nfqueue.queues", "out of range"),
    "batch zero": (BASE + "nfqueue:\n  batch: 0\n", "batch:", "nfqueue.batch", "must be >= 1"),
    "rate unit": (
        BASE + "nfqueue:\n  rate_limit:\n    rate: 200/hour\n",
        "rate:",
        "nfqueue.rate_limit.rate",
        "'200/hour' is not a rate: write N/second or N/minute",
    ),
    "rate zero": (
        BASE + "nfqueue:\n  rate_limit:\n    rate: 0/second\n",
        "rate:",
        "nfqueue.rate_limit.rate",
        "at least 1",
    ),
    "burst zero": (
        BASE + "nfqueue:\n  rate_limit: {rate: 10/second, burst: 0}\n",
        "burst",
        "nfqueue.rate_limit.burst",
        "burst 0 is out of range: must be >= 1",
    ),
    "rate missing": (
        BASE + "nfqueue:\n  rate_limit: {burst: 5}\n",
        "rate_limit",
        "nfqueue.rate_limit.rate",
        "required key is missing",
    ),
    # weights and session limits
    "negative weight": (
        _edit(BASE, "weight: 2", "weight: -1"),
        "s2:",
        "pools.web.servers.s2.weight",
        "weight -1 is out of range: must be >= 0",
    ),
    "server max_sessions 0": (
        _edit(BASE, "weight: 2", "max_sessions: 0"),
        "s2:",
        "pools.web.servers.s2.max_sessions",
        "max_sessions 0 is out of range: must be >= 1",
    ),
    "admission max_sessions 0": (
        BASE + "    admission:\n      max_sessions: 0\n",
        "max_sessions",
        "services.http.admission.max_sessions",
        "must be >= 1",
    ),
    "rst on udp": (
        _edit(BASE, "protocol: tcp", "protocol: udp") + "    admission: {refuse_with: rst}\n",
        "admission",
        "services.http.admission.refuse_with",
        "rst can only refuse tcp sessions",
    ),
    # services
    "services overlap": (
        BASE + SECOND_SERVICE,
        "ports: [443, 80]",
        "services.web2.ports",
        "10.0.0.100 tcp port 80 is already served by service 'http'",
    ),
    "unknown pool": (
        _edit(BASE, "    pool: web", "    pool: wbe"),
        "pool: wbe",
        "services.http.pool",
        "no pool named 'wbe'; did you mean 'web'?",
    ),
    "no services": (
        _edit(BASE, "services:\n", "services: {}\n").split("  http:")[0],
        "services:",
        "services",
        "at least one service",
    ),
    "empty pool": (
        _edit(
            BASE,
            "    servers:\n      s1: {address: 10.1.1.10, transport_label: 101}\n"
            "      s2: {address: 10.1.1.11, transport_label: 102, weight: 2}\n",
            "    servers: {}\n",
        ),
        "servers:",
        "pools.web.servers",
        "at least one server",
    ),
    # interfaces
    "no clients": (
        _edit(BASE, "clients: [lan0]", "clients: []"),
        "clients:",
        "interfaces.clients",
        "at least one interface",
    ),
    "no fabric": (
        _edit(BASE, "fabric: [fab0]", "fabric: []"),
        "fabric:",
        "interfaces.fabric",
        "at least one interface",
    ),
    "interfaces overlap": (
        _edit(BASE, "fabric: [fab0]", "fabric: [fab0, lan0]"),
        "fabric:",
        "interfaces.fabric",
        "'lan0' is also in interfaces.clients",
    ),
    "bad interface name": (
        _edit(BASE, "clients: [lan0]", "clients: [a/b]"),
        "clients:",
        "interfaces.clients[0]",
        "'a/b' is not a valid interface name",
    ),
    "interface twice": (
        _edit(BASE, "clients: [lan0]", "clients: [lan0, lan0]"),
        "clients:",
        "interfaces.clients[1]",
        "listed twice",
    ),
    # admission headroom
    "min_free_labels >= pool": (
        _edit(BASE, "[1000, 1999]", "[1000, 1009]") + "    admission:\n      min_free_labels: 8\n",
        "min_free_labels",
        "services.http.admission.min_free_labels",
        "8 must be smaller than the label pool (8 usable labels)",
    ),
    "default min_free_labels >= pool": (
        _edit(BASE, "[1000, 1999]", "[1000, 1009]"),
        "  http:",
        "services.http.admission.min_free_labels",
        "16 must be smaller",
    ),
    "min_free_labels >= blocks": (
        BLOCKS + "    admission: {min_free_labels: 200}\n",
        "admission",
        "services.http.admission.min_free_labels",
        "200 must be smaller than the label blocks of pool 'web' (196 usable labels)",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_broken_file_names_line_and_key(name: str) -> None:
    text, marker, path, fragment = CASES[name]
    nth = 2 if name == "duplicate service" else 1
    assert_error(text, marker, path, fragment, nth)


BLOCK_STYLE = _edit(
    BLOCKS,
    "      s2: {address: 10.1.1.11, transport_label: 102, weight: 2, label_block: [1100, 1199]}\n",
    "      s2:\n        address: 10.1.1.11\n        transport_label: 102\n        label_block: [1100, 1199]\n",
)


@pytest.mark.parametrize(
    "text,marker,path,fragment",
    [
        (
            _edit(BLOCK_STYLE, "        label_block: [1100, 1199]\n", ""),
            "s2:",
            "pools.web.servers.s2.label_block",
            "required key is missing",
        ),
        (
            _edit(BLOCK_STYLE, "[1100, 1199]", "[1050, 1199]"),
            "label_block: [1050, 1199]",
            "pools.web.servers.s2.label_block",
            "overlaps block 1000..1099 of server 's1'",
        ),
        (
            _edit(BLOCK_STYLE, "transport_label: 102", "transport_label: 101"),
            "transport_label: 101",
            "pools.web.servers.s2.transport_label",
            "already used by server 's1'",
        ),
    ],
    ids=["missing block", "overlap", "transport label"],
)
def test_block_style_errors_point_at_the_right_line(text: str, marker: str, path: str, fragment: str) -> None:
    nth = 2 if path.endswith("transport_label") else 1
    assert_error(text, marker, path, fragment, nth)


def test_yaml_syntax_error_has_a_line() -> None:
    text = _edit(BASE, "ports: [80]", "ports: [80")
    e = error_of(text)
    assert e.path == "(yaml)" and e.line is not None and e.line >= line_of(text, "ports: [80")
    assert str(e).startswith(f"lb.yaml:{e.line}: (yaml): not valid YAML")


@pytest.mark.parametrize("text,msg", [("", "empty"), ("# nothing\n", "empty"), ("- a\n", "expected a mapping")])
def test_empty_or_non_mapping_document(text: str, msg: str) -> None:
    e = error_of(text)
    assert e.line == 1 and e.path == "(document)" and msg in e.message


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: cannot read the configuration: no such file"
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"role: \xe9\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)


# ---- CLI ----

runner = CliRunner()


def test_cli_validate_ok() -> None:
    r = runner.invoke(app, ["config", "validate", str(EXAMPLE)])
    assert r.exit_code == 0, r.output
    assert r.stdout == f"{EXAMPLE}: ok (3 services, 3 servers)\n"


def test_cli_validate_invalid(tmp_path: Path) -> None:
    f = tmp_path / "lb.yaml"
    f.write_text(_edit(BASE, "vip: 10.0.0.100", "vip: 10.0.0.x"))
    r = runner.invoke(app, ["config", "validate", str(f)])
    assert r.exit_code == 2
    assert r.stdout == ""
    assert r.stderr == f"{f}:17: services.http.vip: '10.0.0.x' is not an IP address\n"


def test_cli_validate_missing_file(tmp_path: Path) -> None:
    r = runner.invoke(app, ["config", "validate", str(tmp_path / "none.yaml")])
    assert r.exit_code == 2 and r.stdout == ""
    assert "none.yaml: cannot read the configuration: no such file" in r.stderr


def test_cli_show_yaml_and_json(tmp_path: Path) -> None:
    f = tmp_path / "lb.yaml"
    f.write_text(BASE)
    r = runner.invoke(app, ["config", "show", str(f)])
    assert r.exit_code == 0, r.output
    shown = yaml.safe_load(r.stdout)
    assert shown["labels"]["hold_down"] == 2.0 and shown["nfqueue"]["batch"] == 64
    assert shown["services"]["http"]["admission"]["refuse_with"] == "rst"
    assert parse_config(r.stdout) == parse_config(BASE)
    r = runner.invoke(app, ["config", "show", "--json", str(f)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["services"]["http"]["scheduler"] == "rr"
    assert data["pools"]["web"]["servers"]["s1"] == {
        "address": "10.1.1.10",
        "transport_label": 101,
        "weight": 1,
        "max_sessions": None,
    }
    assert data["nfqueue"]["rate_limit"] == {"rate": "200/second", "burst": 400}


def test_cli_show_invalid_exits_2(tmp_path: Path) -> None:
    f = tmp_path / "lb.yaml"
    f.write_text(BASE.replace("role: balancer", "role: router"))
    r = runner.invoke(app, ["config", "show", "--json", str(f)])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr.startswith(f"{f}:1: role: unknown role 'router'")
