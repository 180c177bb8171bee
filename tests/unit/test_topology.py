"""Lab topology parsing and validation, plus the lab's pure planning and leftover cleanup (no root)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator.lab import netns
from orchestrator.lab.topology import SWITCH_NETNS, TopologyError, default_text, load, parse


def _default() -> dict:
    return yaml.safe_load(default_text())


def _parse(doc: dict):
    return parse(yaml.safe_dump(doc, sort_keys=False), "test")


def test_default_parses() -> None:
    t = load()
    assert t.names("client") == ["c1", "c2", "c3"]
    assert t.names("balancer") == ["lb"] and t.names("fabric") == ["p"]
    assert t.names("server") == ["s1", "s2", "s3"]
    assert {n.name: n.transport_label for n in t.nodes if n.transport_label} == {
        "lb": 100,
        "s1": 101,
        "s2": 102,
        "s3": 103,
    }
    assert [str(v) for v in t.vips] == ["10.0.0.100", "fd00:100::100"] and t.platform_labels == 100000
    seg = {s.name: s for s in t.segments}
    assert seg["lan"].is_bridge and seg["farm1"].is_bridge
    assert not seg["core"].is_bridge and not seg["farm2"].is_bridge
    assert str(seg["core"].member("lb").address) == "10.255.0.1" and seg["core"].member("p").dev == "pl"
    assert str(seg["farm1"].member("s2").address) == "10.1.1.11"
    assert str(seg["farm2"].member("s3").address) == "10.1.2.10"
    assert [str(a) for a in seg["lan"].member("c1").addresses] == ["10.0.1.10", "fd00:1::10"]
    assert str(seg["lan"].member("c1").of_version(6)) == "fd00:1::10" and seg["lan"].prefixlen(6) == 64


def test_dual_stack_nodes_get_both_addresses_and_default_routes() -> None:
    t = load()
    assert netns.node_addresses(t, "c1") == [
        "link set lo up",
        "addr add 10.0.1.10/24 dev eth0",
        "addr add fd00:1::10/64 dev eth0 nodad",
        "link set eth0 up",
    ]
    assert netns.node_routes(t, "c1") == ["route add 0.0.0.0/0 via 10.0.1.1", "route add ::/0 via fd00:1::1"]
    assert netns.node_routes(t, "lb") == [
        "route add 10.0.0.100/32 via 10.255.0.2 dev fab0",
        "route add fd00:100::100/128 via fd00:ff::2 dev fab0",
    ]
    assert "addr add fd00:100::100/128 dev lo" in netns.node_addresses(t, "s1")


@pytest.mark.parametrize(
    "mutate, expected",
    [
        (lambda d: d["nodes"]["c1"].update(role="router"), r"nodes\.c1\.role: unknown role 'router'"),
        (
            lambda d: d["segments"]["lan"]["members"]["c2"].update(address="10.0.1.10"),
            r"segments\.lan\.members\.c2\.address: duplicate address 10\.0\.1\.10",
        ),
        (
            lambda d: d["segments"]["lan"]["members"]["c1"].update(address="10.9.9.9"),
            r"segments\.lan\.members\.c1\.address: 10\.9\.9\.9 is outside the subnet 10\.0\.1\.0/24",
        ),
        (
            lambda d: d["segments"]["lan"]["members"].update(c9={"dev": "eth0", "address": "10.0.1.99"}),
            r"segments\.lan\.members\.c9: not a node",
        ),
        (lambda d: d["segments"]["core"].pop("subnet"), r"segments\.core\.subnet: missing key"),
        (
            lambda d: d["segments"]["core"].update(subnet=["10.255.0.0/30", "10.255.1.0/30"]),
            r"segments\.core\.subnet: two IPv4 subnets \(one per family\)",
        ),
        (
            lambda d: d["segments"]["core"].update(subnet="10.255.0.0/30"),
            r"segments\.core\.members\.lb\.address: fd00:ff::1 is outside the subnet 10\.255\.0\.0/30$",
        ),
        (
            lambda d: d["segments"]["lan"]["members"]["c1"].update(address=["fd00:1::10", "fd00:1::20"]),
            r"segments\.lan\.members\.c1\.address: two IPv6 addresses",
        ),
        (lambda d: d["nodes"]["lb"].pop("role"), r"nodes\.lb\.role: missing key"),
        (lambda d: d.pop("segments"), r"topology\.segments: missing key"),
        (lambda d: d["segments"]["lan"]["members"]["c1"].pop("dev"), r"segments\.lan\.members\.c1\.dev: missing key"),
        (
            lambda d: d["nodes"]["s2"].update(transport_label=101),
            r"nodes\.s2\.transport_label: 101 already used by node s1",
        ),
        (lambda d: d["nodes"]["s1"].update(transport_label=7), r"nodes\.s1\.transport_label: label 7 outside"),
        (lambda d: d["nodes"]["c1"].update(transport_label=200), r"nodes\.c1\.transport_label: only balancer"),
        (lambda d: d["nodes"]["c1"].update(colour="red"), r"nodes\.c1\.colour: unknown key"),
        (
            lambda d: d["segments"]["lan"]["members"]["c1"].update(dev="averyveryverylongname"),
            r"segments\.lan\.members\.c1\.dev: 'averyveryverylongname' is not a valid interface name",
        ),
        (lambda d: d["segments"]["lan"].update(subnet="10.0.1.1/24"), r"segments\.lan\.subnet: '10\.0\.1\.1/24'"),
        (lambda d: d.update(vips=["10.0.0.100", "10.0.0.100"]), r"vips\[1\]: duplicate address"),
        (lambda d: d.update(vips=["not-an-ip"]), r"vips\[0\]: 'not-an-ip' is not an IP address"),
        (lambda d: d["segments"].pop("core"), r"nodes\.lb: balancer shares no segment with a fabric node"),
        (
            lambda d: d["segments"]["lan"]["members"]["lb"].update(dev="fab0"),
            r"segments\.core\.members\.lb\.dev: lb already has fab0 on segment lan",
        ),
        (lambda d: d["nodes"].update({"Bad_Name": {"role": "client"}}), r"nodes\.Bad_Name: bad node name"),
        (lambda d: d["nodes"].update({SWITCH_NETNS: {"role": "client"}}), r"bad node name"),
    ],
)
def test_bad_topologies_name_the_problem(mutate, expected: str) -> None:
    doc = _default()
    mutate(doc)
    with pytest.raises(TopologyError, match=expected):
        _parse(doc)


def test_duplicate_yaml_key_is_an_error() -> None:
    text = default_text().replace("  c2: {role: client}", "  c1: {role: client}")
    with pytest.raises(TopologyError, match=r"duplicate key 'c1'"):
        parse(text)


def test_unreadable_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(TopologyError, match="cannot read topology file"):
        load(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: [\n")
    with pytest.raises(TopologyError, match="not valid YAML"):
        load(str(bad))


def test_sysctls_mpls_input_only_on_fabric_links() -> None:
    t = load()
    lb, p, s1, c1 = (netns.sysctls(t, n) for n in ("lb", "p", "s1", "c1"))
    assert c1 == {}
    assert lb["net/mpls/conf/fab0/input"] == "1" and lb["net/mpls/conf/lan0/input"] == "0"
    assert lb["net/ipv4/ip_forward"] == "1" and lb["net/mpls/platform_labels"] == "100000"
    assert all(p[f"net/mpls/conf/{d}/input"] == "1" for d in ("pl", "ps1", "ps2"))
    assert s1["net/mpls/conf/eth0/input"] == "1" and s1["net/mpls/conf/lo/input"] == "1"
    assert s1["net/ipv4/conf/all/rp_filter"] == "0" and "net/ipv4/ip_forward" not in s1


def test_transport_routes_pop_towards_each_labelled_node() -> None:
    assert netns.transport_routes(load(), "p") == [
        "route add 100 via inet 10.255.0.1 dev pl",
        "route add 101 via inet 10.1.1.10 dev ps1",
        "route add 102 via inet 10.1.1.11 dev ps1",
        "route add 103 via inet 10.1.2.10 dev ps2",
    ]


def test_describe_lists_interfaces_and_peers(tmp_path: Path) -> None:
    d = netns.describe(load(), netns.LabPaths(run_dir=tmp_path), vm=False)
    lb = next(n for n in d["nodes"] if n["name"] == "lb")
    assert lb["netns"] == "lb" and lb["transport_label"] == 100
    assert lb["interfaces"][1] == {
        "dev": "fab0",
        "address": "10.255.0.1",
        "prefix": 30,
        "segment": "core",
        "addresses": ["10.255.0.1/30", "fd00:ff::1/64"],
        "peer": "p",
        "peers": [{"node": "p", "dev": "pl", "address": "10.255.0.2", "addresses": ["10.255.0.2", "fd00:ff::2"]}],
    }
    assert lb["interfaces"][0]["peer"] is None and len(lb["interfaces"][0]["peers"]) == 3
    json.dumps(d)


class FakeShell:
    """Records commands; pretends every namespace exists until deleted."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], input: str | None = None) -> str:
        self.calls.append(argv)
        return ""


