"""Switchdev offload on a real kernel (issue 17): a netdevsim port is the balancer's first fabric
link, where the C2S filters go. netdevsim takes hw-tc-offload yet offloads no flower filter, so it
is exactly the device on which `interfaces.offload: required` must fail loudly:

- `required` with hw-tc-offload off: `node.setup: check` refuses to start, naming the interface
  and the ethtool command; `apply` switches it on itself;
- `required`: every session whose filter goes there is refused with the kernel's error, counted
  and logged; nothing of it stays in the kernel;
- `auto`: the filter falls back to software and the kernel reports it not_in_hw;
- `never`: the filter carries skip_hw;
- `mplsorch routes --json` says of every object what the kernel's own tools say;
- an ingress filter with skip_sw comes back with netdevsim's extack text in the error.

A netdevsim port carries no traffic anywhere: what is proven is the programming and the report,
not forwarding (the fabric's real link, fab0, is second and carries nothing labelled here)."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from orchestrator.dataplane import ops
from orchestrator.lab.balancer_lab import BalancerLab, lab_config
from orchestrator.lab.kit import Lab, patience

NSIM_ID = 17  # the netdevsim bus device; its one port becomes nsim0 in the balancer's namespace
DEV = "nsim0"
SYSFS = Path("/sys/bus/netdevsim")


def changes(policy: str, **more: Any) -> dict[str, Any]:
    return {"interfaces.fabric": [DEV, "fab0"], "interfaces.offload": {DEV: policy}, **more}


@pytest.fixture(scope="module")
def nsim(lab: Lab) -> Iterator[str]:
    """A netdevsim port in the balancer's namespace, named nsim0, up, hw-tc-offload off (its default)."""
    (SYSFS / "new_device").write_text(f"{NSIM_ID} 1")
    try:
        net = SYSFS / "devices" / f"netdevsim{NSIM_ID}" / "net"
        deadline = time.monotonic() + 10
        while not (net.exists() and list(net.iterdir())):
            assert time.monotonic() < deadline, "netdevsim made no port"
            time.sleep(0.1)
        [port] = [p.name for p in net.iterdir()]
        subprocess.run(["ip", "link", "set", port, "netns", lab.netns("lb"), "name", DEV], check=True)
        lab.sh("lb", "ip", "link", "set", DEV, "up")
        yield DEV
    finally:
        (SYSFS / "del_device").write_text(str(NSIM_ID))


def hw_tc_offload(lab: Lab) -> str:
    out = lab.sh("lb", "ethtool", "-k", DEV).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("hw-tc-offload:"))


def tc_filters(lab: Lab) -> dict[int, dict[str, Any]]:
    """tc's own view of nsim0's egress filters, by handle."""
    out = json.loads(lab.sh("lb", "tc", "-j", "filter", "show", "dev", DEV, "egress").stdout or "[]")
    return {f["options"]["handle"]: f["options"] for f in out if "options" in f}


def first_packet(b: BalancerLab, client: str) -> None:
    """One new TCP flow to the VIP: its first packet reaches the daemon, which programs (or fails
    to program) the session. The answer does not matter: nothing carries it back here."""
    b.lab.curl(client, f"http://{b.lab.vip}/", timeout=2)


def wait_for(what: str, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + patience(timeout)
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)
    return value


def test_required_without_hw_tc_offload_refuses_to_start_naming_interface_and_command(lab: Lab, nsim: str) -> None:
    assert hw_tc_offload(lab) == "off"
    run_dir = Path(lab.node("lb")["runtime_dir"])
    config = run_dir / "offload-check.yaml"
    config.write_text(lab_config(run_dir / "offload-check.sock", changes("required", **{"node.setup": "check"})))
    result = lab.sh(
        "lb", sys.executable, "-m", "orchestrator", "run", "--config", str(config), check=False, timeout=patience(120)
    )
    assert result.returncode == 4, result.stderr
    assert (
        f"mplsorch: node not ready: interface {DEV} has interfaces.offload required but hw-tc-offload is off: "
        f"the driver would refuse every session's filter; fix: ethtool -K {DEV} hw-tc-offload on"
    ) in result.stderr.splitlines(), result.stderr
    assert hw_tc_offload(lab) == "off"  # check changes nothing


