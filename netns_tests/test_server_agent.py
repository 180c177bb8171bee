"""The server agent for real in the lab, behind the real balancer: sessions learned in-band from
their first labelled packet, answers under [balancer transport, S2C] with no plain-IP way back
through the fabric (so every answer that arrives was labelled), established packets never in
userspace, node check and setup, reload, and a restart under a running download. One balancer
and one agent per server serve the module's tests in order.

Plain servers (termination routes only, no agent) are what test_balancer.py runs against: they
answer as plain IP from the VIP, so they are not tested again here."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from orchestrator.dataplane import ops, records
from orchestrator.lab.kit import Lab, patience
from orchestrator.lab.server_lab import ServerLab, server_config
from orchestrator.lab.traffic import GET

SESSION_KEYS = {"client", "vip", "c2s_label", "s2c_label", "state", "flows", "created", "last_seen", "ends_at"}


@pytest.fixture(scope="module")
def farm(lab: Lab) -> Iterator[ServerLab]:
    # s3 is not ready for the agent; its configuration says `node.setup: apply`, so it fixes that.
    lab.sh("s3", "sysctl", "-qw", "net.mpls.conf.lo.input=0", "net.ipv4.conf.lo.rp_filter=1")
    f = ServerLab(lab)
    try:
        f.start()
        yield f
    finally:
        f.close()


def _started(farm: ServerLab, service: str, client: str) -> tuple[str, int, int]:
    """(server, C2S, S2C) of the balancer's session of `client` for `service`, from its log (the
    log is instant; a CLI call costs tens of seconds in the emulated VM)."""
    found = farm.balancer.logged("start", service, client)
    assert len(found) == 1, farm.balancer.log()[-2000:]
    return found[0]["server"], found[0]["c2s_label"], found[0]["s2c_label"]


def _agent_session(farm: ServerLab, server: str, client: str, vip: str) -> dict[str, Any]:
    rows = [s for s in farm.agents[server].sessions() if (s["client"], s["vip"]) == (client, vip)]
    assert len(rows) == 1, (rows, farm.agents[server].log()[-2000:])
    return rows[0]


def _wait_for(what: str, text: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + patience(timeout)
    while what not in text():
        assert time.monotonic() < deadline, (what, text()[-3000:])
        time.sleep(0.5)


def test_answers_leave_the_server_under_the_balancer_label_and_s2c(lab: Lab, farm: ServerLab) -> None:
    farm_link = lab.capture("p", lab.iface("p", towards="s1")["dev"], "agent-farm1")
    core_link = lab.capture("p", lab.iface("p", towards="lb")["dev"], "agent-core")
    assert farm.balancer.curl("c1") == "200"
    farm_stacks, core_stacks = set(farm_link.stacks()), set(core_link.stacks())
    c1 = lab.address("c1")
    server, c2s, s2c = _started(farm, "http", c1)
    assert server == "s1"  # rr on a fresh balancer: the first session goes to the first server
    lb_label, s1_label = lab.node("lb")["transport_label"], lab.node("s1")["transport_label"]
    # Towards s1 the fabric popped its transport label; s1 answers under [balancer transport, S2C] ...
    assert farm_stacks == {(c2s,), (lb_label, s2c)}, farm_stacks
    # ... and p pops the balancer's transport label (penultimate hop) towards the balancer.
    assert core_stacks == {(s1_label, c2s), (s2c,)}, core_stacks
    learned = _agent_session(farm, "s1", c1, lab.vip)
    assert (learned["c2s_label"], learned["s2c_label"]) == (c2s, s2c)
    # The return route points at the session's nexthop object, whose id says its S2C (as the
    # kernel shows them to iproute2 too).
    nh_id = records.nexthop_id(s2c, 4)
    dumped = [i.obj for i in lab.provider("s1").dump()]
    nexthop = next(o for o in dumped if isinstance(o, ops.EncapNexthop) and o.id == nh_id)
    assert nexthop.labels == (lb_label, s2c), dumped
    assert any(isinstance(o, ops.NexthopRoute) and o.dst == f"{c1}/32" and o.nexthop == nh_id for o in dumped), dumped
    shown = lab.sh("s1", "ip", "nexthop", "show", "id", str(nh_id)).stdout
    assert f"encap mpls  {lb_label}/{s2c}" in shown or f"encap mpls {lb_label}/{s2c}" in shown, shown
    assert f"session learned: {c1} -> {lab.vip} c2s {c2s} s2c {s2c}" in farm.agents["s1"].log()


def test_servers_in_both_farms_learn_their_sessions_and_see_the_client(lab: Lab, farm: ServerLab) -> None:
    servers = []
    for client, vip, service in (("c2", lab.vip, "http"), ("c3", lab.vip, "http"), ("c2", lab.vip6, "mobile")):
        assert farm.balancer.curl(client, vip) == "200"
        address = lab.address(client, version=6 if ":" in vip else 4)
        server, c2s, s2c = _started(farm, service, address)
        servers.append(server)
        # Asked at once: a session ends 2 s after conntrack has destroyed its last flow.
        row = _agent_session(farm, server, address, vip)
        assert SESSION_KEYS <= set(row), row
        assert (row["c2s_label"], row["s2c_label"]) == (c2s, s2c)
        assert row["created"] > 1.6e9  # Unix time
        log = Path(lab.node(server)["runtime_dir"]) / ("http-80-v6.log" if ":" in vip else "http-80.log")
        assert any(line.startswith(address + " ") for line in log.read_text().splitlines())
    assert servers[:2] == ["s2", "s3"]  # s2 in farm1, s3 in farm2 (rr)


def test_udp_sessions_are_learned_and_end_after_their_flow_and_the_persistence(lab: Lab, farm: ServerLab) -> None:
    c3 = lab.address("c3")
    assert farm.balancer.udp("c3") == "echo hello"
    server, c2s, s2c = _started(farm, "dns", c3)
    agent = farm.agents[server]
    assert f"session learned: {c3} -> {lab.vip} c2s {c2s} s2c {s2c}" in agent.log()
    # conntrack's UDP timeout (3 s), its garbage collector (up to a minute) and the persistence (2 s)
    _wait_for(f"session end: {c3} -> {lab.vip} c2s {c2s} s2c {s2c} (persistence timeout)", agent.log, 180)
    assert c2s not in {s["c2s_label"] for s in agent.sessions()}
    dumped = [i.obj for i in lab.provider(server).dump()]
    assert not [o for o in dumped if isinstance(o, ops.EncapRoute) and o.labels[-1] == s2c], dumped
    # The session's nexthop object went with its route.
    assert not [o for o in dumped if isinstance(o, ops.EncapNexthop) and o.labels[-1] == s2c], dumped
    assert not [o for o in dumped if isinstance(o, ops.NexthopRoute) and o.nexthop == records.nexthop_id(s2c, 4)]


def test_only_the_first_packet_of_each_flow_reaches_an_agent(farm: ServerLab) -> None:
    status = {node: agent.cli("status") for node, agent in farm.agents.items()}
    for s in status.values():
        assert s["role"] == "server" and s["counters"].get("packets_userspace", 0) == s["nft_counters"]["queued"]
    assert sum(s["nft_counters"]["queued"] for s in status.values()) == farm.balancer.flows
    # Each TCP flow sends 4+ more labelled packets, all counted in the kernel and none queued.
    assert sum(s["nft_counters"]["labelled_established"] for s in status.values()) >= 3 * farm.balancer.flows


def test_setup_apply_made_the_node_ready_and_check_names_what_is_not(lab: Lab, farm: ServerLab) -> None:
    log = farm.agents["s3"].log()
    assert "node setup: done: sysctl -w net.mpls.conf.lo.input=1" in log
    assert "node setup: done: sysctl -w net.ipv4.conf.lo.rp_filter=0" in log
    assert lab.sh("s3", "sysctl", "-n", "net.mpls.conf.lo.input").stdout.strip() == "1"
    agent = farm.agents["s2"]
    config, sock = agent.dir / "not-ready.yaml", agent.dir / "not-ready.sock"
    config.write_text(server_config(lab, "s2", sock, {"node.setup": "check", ("vips", "10.0.0.200"): {"table": 102}}))
    result = lab.sh(
        "s2", sys.executable, "-m", "orchestrator", "run", "--config", str(config), check=False, timeout=patience(30)
    )
    assert result.returncode == 4, result
    lines = result.stderr.splitlines()
    assert (
        "mplsorch: node not ready: VIP 10.0.0.200 is not on lo (servers answer from it); "
        "fix: ip address add 10.0.0.200/32 dev lo" in lines
    ), lines
    assert all(line.startswith("mplsorch: node not ready: ") for line in lines), lines
    assert not sock.exists()


def test_reload_rejects_an_invalid_file_and_applies_a_new_vip(lab: Lab, farm: ServerLab) -> None:
    agent = farm.agents["s2"]
    assert "reload rejected" in agent.reload({("vips", lab.vip, "table"): 254})  # the kernel's main table
    assert "configuration reloaded" in agent.reload({("vips", "10.0.0.200"): {"table": 102}})  # apply: onto lo
    assert "from 10.0.0.200 lookup 102" in lab.sh("s2", "ip", "rule").stdout
    assert "10.0.0.200" in lab.sh("s2", "nft", "list", "chain", "inet", "mplsorch", "input").stdout
    assert "configuration reloaded" in agent.reload()
    assert "10.0.0.200" not in lab.sh("s2", "ip", "rule").stdout
    assert farm.balancer.curl("c2") == "200"


def _in_no_routes(lab: Lab, node: str) -> int:
    """Packets `node` could not route (a plain-IP answer reaching the fabric would count here)."""
    lines = [
        line.split()
        for line in lab.sh(node, "cat", "/proc/net/netstat").stdout.splitlines()
        if line.startswith("IpExt:")
    ]
    return int(dict(zip(lines[0], lines[1]))["InNoRoutes"])


def test_a_restarted_agent_relearns_from_the_kernel_and_a_download_keeps_going(lab: Lab, farm: ServerLab) -> None:
    c1 = lab.address("c1")
    assert farm.balancer.curl("c1") == "200"  # c1's session (kept by the balancer for an hour)
    server, c2s, s2c = _started(farm, "http", c1)
    agent = farm.agents[server]
    size = int(patience(3)) << 20  # at 100 KiB/s: about 30 s natively, ten times a restart
    with open(Path(lab.node(agent.node)["runtime_dir"]) / "www" / "big.bin", "wb") as f:
        f.truncate(size)
    out = Path(lab.node("c1")["runtime_dir"]) / "big.bin"
    download = lab.spawn(
        "c1", sys.executable, "-c", GET, lab.vip, "/big.bin", str(100 << 10), str(out), log=out.with_suffix(".log")
    )  # its errors, should it fail
    log = out.with_suffix(".log")
    _wait_for(
        "started",
        lambda: "started" if out.exists() and out.stat().st_size > 0 else log.read_text() if log.exists() else "",
    )
    unroutable = _in_no_routes(lab, "p")
    assert agent.stop() == 0
    assert "return routes left in place" in agent.log()
    agent.spawn()
    agent.wait_running()
    assert download.poll() is None, "the download ended before the agent was back: make it longer"
    row = _agent_session(farm, agent.node, c1, lab.vip)  # restored from its return route and conntrack
    assert (row["c2s_label"], row["s2c_label"], row["state"]) == (c2s, s2c, "serving")
    assert row["flows"] >= 1
    assert agent.log().count("restored") >= 1
    assert download.wait(timeout=patience(150)) == 0
    assert out.stat().st_size == size
    assert _in_no_routes(lab, "p") == unroutable  # no answer went out unlabelled meanwhile
