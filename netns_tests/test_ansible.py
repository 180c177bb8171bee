"""The Ansible roll-out in the lab: ansible-playbook over SSH (an sshd in every managed node, on
the node's own address) rolls ansible/site.yml out with the lab inventory from bare namespaces:
the fabric switch's transport labels, the balancer and the server agents, each node made ready
by mpls_node so that the daemons' `node.setup: check` passes. Then HTTP through the VIPs works
from every client, a second run changes nothing, and a broken variable fails the play with the
validator's message and leaves every node as it was.
The tests share one roll-out and run in order. ansible-lint and --syntax-check run as unit
tests (tests/unit/test_ansible_lint.py)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import pytest

from netns_tests.harness.ansible_lab import (
    WHEELHOUSE,
    AnsibleLab,
    Run,
    bare,
    managed,
    mpls_routes,
    restore,
    wheelhouse_wheel,
)
from orchestrator.lab.kit import Lab

DAEMONS = ("lb", "s1", "s2", "s3")
LOG_MARKS = ("running:", "configuration reloaded", "reload rejected", "node setup")


@pytest.fixture(scope="module")
def ansible_lab(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AnsibleLab]:
    assert any(WHEELHOUSE.glob("pyroute2-*.whl")), (
        f"no wheelhouse at {WHEELHOUSE}: `bash bootstrap.sh setup` fills it (the lab VM has no network)"
    )
    wheel = wheelhouse_wheel()  # built from this tree by bootstrap.sh
    taken = bare(lab)
    a = AnsibleLab(lab, tmp_path_factory.mktemp("ansible"))
    try:
        a.start(wheel)
        yield a
    finally:
        a.close()
        restore(lab, taken)


@pytest.fixture(scope="module")
def rollout(lab: Lab, ansible_lab: AnsibleLab) -> Run:
    """The first run, from bare nodes."""
    assert mpls_routes(lab, "p") == []
    assert lab.sh("s1", "ip", "-o", "address", "show", "dev", "lo").stdout.count(lab.vip) == 0
    return ansible_lab.playbook("--diff")


def _sysctl(lab: Lab, node: str, name: str) -> str:
    return lab.sh(node, "sysctl", "-n", name).stdout.strip()


def _state(lab: Lab, a: AnsibleLab) -> dict[str, Any]:
    """What a run must not change: configuration files, daemon pids and logs, labels, sysctls."""
    return {
        "configs": {n: a.config_file(n).read_text() for n in DAEMONS},
        "pids": {n: a.daemon_pid(n) for n in DAEMONS},
        # Starts and reloads (sessions of the HTTP test may still start and end meanwhile).
        "log_marks": {n: [a.daemon_log(n).count(m) for m in LOG_MARKS] for n in DAEMONS},
        "routes": mpls_routes(lab, "p"),
        "labels": {n: _sysctl(lab, n, "net.mpls.platform_labels") for n in managed(lab)},
    }


def test_the_playbook_rolls_out_the_lab_from_bare_namespaces(lab: Lab, ansible_lab: AnsibleLab, rollout: Run) -> None:
    assert rollout.rc == 0, rollout.output[-8000:]
    assert sorted(rollout.recap) == sorted(managed(lab)), rollout.recap
    assert all(n == 0 for n in rollout.failed().values()), rollout.recap
    assert all(n > 0 for n in rollout.changed().values()), rollout.recap
    # mpls_node on the fabric switch: each transport label popped towards its node, the table sized to need.
    routes = {line.split()[0]: line for line in mpls_routes(lab, "p")}
    labelled = [n["name"] for n in lab.desc["nodes"] if n["transport_label"] is not None]
    for node in labelled:
        line = routes.pop(str(lab.node(node)["transport_label"]))
        assert f"via inet {lab.peer_address('p', node)} dev {lab.iface('p', towards=node)['dev']}" in line, line
    assert routes == {}
    assert _sysctl(lab, "p", "net.mpls.platform_labels") == str(
        max(lab.node(n)["transport_label"] for n in labelled) + 1
    )
    assert {d["dev"]: _sysctl(lab, "p", f"net.mpls.conf.{d['dev']}.input") for d in lab.node("p")["interfaces"]} == {
        d["dev"]: "1" for d in lab.node("p")["interfaces"]
    }
    # The balancer: MPLS input on the fabric link only, its label table past labels.range.
    assert _sysctl(lab, "lb", "net.mpls.conf.fab0.input") == "1"
    assert _sysctl(lab, "lb", "net.mpls.conf.lan0.input") == "0"
    assert _sysctl(lab, "lb", "net.mpls.platform_labels") == "2000"
    assert _sysctl(lab, "lb", "net.netfilter.nf_conntrack_checksum") == "0"  # the mobile service
    # The servers: VIPs on lo, MPLS input on eth0 and lo, rp_filter no longer strict, table past the block.
    for node, last in (("s1", 1332), ("s2", 1664), ("s3", 1999)):
        assert all(vip in lab.sh(node, "ip", "address", "show", "dev", "lo").stdout for vip in lab.desc["vips"])
        assert _sysctl(lab, node, "net.mpls.conf.lo.input") == _sysctl(lab, node, "net.mpls.conf.eth0.input") == "1"
        assert _sysctl(lab, node, "net.ipv4.conf.lo.rp_filter") == "2"
        assert _sysctl(lab, node, "net.mpls.platform_labels") == str(last + 1)
    # The daemons run under the fallback supervisor, from their venv, and only checked their node.
    for node in DAEMONS:
        pid = ansible_lab.daemon_pid(node)
        assert pid and Path(f"/proc/{pid}").exists(), ansible_lab.daemon_log(node)
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert str(ansible_lab.venv / "bin" / "mplsorch").encode() in cmdline
        log = ansible_lab.daemon_log(node)
        assert "running:" in log and "node setup: done" not in log, log[-3000:]
        assert "setup: check" in ansible_lab.config_file(node).read_text()
    # One balancer (no mplsorch_balancer_cluster): no cluster section, no etcd client installed.
    assert "cluster:" not in ansible_lab.config_file("lb").read_text()
    assert not list(ansible_lab.venv.glob("lib/python*/site-packages/aetcd"))


def test_http_through_the_vips_works_from_every_client(lab: Lab, rollout: Run) -> None:
    assert rollout.rc == 0
    for server in lab.names("server"):
        for vip in lab.desc["vips"]:
            lab.http_server(server, vip)
    for client in lab.names("client"):
        for vip in lab.desc["vips"]:
            url = f"http://[{vip}]/" if ":" in vip else f"http://{vip}/"
            assert lab.curl(client, url, timeout=20) == "200", (client, vip)


def test_a_second_run_changes_nothing(lab: Lab, ansible_lab: AnsibleLab, rollout: Run) -> None:
    assert rollout.rc == 0
    before = _state(lab, ansible_lab)
    again = ansible_lab.playbook()
    assert again.rc == 0, again.output[-8000:]
    assert again.changed() == {node: 0 for node in managed(lab)}, again.output[-8000:]
    assert _state(lab, ansible_lab) == before


def test_check_mode_shows_a_change_and_makes_none(lab: Lab, ansible_lab: AnsibleLab, rollout: Run) -> None:
    """A wider label range, previewed on the balancer (--limit: each playbook run costs minutes in
    the emulated VM): its configuration and label table would change, and nothing does."""
    assert rollout.rc == 0
    before = _state(lab, ansible_lab)
    run = ansible_lab.playbook("--check", "--diff", "--limit", "lb", mplsorch_label_range=[1001, 2999])
    assert run.rc == 0, run.output[-8000:]
    assert list(run.recap) == ["lb"] and run.changed()["lb"] >= 1, run.recap
    assert "-  - 1999\n+  - 2999\n" in run.output, run.output[-8000:]  # the configuration file's diff
    assert "+net.mpls.platform_labels: 3000\n" in run.output, run.output[-8000:]  # the kernel state's
    assert _state(lab, ansible_lab) == before


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            {"mplsorch_label_block": [1001, 1400]},
            "pools.web.servers.s2.label_block: block 1001..1400 of server 's2' overlaps block 1001..1400 of server 's1'",
        ),
        ({"mplsorch_vip4": "10.0.0.x"}, "services.http.vip: '10.0.0.x' is not an IP address"),
    ],
    ids=["overlapping-label-block", "vip-not-an-address"],
)
def test_a_broken_variable_fails_with_the_validators_message_and_changes_nothing(
    lab: Lab, ansible_lab: AnsibleLab, rollout: Run, extra: dict[str, Any], message: str
) -> None:
    assert rollout.rc == 0
    before = _state(lab, ansible_lab)
    run = ansible_lab.playbook(**extra)
    assert run.rc != 0
    assert message in run.output, run.output[-8000:]
    assert "failed to validate" in run.output
    assert run.failed()["lb"] == 1, run.recap
    # The roll-out stopped there: no server was touched, nothing was reloaded or restarted.
    assert all(run.recap.get(node, {}).get("changed", 0) == 0 for node in managed(lab)), run.recap
    assert _state(lab, ansible_lab) == before
    assert lab.curl("c1", f"http://{lab.vip}/", timeout=20) == "200"


def test_the_nodes_files_stay_in_their_own_runtime_dirs(lab: Lab, ansible_lab: AnsibleLab, rollout: Run) -> None:
    assert rollout.rc == 0
    for node in managed(lab):
        d = ansible_lab.node_dir(node)
        assert (d / "etc" / "sysctl.d" / "60-mplsorch.conf").exists()
        assert "mpls_router" in (d / "etc" / "modules-load.d" / "mplsorch.conf").read_text()
    assert (
        "-net.mpls.conf.pl.input = 1"
        in (ansible_lab.node_dir("p") / "etc" / "sysctl.d" / "60-mplsorch.conf").read_text()
    )
    assert not Path("/etc/mplsorch").exists() and not Path("/opt/mplsorch").exists()
    assert os.environ.get("MPLSORCH_LAB_JSON")