def test_each_policy_on_netdevsim_and_routes_reports_what_the_kernel_says(lab: Lab, nsim: str) -> None:
    b = BalancerLab(lab, changes=changes("required"))
    try:
        b.start()
        # node.setup apply (the lab's) switched hw-tc-offload on: required is now allowed to try.
        assert f"node setup: done: ethtool -K {DEV} hw-tc-offload on" in b.log()
        assert hw_tc_offload(lab) == "on"

        # required: the hardware refuses the filter, so the session fails, loudly.
        first_packet(b, "c1")
        status = wait_for("the refusal", lambda: (s := b.cli("status"))["counters"].get("offload_refused") and s)
        # Each SYN (curl sends it again after a second) is a first packet, refused again.
        refused = status["counters"]["offload_refused"]
        assert status["counters"]["sessions_failed"] == status["counters"]["verdict:drop"] == refused
        assert b.sessions() == []
        refusal = next(line for line in b.log().splitlines() if "skip_sw" in line)
        assert f"new session: add filter dev {DEV} egress" in refusal
        assert (
            f"offload required but device {DEV} cannot offload this filter: Operation not supported (EOPNOTSUPP)"
        ) in refusal, refusal
        assert tc_filters(lab) == {}  # nothing stays in the kernel: the S2C route was rolled back too
        assert not [r for r in b.cli("routes") if r["kind"] == "MplsRoute"]

        # auto: the same filter falls back to software and the kernel says so.
        b.reload(changes("auto"))
        first_packet(b, "c2")
        [session] = wait_for("the auto session", b.sessions)
        rows = [r for r in b.cli("routes") if r["kind"] == "FlowerFilter"]
        assert len(rows) == 1 and rows[0]["dev"] == DEV and rows[0]["policy"] == "auto"
        assert (rows[0]["in_hw"], rows[0]["in_hw_count"], rows[0]["not_in_hw"], rows[0]["offload"]) == (
            False,
            0,
            True,
            "not_in_hw",
        )
        [(handle, kernel)] = tc_filters(lab).items()
        assert kernel.get("not_in_hw") is True and not kernel.get("in_hw") and not kernel.get("skip_hw")
        assert f"handle {handle} " in rows[0]["object"]

        # never: skip_hw, in software only.
        b.reload(changes("never"))
        first_packet(b, "c3")
        wait_for("the never session", lambda: len(b.sessions()) == 2)
        by_handle = tc_filters(lab)
        never = next(r for r in b.cli("routes") if r["kind"] == "FlowerFilter" and r["policy"] == "never")
        assert " skip_hw " in never["object"] and never["not_in_hw"] and not never["in_hw"]
        [never_handle] = set(by_handle) - {handle}
        assert by_handle[never_handle].get("skip_hw") is True and by_handle[never_handle].get("not_in_hw") is True
        assert f"handle {never_handle} " in never["object"]

        # Every object of ours as the kernel's tools see it: two filters, two S2C label routes.
        rows = b.cli("routes")
        filters = {r["object"].split(" handle ")[1].split()[0]: r for r in rows if r["kind"] == "FlowerFilter"}
        assert set(map(int, filters)) == set(by_handle)
        for h, r in filters.items():
            kernel = by_handle[int(h)]
            assert (r["in_hw"], r["not_in_hw"]) == (bool(kernel.get("in_hw")), bool(kernel.get("not_in_hw")))
            assert (r["policy"] == "never") == bool(kernel.get("skip_hw"))
        labels = {s["s2c_label"] for s in b.sessions()}
        kernel_routes = json.loads(lab.sh("lb", "ip", "-j", "-f", "mpls", "route", "show", "proto", "195").stdout)
        assert {int(r["dst"]) for r in kernel_routes} == labels
        assert all(not set(r.get("flags", [])) & {"offload", "trap", "offload_failed"} for r in kernel_routes)
        routes = [r for r in rows if r["kind"] == "MplsRoute"]
        assert {int(r["object"].split()[2]) for r in routes} == labels
        assert all(
            (r["in_hw"], r["trap"], r["offload_failed"], r["offload"]) == (False, False, False, "not_in_hw")
            for r in routes
        )
        # status's counts come from a background dump (every 10 s at this size), never one on
        # the request: the first status whose dump began after the objects above were read.
        since = time.monotonic()
        status = wait_for(
            "an offload dump after the objects' check",
            lambda: (
                (s := b.cli("status"))["offload_age_s"] is not None
                and s["offload_age_s"] < time.monotonic() - since
                and s
            ),
        )
        assert status["offload"] == {"in_hw": 0, "not_in_hw": 4, "trap": 0, "offload_failed": 0}
        assert status["counters"]["offload_refused"] == refused  # auto and never refuse nothing
    finally:
        b.close()


def test_the_drivers_extack_text_reaches_the_error(lab: Lab, nsim: str) -> None:
    """netdevsim binds ingress blocks and answers a flower filter there with its own message."""
    lb = lab.provider("lb")
    [qdisc] = lb.apply([ops.Add(ops.ClsactQdisc(DEV))])
    assert qdisc.ok or qdisc.errno == errno.EEXIST, str(qdisc)
    flt = ops.FlowerFilter(
        DEV,
        1,
        ops.FlowerMatch(src="10.0.1.10/32"),
        ops.push_stack((103, 1001)),
        direction=ops.Direction.INGRESS,
        offload=ops.OffloadPolicy.REQUIRED,
    )
    [result] = lb.apply([ops.Add(flt)])
    assert result.errno == errno.EOPNOTSUPP, str(result)
    assert result.error == (
        f"offload required but device {DEV} cannot offload this filter: "
        "netdevsim: only offload of BPF classifiers supported (EOPNOTSUPP)"
    ), result.error