def test_leftovers_named_by_the_state_file_are_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = netns.LabPaths(run_dir=tmp_path / "run", etc_netns=tmp_path / "etc-netns", lock=tmp_path / "lock")
    netns_dir = tmp_path / "netns"
    monkeypatch.setattr(netns, "NETNS_DIR", netns_dir)
    state = netns.plan(load(), paths)
    # what a crashed run leaves: namespaces, /etc/netns dirs, runtime dirs, the state file
    netns_dir.mkdir()
    for ns in state.netns + ["foreign"]:
        (netns_dir / ns).touch()
    (paths.etc_netns / "foreign").mkdir(parents=True)
    for n in ("c1", "s3"):
        (paths.etc_netns / n).mkdir()
        (paths.etc_netns / n / "hosts").write_text("x")
    (paths.run_dir / "lb").mkdir(parents=True)
    paths.state.write_text(state.to_json())
    shell = FakeShell()
    with netns.lab_lock(paths):
        old = netns.cleanup_leftovers(paths, shell)
    assert old is not None and old.netns == state.netns
    deleted = [c[3] for c in shell.calls if c[:3] == ["ip", "netns", "delete"]]
    assert deleted == state.netns and "foreign" not in deleted and SWITCH_NETNS in deleted
    assert not (paths.etc_netns / "c1").exists() and not (paths.etc_netns / "s3").exists()
    assert (paths.etc_netns / "foreign").exists()
    assert not paths.run_dir.exists()
    assert netns.cleanup_leftovers(paths, shell) is None  # nothing left the second time


def test_state_never_removes_outside_its_roots(tmp_path: Path) -> None:
    paths = netns.LabPaths(run_dir=tmp_path / "run", etc_netns=tmp_path / "etc-netns", lock=tmp_path / "lock")
    victim = tmp_path / "precious"
    victim.mkdir()
    problems = netns.remove(netns.LabState(netns=[], dirs=[str(victim)]), paths, FakeShell())
    assert victim.exists() and "refused" in problems[0]


def test_check_free_refuses_foreign_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "NETNS_DIR", tmp_path)
    (tmp_path / "c1").touch()
    paths = netns.LabPaths(run_dir=tmp_path / "run", etc_netns=tmp_path / "etc-netns")
    with pytest.raises(netns.LabError, match="network namespace c1 already exists"):
        netns.check_free(netns.plan(load(), paths))


def test_lock_refuses_a_second_run(tmp_path: Path) -> None:
    paths = netns.LabPaths(run_dir=tmp_path / "run", lock=tmp_path / "lock")
    with netns.lab_lock(paths):
        with pytest.raises(netns.LabError, match=r"another lab run holds .*lock \(pid \d+\)"):
            with netns.lab_lock(paths):  # a second open file description: flock conflicts
                pass
