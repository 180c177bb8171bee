"""Server configuration: the example, defaults, helpers, every validation rule (with its exact line, key
path and message), role dispatch, and the CLI on server files."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.config import (
    BalancerConfig,
    ConfigError,
    Role,
    ServerConfig,
    ServerNode,
    ServerQueue,
    Setup,
    Vip,
    load_balancer_config,
    load_config,
    load_server_config,
    parse_config,
)

TEMPLATES = Path(__file__).resolve().parents[2] / "templates"
EXAMPLE = TEMPLATES / "server.example.yaml"
BALANCER_EXAMPLE = TEMPLATES / "balancer.example.yaml"

BASE = """\
role: server
node:
  transport_label: 101
balancer:
  transport_label: 100
interfaces:
  fabric: [eth0]
  fabric_next_hop: [10.1.1.1, "fd00:11::1"]
labels:
  block: [1001, 1999]
vips:
  10.0.0.100: {table: 100}
  "fd00:100::100": {table: 101}
"""

V4 = "  10.0.0.100: {table: 100}\n"
V6 = '  "fd00:100::100": {table: 101}\n'


def _edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} must occur once"
    return text.replace(old, new)


def line_of(text: str, marker: str, nth: int = 1) -> int:
    """1-based line of the nth line containing marker."""
    hits = [i + 1 for i, line in enumerate(text.splitlines()) if marker in line]
    assert len(hits) >= nth, f"{marker!r} not in text"
    return hits[nth - 1]


def server(text: str) -> ServerConfig:
    cfg = parse_config(text, "s1.yaml")
    assert isinstance(cfg, ServerConfig)
    return cfg


def error_of(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "s1.yaml")
    return info.value


# ---- the example, the defaults, the helpers ----


def test_example_validates_with_its_values() -> None:
    cfg = load_config(EXAMPLE)
    assert isinstance(cfg, ServerConfig) and cfg.source == str(EXAMPLE)
    assert cfg == ServerConfig(
        role=Role.SERVER,
        node=ServerNode(transport_label=101, control_socket="/run/mplsorch/mplsorch.sock", setup=Setup.CHECK),
        balancer_transport_label=100,
        fabric=("eth0",),
        fabric_next_hops=(ipaddress.ip_address("10.1.1.1"), ipaddress.ip_address("fd00:11::1")),
        block=(1001, 1999),
        vips=(Vip(ipaddress.ip_address("10.0.0.100"), 100), Vip(ipaddress.ip_address("fd00:100::100"), 101)),
        persistence_timeout=30.0,
        nfqueue=ServerQueue(queue=8, batch=64),
    )
    assert cfg.role is Role.SERVER and cfg.node.setup is Setup.CHECK
    assert cfg.return_device == "eth0"
    assert cfg.next_hop(4) == ipaddress.ip_address("10.1.1.1")
    assert cfg.next_hop(6) == ipaddress.ip_address("fd00:11::1")
    assert cfg.vip("fd00:100::100") == Vip(ipaddress.ip_address("fd00:100::100"), 101)
    assert cfg.vip(ipaddress.ip_address("10.0.0.100")) == Vip(ipaddress.ip_address("10.0.0.100"), 100)
    assert cfg.vip("10.0.0.101") is None
    labels = cfg.c2s_labels()
    assert labels == range(1001, 1999, 2) and len(labels) == 499 and labels[-1] == 1997


def test_example_fits_the_balancer_example_and_the_default_lab() -> None:
    """s1's transport labels are the ones the balancer example and the lab topology give."""
    lb = load_config(BALANCER_EXAMPLE)
    s1 = load_config(EXAMPLE)
    assert isinstance(lb, BalancerConfig) and isinstance(s1, ServerConfig)
    assert s1.balancer_transport_label == lb.node.transport_label
    assert s1.node.transport_label == lb.pool("web").server("s1").transport_label
    assert {v.address for v in s1.vips} == {s.vip for s in lb.services}
    topo = yaml.safe_load((Path(__file__).resolve().parents[2] / "orchestrator" / "lab" / "default.yaml").read_text())
    assert topo["nodes"]["s1"]["transport_label"] == s1.node.transport_label
    assert topo["segments"]["farm1"]["members"]["s1"]["dev"] == s1.return_device
    assert [str(h) for h in s1.fabric_next_hops] == topo["segments"]["farm1"]["members"]["p"]["address"]
    assert [str(v.address) for v in s1.vips] == topo["vips"]


def test_defaults_filled_in() -> None:
    cfg = server(BASE)
    assert cfg.node == ServerNode(101, "/run/mplsorch/mplsorch.sock", Setup.CHECK)
    assert cfg.persistence_timeout == 30.0 and cfg.nfqueue == ServerQueue(8, 64)


def test_every_optional_key_given() -> None:
    cfg = server(
        BASE.replace(
            "  transport_label: 101\n", "  transport_label: 101\n  control_socket: /tmp/s.sock\n  setup: apply\n", 1
        )
        + "sessions:\n  persistence_timeout: 5m\nnfqueue:\n  queue: 0\n  batch: 1\n"
    )
    assert cfg.node == ServerNode(101, "/tmp/s.sock", Setup.APPLY)
    assert cfg.persistence_timeout == 300.0 and cfg.nfqueue == ServerQueue(0, 1)


def test_one_next_hop_as_a_plain_address() -> None:
    cfg = server(_edit(_edit(BASE, '[10.1.1.1, "fd00:11::1"]', "10.1.1.1"), V6, ""))
    assert cfg.fabric_next_hops == (ipaddress.ip_address("10.1.1.1"),)
    assert cfg.next_hop(6) is None and len(cfg.vips) == 1


def test_ipv6_only_server() -> None:
    cfg = server(_edit(_edit(BASE, '[10.1.1.1, "fd00:11::1"]', '"fd00:11::1"'), V4, ""))
    assert cfg.next_hop(4) is None and cfg.vips == (Vip(ipaddress.ip_address("fd00:100::100"), 101),)


def test_vip_addresses_are_compared_as_addresses() -> None:
    cfg = server(_edit(BASE, '"fd00:100::100"', '"FD00:100:0::100"'))
    assert cfg.vip("fd00:100::100") is not None and str(cfg.vips[1].address) == "fd00:100::100"


@pytest.mark.parametrize(
    "block,labels",
    [
        ("[1001, 1999]", range(1001, 1999, 2)),  # 1999 is odd: its S2C 2000 is outside
        ("[1000, 1999]", range(1001, 1999, 2)),  # 1000 is even: no C2S
        ("[1001, 2000]", range(1001, 2001, 2)),  # 500 pairs
        ("[1001, 1002]", range(1001, 1003, 2)),  # one pair
        ("[200, 1048575]", range(201, 1048575, 2)),  # up to the top of the label space
    ],
)
def test_c2s_labels(block: str, labels: range) -> None:
    cfg = server(_edit(BASE, "[1001, 1999]", block))
    assert cfg.c2s_labels() == labels
    assert all(c % 2 == 1 and cfg.block[0] <= c < c + 1 <= cfg.block[1] for c in cfg.c2s_labels())


@pytest.mark.parametrize(
    "text,seconds",
    [("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("500ms", 0.5), ("7", 7.0), ("1.5", 1.5), ("0", 0.0), ('"2s"', 2.0)],
)
def test_durations(text: str, seconds: float) -> None:
    assert server(BASE + f"sessions:\n  persistence_timeout: {text}\n").persistence_timeout == seconds


def test_tables_at_the_edges_of_the_range() -> None:
    cfg = server(_edit(_edit(BASE, "table: 100", "table: 1"), "table: 101", "table: 4294967295"))
    assert [v.table for v in cfg.vips] == [1, 4294967295]
    assert [v.table for v in server(_edit(BASE, "table: 101", "table: 252")).vips] == [100, 252]
    assert [v.table for v in server(_edit(BASE, "table: 101", "table: 256")).vips] == [100, 256]


@pytest.mark.parametrize("path", [EXAMPLE, None])
def test_show_output_is_a_valid_equal_configuration(path: Path | None) -> None:
    cfg = load_config(path) if path else server(_edit(BASE, '[10.1.1.1, "fd00:11::1"]', '"fd00:11::1"').replace(V4, ""))
    assert isinstance(cfg, ServerConfig)
    assert parse_config(yaml.safe_dump(cfg.to_dict(), sort_keys=False)) == cfg
    assert parse_config(yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)) == cfg
    assert parse_config(json.dumps(cfg.to_dict())) == cfg


def test_to_dict_is_the_file_format() -> None:
    assert load_config(EXAMPLE).to_dict() == {
        "role": "server",
        "node": {
            "transport_label": 101,
            "control_socket": "/run/mplsorch/mplsorch.sock",
            "control_group": None,
            "setup": "check",
        },
        "balancer": {"transport_label": 100},
        "interfaces": {"fabric": ["eth0"], "fabric_next_hop": ["10.1.1.1", "fd00:11::1"]},
        "labels": {"block": [1001, 1999]},
        "vips": {"10.0.0.100": {"table": 100}, "fd00:100::100": {"table": 101}},
        "sessions": {"persistence_timeout": 30.0},
        "nfqueue": {"queue": 8, "batch": 64},
        "metrics": None,
    }


# ---- role dispatch ----


def test_role_decides_the_config_type() -> None:
    assert isinstance(load_config(EXAMPLE), ServerConfig)
    assert isinstance(load_config(BALANCER_EXAMPLE), BalancerConfig)
    assert isinstance(load_server_config(EXAMPLE), ServerConfig)
    assert isinstance(load_balancer_config(BALANCER_EXAMPLE), BalancerConfig)
    assert isinstance(load_config(EXAMPLE, Role.SERVER), ServerConfig)


def test_a_daemon_refuses_the_other_roles_file() -> None:
    with pytest.raises(ConfigError) as info:
        load_balancer_config(EXAMPLE)
    line = line_of(EXAMPLE.read_text(), "role:")
    assert str(info.value) == (
        f"{EXAMPLE}:{line}: role: this is a server configuration, but a balancer configuration is needed here"
    )
    with pytest.raises(ConfigError) as info:
        load_server_config(BALANCER_EXAMPLE)
    assert (info.value.line, info.value.path) == (line_of(BALANCER_EXAMPLE.read_text(), "role:"), "role")
    assert info.value.message == "this is a balancer configuration, but a server configuration is needed here"


def test_the_node_section_serves_both_roles() -> None:
    """`mplsorch status --config FILE` reads node.control_socket whatever the role."""
    for path in (EXAMPLE, BALANCER_EXAMPLE):
        assert load_config(path).node.control_socket == "/run/mplsorch/mplsorch.sock"


# ---- one broken file per rule: (text, marker of the offending line, key path, the exact message) ----

BLOCK_VIPS = _edit(BASE, V4 + V6, '  10.0.0.100:\n    table: 100\n  "fd00:100::100":\n    table: 101\n')
NH4 = _edit(BASE, '[10.1.1.1, "fd00:11::1"]', "10.1.1.1")

CASES: dict[str, tuple[str, str, str, str]] = {
    # role and structure
    "role misspelt": (
        _edit(BASE, "role: server", "role: servr"),
        "role:",
        "role",
        "unknown role 'servr'; expected one of balancer, server, client; did you mean 'server'?",
    ),
    "role missing": (
        _edit(BASE, "role: server\n", ""),
        "node:",
        "role",
        "required key is missing (balancer or server or client)",
    ),
    "role not a string": (
        _edit(BASE, "role: server", "role: [server]"),
        "role:",
        "role",
        "expected a string, got a list",
    ),
    "unknown top key": (
        BASE + "sesions:\n  persistence_timeout: 1s\n",
        "sesions",
        "sesions",
        "unknown key; did you mean 'sessions'?",
    ),
    "a balancer key": (
        BASE + "pools: {}\n",
        "pools",
        "pools",
        "unknown key (a key of role balancer, but this file has role: server)",
    ),
    "balancer's interfaces.clients": (
        _edit(BASE, "  fabric: [eth0]\n", "  clients: [lan0]\n  fabric: [eth0]\n"),
        "clients",
        "interfaces.clients",
        "unknown key",
    ),
    "balancer's nfqueue.queues": (
        BASE + "nfqueue:\n  queues: [0, 1]\n",
        "queues",
        "nfqueue.queues",
        "unknown key; did you mean 'queue'?",
    ),
    "balancer's labels.range": (
        _edit(BASE, "  block: [1001, 1999]\n", "  range: [1001, 1999]\n"),
        "range",
        "labels.range",
        "unknown key",
    ),
    "unknown nested key": (
        _edit(BASE, "  transport_label: 101\n", "  transport_label: 101\n  setpu: apply\n"),
        "setpu",
        "node.setpu",
        "unknown key; did you mean 'setup'?",
    ),
    "duplicate key": (
        _edit(BASE, "  transport_label: 100\n", "  transport_label: 100\n  transport_label: 99\n"),
        "transport_label: 99",
        "balancer.transport_label",
        "duplicate key (first given at line 5)",
    ),
    "duplicate vip key": (BASE + V4, "10.0.0.100", "vips.10.0.0.100", "duplicate key (first given at line 12)"),
    "merge keys": (_edit(BASE, "vips:\n", "vips:\n  <<: {}\n"), "<<", "vips.<<", "merge keys (<<) are not supported"),
    "missing node": (_edit(BASE, "node:\n  transport_label: 101\n", ""), "role:", "node", "required key is missing"),
    "missing balancer": (
        _edit(BASE, "balancer:\n  transport_label: 100\n", ""),
        "role:",
        "balancer",
        "required key is missing",
    ),
    "missing vips": (BASE.split("vips:")[0], "role:", "vips", "required key is missing"),
    "missing node transport label": (
        _edit(BASE, "  transport_label: 101\n", "  setup: check\n"),
        "node:",
        "node.transport_label",
        "required key is missing",
    ),
    "missing balancer transport label": (
        _edit(BASE, "balancer:\n  transport_label: 100\n", "balancer: {}\n"),
        "balancer:",
        "balancer.transport_label",
        "required key is missing",
    ),
    "missing fabric": (
        _edit(BASE, "  fabric: [eth0]\n", ""),
        "interfaces:",
        "interfaces.fabric",
        "required key is missing",
    ),
    "missing next hop": (
        _edit(BASE, '  fabric_next_hop: [10.1.1.1, "fd00:11::1"]\n', ""),
        "interfaces:",
        "interfaces.fabric_next_hop",
        "required key is missing",
    ),
    "labels without block": (
        _edit(BASE, "labels:\n  block: [1001, 1999]\n", "labels: {}\n"),
        "labels:",
        "labels.block",
        "required key is missing",
    ),
    "missing table": (
        _edit(BASE, "{table: 101}", "{}"),
        "fd00:100::100",
        "vips.fd00:100::100.table",
        "required key is missing",
    ),
    "unknown vip key": (
        _edit(BASE, "{table: 100}", "{table: 100, tabel: 5}"),
        "10.0.0.100",
        "vips.10.0.0.100.tabel",
        "unknown key; did you mean 'table'?",
    ),
    "list instead of mapping": (
        _edit(BASE, "node:\n  transport_label: 101\n", "node: [101]\n"),
        "node:",
        "node",
        "expected a mapping, got a list",
    ),
    # node
    "setup": (
        _edit(BASE, "  transport_label: 101\n", "  transport_label: 101\n  setup: chek\n"),
        "setup",
        "node.setup",
        "unknown setup mode 'chek'; expected one of check, apply; did you mean 'check'?",
    ),
    "control group unknown": (
        _edit(BASE, "  transport_label: 101\n", "  transport_label: 101\n  control_group: no-such-group-x\n"),
        "control_group",
        "node.control_group",
        "no group 'no-such-group-x' on this host",
    ),
    "control socket empty": (
        _edit(BASE, "  transport_label: 101\n", "  transport_label: 101\n  control_socket: ''\n"),
        "control_socket",
        "node.control_socket",
        "expected a non-empty string, got ''",
    ),
    # transport labels
    "node transport label reserved": (
        _edit(BASE, "transport_label: 101", "transport_label: 15"),
        "transport_label: 15",
        "node.transport_label",
        "transport label 15 is out of range: must be 16..1048575",
    ),
    "balancer transport label too big": (
        _edit(BASE, "transport_label: 100", "transport_label: 1048576"),
        "1048576",
        "balancer.transport_label",
        "transport label 1048576 is out of range: must be 16..1048575",
    ),
    "transport label as string": (
        _edit(BASE, "transport_label: 101", 'transport_label: "101"'),
        '"101"',
        "node.transport_label",
        "expected an integer, got '101'",
    ),
    "transport labels equal": (
        _edit(BASE, "transport_label: 100", "transport_label: 101"),
        "transport_label: 101",
        "balancer.transport_label",
        "transport label 101 is this server's own (node.transport_label): the balancer's must differ",
    ),
    "node transport label in block": (
        _edit(BASE, "transport_label: 101", "transport_label: 1500"),
        "1500",
        "node.transport_label",
        "transport label 1500 lies inside labels.block 1001..1999",
    ),
    "balancer transport label in block": (
        _edit(BASE, "transport_label: 100", "transport_label: 1999"),
        "transport_label: 1999",
        "balancer.transport_label",
        "transport label 1999 lies inside labels.block 1001..1999",
    ),
    # labels.block
    "block below 16": (
        _edit(BASE, "[1001, 1999]", "[15, 1999]"),
        "block:",
        "labels.block",
        "label 15 is out of range: must be within 16..1048575",
    ),
    "block above 20 bits": (
        _edit(BASE, "[1001, 1999]", "[1001, 1048576]"),
        "block:",
        "labels.block",
        "label 1048576 is out of range: must be within 16..1048575",
    ),
    "block reversed": (
        _edit(BASE, "[1001, 1999]", "[1999, 1001]"),
        "block:",
        "labels.block",
        "first 1999 must be < last 1001",
    ),
    "block empty": (
        _edit(BASE, "[1001, 1999]", "[1001, 1001]"),
        "block:",
        "labels.block",
        "first 1001 must be < last 1001",
    ),
    "block one item": (
        _edit(BASE, "[1001, 1999]", "[1001]"),
        "block:",
        "labels.block",
        "expected [first, last] (two integers), got 1 items",
    ),
    "block without a pair": (
        _edit(BASE, "[1001, 1999]", "[1000, 1001]"),
        "block:",
        "labels.block",
        "block 1000..1001 holds no odd C2S label whose S2C label (C2S + 1) is inside it too",
    ),
    "block a scalar": (_edit(BASE, "[1001, 1999]", "1001"), "block:", "labels.block", "expected a list, got '1001'"),
    # vips
    "vip not an address": (
        _edit(BASE, "10.0.0.100:", "10.0.0.x:"),
        "10.0.0.x",
        "vips.10.0.0.x",
        "'10.0.0.x' is not an IP address",
    ),
    "vip a network": (
        _edit(BASE, "10.0.0.100:", "10.0.0.0/24:"),
        "10.0.0.0/24",
        "vips.10.0.0.0/24",
        "'10.0.0.0/24' is not an IP address",
    ),
    "vip multicast": (
        _edit(BASE, "10.0.0.100:", "224.0.0.1:"),
        "224.0.0.1",
        "vips.224.0.0.1",
        "'224.0.0.1' is not a usable unicast address",
    ),
    "vip unspecified": (
        _edit(BASE, '"fd00:100::100"', '"::"'),
        '"::"',
        "vips.::",
        "'::' is not a usable unicast address",
    ),
    "vip twice, written differently": (
        _edit(BASE, V4, '  "fd00:100:0::100": {table: 100}\n'),
        '"fd00:100::100"',
        "vips.fd00:100::100",
        "VIP fd00:100::100 is already given as vips.fd00:100:0::100 (line 12)",
    ),
    "vip key not a string": (
        _edit(BASE, V6, "  1:2:3:4:5:6:7:8: {table: 101}\n"),
        "1:2:3:4:5:6:7:8",
        "vips",
        "keys must be plain strings, got '1:2:3:4:5:6:7:8'; quote it to make it one",
    ),
    "no vips": (_edit(BASE, "vips:\n" + V4 + V6, "vips: {}\n"), "vips:", "vips", "at least one VIP is required"),
    "vips as a list": (
        _edit(BASE, "vips:\n" + V4 + V6, "vips: [10.0.0.100]\n"),
        "vips:",
        "vips",
        "expected a mapping, got a list",
    ),
    "vip without a mapping": (
        _edit(BASE, "{table: 100}", "100"),
        "10.0.0.100",
        "vips.10.0.0.100",
        "expected a mapping, got '100'",
    ),
    # tables
    "table 0": (
        _edit(BASE, "table: 100", "table: 0"),
        "table: 0",
        "vips.10.0.0.100.table",
        "table 0 is out of range: must be 1..4294967295",
    ),
    "table above 32 bits": (
        _edit(BASE, "table: 101", "table: 4294967296"),
        "4294967296",
        "vips.fd00:100::100.table",
        "table 4294967296 is out of range: must be 1..4294967295",
    ),
    "table negative": (
        _edit(BASE, "table: 101", "table: -1"),
        "table: -1",
        "vips.fd00:100::100.table",
        "table -1 is out of range: must be 1..4294967295",
    ),
    "table main": (
        _edit(BASE, "table: 100", "table: 254"),
        "table: 254",
        "vips.10.0.0.100.table",
        "table 254 is the kernel's main table (253 default, 254 main and 255 local are the kernel's own): use another",
    ),
    "table default": (
        _edit(BASE, "table: 101", "table: 253"),
        "table: 253",
        "vips.fd00:100::100.table",
        "table 253 is the kernel's default table (253 default, 254 main and 255 local are the "
        "kernel's own): use another",
    ),
    "table local": (
        _edit(BASE, "table: 101", "table: 255"),
        "table: 255",
        "vips.fd00:100::100.table",
        "table 255 is the kernel's local table (253 default, 254 main and 255 local are the kernel's own): use another",
    ),
    "table by name": (
        _edit(BASE, "table: 100", "table: main"),
        "table: main",
        "vips.10.0.0.100.table",
        "expected an integer, got 'main'",
    ),
    "table shared": (
        _edit(BASE, "table: 101", "table: 100"),
        "fd00:100::100",
        "vips.fd00:100::100.table",
        "table 100 is already the return table of vips.10.0.0.100: each VIP needs its own",
    ),
    "table shared, block style": (
        _edit(BLOCK_VIPS, "table: 101", "table: 100"),
        "table: 100",
        "vips.fd00:100::100.table",
        "table 100 is already the return table of vips.10.0.0.100: each VIP needs its own",
    ),
    # interfaces
    "no fabric": (
        _edit(BASE, "fabric: [eth0]", "fabric: []"),
        "fabric:",
        "interfaces.fabric",
        "must name at least one interface",
    ),
    "bad interface name": (
        _edit(BASE, "fabric: [eth0]", "fabric: [eth0, a/b]"),
        "fabric:",
        "interfaces.fabric[1]",
        "'a/b' is not a valid interface name",
    ),
    "interface name too long": (
        _edit(BASE, "fabric: [eth0]", "fabric: [abcdefghijklmnop]"),
        "fabric:",
        "interfaces.fabric[0]",
        "'abcdefghijklmnop' is not a valid interface name",
    ),
    "interface twice": (
        _edit(BASE, "fabric: [eth0]", "fabric: [eth0, eth0]"),
        "fabric:",
        "interfaces.fabric[1]",
        "interface 'eth0' is listed twice",
    ),
    "fabric a string": (
        _edit(BASE, "fabric: [eth0]", "fabric: eth0"),
        "fabric:",
        "interfaces.fabric",
        "expected a list, got 'eth0'",
    ),
    "next hop not an address": (
        _edit(BASE, '[10.1.1.1, "fd00:11::1"]', "router1"),
        "fabric_next_hop",
        "interfaces.fabric_next_hop",
        "'router1' is not an IP address",
    ),
    "next hop in a list not an address": (
        _edit(BASE, '"fd00:11::1"]', "router1]"),
        "fabric_next_hop",
        "interfaces.fabric_next_hop[1]",
        "'router1' is not an IP address",
    ),
    "next hop multicast": (
        _edit(BASE, "[10.1.1.1,", "[224.0.0.5,"),
        "fabric_next_hop",
        "interfaces.fabric_next_hop[0]",
        "'224.0.0.5' is not a usable unicast address",
    ),
    "no next hop": (
        _edit(BASE, '[10.1.1.1, "fd00:11::1"]', "[]"),
        "fabric_next_hop",
        "interfaces.fabric_next_hop",
        "must give at least one address (at most one per address family)",
    ),
    "two IPv4 next hops": (
        _edit(BASE, '[10.1.1.1, "fd00:11::1"]', '[10.1.1.1, "fd00:11::1", 10.1.1.2]'),
        "fabric_next_hop",
        "interfaces.fabric_next_hop[2]",
        "a second IPv4 next hop (10.1.1.1 is the first): give at most one per address family",
    ),
    "two IPv6 next hops, block style": (
        _edit(BASE, '[10.1.1.1, "fd00:11::1"]', '\n    - "fd00:11::1"\n    - "fe80::1"'),
        "fe80::1",
        "interfaces.fabric_next_hop[1]",
        "a second IPv6 next hop (fd00:11::1 is the first): give at most one per address family",
    ),
    "IPv6 VIP without an IPv6 next hop": (
        NH4,
        "fd00:100::100",
        "vips.fd00:100::100",
        "IPv6 VIP needs an IPv6 interfaces.fabric_next_hop (its S2C return routes go there)",
    ),
    "IPv4 VIP without an IPv4 next hop": (
        _edit(BASE, '[10.1.1.1, "fd00:11::1"]', '["fd00:11::1"]'),
        "10.0.0.100",
        "vips.10.0.0.100",
        "IPv4 VIP needs an IPv4 interfaces.fabric_next_hop (its S2C return routes go there)",
    ),
    "IPv6 VIP without a next hop, block style": (
        _edit(BLOCK_VIPS, '[10.1.1.1, "fd00:11::1"]', "10.1.1.1"),
        '"fd00:100::100":',
        "vips.fd00:100::100",
        "IPv6 VIP needs an IPv6 interfaces.fabric_next_hop (its S2C return routes go there)",
    ),
    # sessions
    "negative persistence": (
        BASE + "sessions:\n  persistence_timeout: -1\n",
        "persistence_timeout",
        "sessions.persistence_timeout",
        "-1 is out of range: must be >= 0",
    ),
    "bad duration": (
        BASE + "sessions:\n  persistence_timeout: 5x\n",
        "persistence_timeout",
        "sessions.persistence_timeout",
        '\'5x\' is not a duration: write e.g. "30s", "5m", "1h", "500ms" or a number of seconds',
    ),
    "negative duration string": (
        BASE + "sessions:\n  persistence_timeout: -2s\n",
        "persistence_timeout",
        "sessions.persistence_timeout",
        '\'-2s\' is not a duration: write e.g. "30s", "5m", "1h", "500ms" or a number of seconds',
    ),
    "persistence infinite": (
        BASE + "sessions:\n  persistence_timeout: .inf\n",
        "persistence_timeout",
        "sessions.persistence_timeout",
        ".inf is out of range: must be >= 0",
    ),
    "unknown sessions key": (BASE + "sessions:\n  timeout: 5s\n", "timeout", "sessions.timeout", "unknown key"),
    # nfqueue
    "queue too big": (
        BASE + "nfqueue:\n  queue: 65536\n",
        "  queue:",
        "nfqueue.queue",
        "queue 65536 is out of range: must be 0..65535",
    ),
    "queue negative": (
        BASE + "nfqueue:\n  queue: -1\n",
        "  queue:",
        "nfqueue.queue",
        "queue -1 is out of range: must be 0..65535",
    ),
    "queue as a range": (
        BASE + "nfqueue:\n  queue: [0, 1]\n",
        "  queue:",
        "nfqueue.queue",
        "expected an integer, got a list",
    ),
    "batch zero": (BASE + "nfqueue:\n  batch: 0\n", "batch:", "nfqueue.batch", "batch 0 is out of range: must be >= 1"),
    "balancer's rate_limit": (
        BASE + "nfqueue:\n  rate_limit: null\n",
        "rate_limit",
        "nfqueue.rate_limit",
        "unknown key",
    ),
}


# Cases whose marker also occurs earlier in the file: the error is on its second occurrence.
SECOND = {"duplicate vip key": 2, "transport labels equal": 2, "table shared, block style": 2}


@pytest.mark.parametrize("name", list(CASES))
def test_broken_file_names_line_key_and_problem(name: str) -> None:
    text, marker, path, message = CASES[name]
    e = error_of(text)
    line = line_of(text, marker, SECOND.get(name, 1))
    assert (e.source, e.line, e.path, e.message) == ("s1.yaml", line, path, message), str(e)
    assert str(e) == f"s1.yaml:{line}: {path}: {message}"


def test_a_server_key_in_a_balancer_file_is_named_as_such() -> None:
    text = BALANCER_EXAMPLE.read_text() + "vips: {}\n"
    e = error_of(text)
    assert (e.line, e.path) == (line_of(text, "vips: {}"), "vips")
    assert e.message == "unknown key (a key of role server, but this file has role: balancer)"


def test_yaml_syntax_error_has_a_line() -> None:
    e = error_of(_edit(BASE, "block: [1001, 1999]", "block: [1001, 1999"))
    assert e.path == "(yaml)" and e.line is not None and e.message.startswith("not valid YAML")


# ---- CLI ----

runner = CliRunner()


def test_cli_validate_ok() -> None:
    r = runner.invoke(app, ["config", "validate", str(EXAMPLE)])
    assert r.exit_code == 0, r.output
    assert r.stdout == f"{EXAMPLE}: ok (server, 2 VIPs, 499 C2S labels)\n"


def test_cli_validate_counts_in_the_singular(tmp_path: Path) -> None:
    f = tmp_path / "s1.yaml"
    f.write_text(_edit(_edit(NH4, V6, ""), "[1001, 1999]", "[1001, 1002]"))
    r = runner.invoke(app, ["config", "validate", str(f)])
    assert r.exit_code == 0, r.output
    assert r.stdout == f"{f}: ok (server, 1 VIP, 1 C2S label)\n"


def test_cli_validate_balancer_output_unchanged() -> None:
    r = runner.invoke(app, ["config", "validate", str(BALANCER_EXAMPLE)])
    assert r.exit_code == 0 and r.stdout == f"{BALANCER_EXAMPLE}: ok (3 services, 3 servers)\n"


def test_cli_validate_invalid(tmp_path: Path) -> None:
    f = tmp_path / "s1.yaml"
    f.write_text(NH4)
    r = runner.invoke(app, ["config", "validate", str(f)])
    assert r.exit_code == 2 and r.stdout == ""
    assert r.stderr == (
        f"{f}:13: vips.fd00:100::100: IPv6 VIP needs an IPv6 interfaces.fabric_next_hop "
        "(its S2C return routes go there)\n"
    )


@pytest.mark.parametrize("json_output", [False, True])
def test_cli_show_round_trips(tmp_path: Path, json_output: bool) -> None:
    r = runner.invoke(app, ["config", "show", *(["--json"] if json_output else []), str(EXAMPLE)])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout) if json_output else yaml.safe_load(r.stdout)
    assert data == load_config(EXAMPLE).to_dict()
    shown = tmp_path / "shown.yaml"
    shown.write_text(r.stdout)
    assert load_config(shown) == load_config(EXAMPLE)
    r = runner.invoke(app, ["config", "validate", str(shown)])
    assert r.exit_code == 0 and r.stdout == f"{shown}: ok (server, 2 VIPs, 499 C2S labels)\n"


def test_cli_show_fills_in_defaults(tmp_path: Path) -> None:
    f = tmp_path / "s1.yaml"
    f.write_text(BASE)
    r = runner.invoke(app, ["config", "show", str(f)])
    assert r.exit_code == 0, r.output
    shown = yaml.safe_load(r.stdout)
    assert shown["node"] == {
        "transport_label": 101,
        "control_socket": "/run/mplsorch/mplsorch.sock",
        "control_group": None,
        "setup": "check",
    }
    assert shown["sessions"] == {"persistence_timeout": 30.0} and shown["nfqueue"] == {"queue": 8, "batch": 64}
    assert parse_config(r.stdout) == parse_config(BASE)
