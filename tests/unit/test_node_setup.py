"""Node readiness of both roles over a scripted node: every problem named once with its fix, the
fixes of `node.setup: apply` make the node ready, what cannot be fixed stays reported."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from orchestrator.config import load_balancer_config, load_server_config
from orchestrator.daemon import node_setup
from orchestrator.daemon.node_setup import Fix, HostSystem, NodeNotReady, Problem, check, check_balancer, make_ready
from orchestrator.dataplane.fake import FakeProvider

EXAMPLE = Path(__file__).resolve().parents[2] / "templates" / "server.example.yaml"  # fabric eth0, block 1001..1999


class FakeSystem:
    """A node as the checks see it; fixes change it like the kernel would."""

    def __init__(self) -> None:
        self.sysctls: dict[tuple[str, ...], str] = {
            ("net", "mpls", "platform_labels"): "100000",
            ("net", "mpls", "conf", "eth0", "input"): "1",
            ("net", "mpls", "conf", "lo", "input"): "1",
            ("net", "ipv4", "conf", "all", "rp_filter"): "0",
            ("net", "ipv4", "conf", "eth0", "rp_filter"): "0",
            ("net", "ipv4", "conf", "lo", "rp_filter"): "0",
        }
        self.modules = {"mpls_router", *node_setup.MODULES}
        self.devices = {"lo", "eth0"}
        self.addrs = {"lo": {"127.0.0.1", "::1", "10.0.0.100", "fd00:100::100"}}
        self.fail_modprobe: set[str] = set()
        self.done: list[str] = []

    def sysctl(self, *parts: str) -> str | None:
        return self.sysctls.get(parts)

    def module(self, name: str) -> bool | None:
        return name in self.modules

    def device_exists(self, dev: str) -> bool:
        return dev in self.devices

    def addresses(self, dev: str) -> set[str]:
        return self.addrs.get(dev, set())

    def write_sysctl(self, parts: tuple[str, ...], value: str) -> None:
        if parts not in self.sysctls:
            raise FileNotFoundError(2, "No such file or directory", "/proc/sys/" + "/".join(parts))
        self.sysctls[parts] = value
        self.done.append("sysctl")

    def modprobe(self, name: str) -> None:
        if name in self.fail_modprobe:
            raise subprocess.CalledProcessError(
                1, ["modprobe", name], stderr=f"modprobe: FATAL: Module {name} not found"
            )
        self.modules.add(name)
        if name == "mpls_router":  # its sysctls appear, at their defaults
            self.sysctls.update(
                {
                    ("net", "mpls", "platform_labels"): "0",
                    **{("net", "mpls", "conf", d, "input"): "0" for d in self.devices},
                }
            )

    def add_address(self, dev: str, address: str) -> None:
        self.addrs.setdefault(dev, set()).add(address.split("/")[0])


@pytest.fixture
def config():  # type: ignore[no-untyped-def]
    return load_server_config(EXAMPLE)


def lines(problems: list[node_setup.Problem]) -> list[str]:
    return [str(p) for p in problems]


def test_a_ready_node_has_no_problem(config) -> None:  # type: ignore[no-untyped-def]
    assert check(config, FakeSystem()) == []
    assert make_ready(config, FakeSystem(), fix=False) == []


def test_every_problem_is_one_line_naming_the_sysctl_or_address_and_its_fix(config) -> None:  # type: ignore[no-untyped-def]
    node = FakeSystem()
    node.sysctls[("net", "mpls", "platform_labels")] = "1999"
    node.sysctls[("net", "mpls", "conf", "lo", "input")] = "0"
    node.sysctls[("net", "ipv4", "conf", "eth0", "rp_filter")] = "1"
    node.addrs["lo"].discard("fd00:100::100")
    node.modules.discard("act_skbedit")
    assert lines(check(config, node)) == [
        "kernel module act_skbedit is not available (not loaded, built in or installed for this kernel); "
        "fix: install this kernel's modules",
        "sysctl net.mpls.platform_labels is 1999: the session labels end at 1999, so it must be greater; "
        "fix: sysctl -w net.mpls.platform_labels=2000",
        "sysctl net.mpls.conf.lo.input is 0, not 1: MPLS input is off (the C2S termination routes deliver to lo); "
        "fix: sysctl -w net.mpls.conf.lo.input=1",
        "sysctl net.ipv4.conf.eth0.rp_filter is 1 (strict): drops session packets arriving on eth0 from client "
        "addresses; fix: sysctl -w net.ipv4.conf.eth0.rp_filter=0",
        "VIP fd00:100::100 is not on lo (servers answer from it); fix: ip address add fd00:100::100/128 dev lo",
    ]


def test_rp_filter_is_judged_by_its_effective_value(config) -> None:  # type: ignore[no-untyped-def]
    node = FakeSystem()
    node.sysctls[("net", "ipv4", "conf", "all", "rp_filter")] = "1"
    [problem] = check(config, node)  # max(all 1, dev 0) is strict on lo and eth0: one sysctl to fix
    assert str(problem).startswith(
        "sysctl net.ipv4.conf.all.rp_filter is 1 (strict), which makes rp_filter strict on lo, eth0"
    )
    assert problem.fix is not None and problem.fix.command == "sysctl -w net.ipv4.conf.all.rp_filter=0"
    node.sysctls[("net", "ipv4", "conf", "lo", "rp_filter")] = "2"  # loose wins over all = 1
    node.sysctls[("net", "ipv4", "conf", "eth0", "rp_filter")] = "2"
    assert check(config, node) == []


def test_apply_fixes_everything_even_without_mpls_router(config) -> None:  # type: ignore[no-untyped-def]
    node = FakeSystem()
    for key in [k for k in node.sysctls if k[1] == "mpls"]:
        del node.sysctls[key]
    node.modules -= {"mpls_router"}
    node.addrs["lo"] -= {"10.0.0.100"}
    problems = lines(check(config, node))
    assert problems[:1] == [
        "kernel module mpls_router is not loaded (no net.mpls.platform_labels): no MPLS label routes; "
        "fix: modprobe mpls_router"
    ]
    assert "sysctl net.mpls.conf.eth0.input will be (mpls_router is not loaded) 0, not 1" in problems[2]
    done = make_ready(config, node, fix=True)
    assert done == [
        "done: modprobe mpls_router",
        "done: sysctl -w net.mpls.platform_labels=2000",
        "done: sysctl -w net.mpls.conf.eth0.input=1",
        "done: sysctl -w net.mpls.conf.lo.input=1",
        "done: ip address add 10.0.0.100/32 dev lo",
    ]
    assert check(config, node) == []


def test_what_cannot_be_fixed_is_reported_after_apply(config) -> None:  # type: ignore[no-untyped-def]
    node = FakeSystem()
    node.devices.discard("eth0")
    node.modules.discard("cls_flower")
    with pytest.raises(NodeNotReady) as raised:
        make_ready(config, node, fix=True)
    assert lines(raised.value.problems) == [
        "kernel module cls_flower is not available (not loaded, built in or installed for this kernel); "
        "fix: install this kernel's modules",
        "interface eth0 (interfaces.fabric) does not exist; fix: create it or correct interfaces.fabric",
    ]


def test_check_mode_changes_nothing(config) -> None:  # type: ignore[no-untyped-def]
    node = FakeSystem()
    node.sysctls[("net", "mpls", "conf", "eth0", "input")] = "0"
    with pytest.raises(NodeNotReady):
        make_ready(config, node, fix=False)
    assert node.sysctls[("net", "mpls", "conf", "eth0", "input")] == "0" and node.done == []


def test_host_system_reads_proc_sys_sys_module_and_modules_builtin(tmp_path: Path) -> None:
    (tmp_path / "proc" / "net" / "mpls" / "conf" / "eth0.100").mkdir(parents=True)
    (tmp_path / "proc" / "net" / "mpls" / "conf" / "eth0.100" / "input").write_text("1\n")
    (tmp_path / "module" / "cls_flower").mkdir(parents=True)
    (tmp_path / "modules.builtin").write_text("kernel/net/sched/act_skbedit.ko\nkernel/net/mpls/mpls-gso.ko\n")
    (tmp_path / "modules.dep").write_text("kernel/net/mpls/mpls_iptunnel.ko.xz: kernel/net/mpls/mpls_router.ko.xz\n")
    host = HostSystem(None, tmp_path / "proc", tmp_path / "module", tmp_path)  # type: ignore[arg-type]
    assert host.sysctl("net", "mpls", "conf", "eth0.100", "input") == "1"
    assert host.sysctl("net", "mpls", "platform_labels") is None
    host.write_sysctl(("net", "mpls", "conf", "eth0.100", "input"), "0")
    assert host.sysctl("net", "mpls", "conf", "eth0.100", "input") == "0"
    assert node_setup.sysctl_name("net", "mpls", "conf", "eth0.100", "input") == "net.mpls.conf.eth0/100.input"
    # loaded, built in, installed (loaded by the kernel on first use), none of these
    assert (
        host.module("cls_flower"),
        host.module("act_skbedit"),
        host.module("mpls_gso"),
        host.module("mpls_iptunnel"),
        host.module("nfnetlink_queue"),
    ) == (True, True, True, True, False)
    assert HostSystem(None, sys_module=tmp_path / "none", modules_dir=tmp_path / "none").module("x") is None  # type: ignore[arg-type]


def test_a_modprobe_that_fails_is_reported_and_its_problem_stays(config) -> None:  # type: ignore[no-untyped-def]
    node = FakeSystem()
    del node.sysctls[("net", "mpls", "platform_labels")]
    node.modules.discard("mpls_router")
    node.fail_modprobe.add("mpls_router")
    assert (
        node_setup.apply(check(config, node), node)[0]
        == "failed: modprobe mpls_router: modprobe: FATAL: Module mpls_router not found"
    )
    with pytest.raises(NodeNotReady) as raised:
        make_ready(config, node, fix=True)
    assert lines(raised.value.problems)[0].startswith("kernel module mpls_router is not loaded")


def test_apply_puts_a_missing_vip_on_lo_through_the_provider_and_again_changes_nothing(config, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def no_ip(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"ran a program: {args}")

    monkeypatch.setattr(node_setup.subprocess, "run", no_ip)
    node = FakeSystem()
    node.addrs["lo"] -= {"10.0.0.100"}
    problems = check(config, node)
    provider = FakeProvider({"eth0"})
    provider.add_address("lo", "fd00:100::100/128")
    host = HostSystem(provider)  # type: ignore[arg-type]
    assert "10.0.0.100" not in host.addresses("lo")
    assert node_setup.apply(problems, host) == ["done: ip address add 10.0.0.100/32 dev lo"]
    assert node_setup.apply(problems, host) == ["done: ip address add 10.0.0.100/32 dev lo"]  # already there
    assert provider.addresses("lo") == ["127.0.0.1", "::1", "fd00:100::100", "10.0.0.100"]
    assert {"10.0.0.100", "fd00:100::100"} <= host.addresses("lo")


def test_an_address_the_provider_cannot_add_is_reported() -> None:
    host = HostSystem(FakeProvider({"eth0"}))  # type: ignore[arg-type]
    problem = Problem("VIP 10.0.0.100 is not on lo0", Fix("address", ("lo0", "10.0.0.100/32")))
    assert node_setup.apply([problem], host) == [
        "failed: ip address add 10.0.0.100/32 dev lo0: [Errno 19] no such device lo0"
    ]


BALANCER = Path(__file__).resolve().parents[2] / "templates" / "balancer.example.yaml"


def balancer_node() -> FakeSystem:
    """A ready balancer: fabric fab0, forwarding on, conntrack's checksum check off."""
    node = FakeSystem()
    node.devices.add("fab0")
    node.modules |= set(node_setup.BALANCER_MODULES)
    node.sysctls.update(
        {
            ("net", "mpls", "conf", "fab0", "input"): "1",
            ("net", "ipv4", "ip_forward"): "1",
            ("net", "ipv6", "conf", "all", "forwarding"): "1",
            ("net", "netfilter", "nf_conntrack_checksum"): "0",
        }
    )
    return node


def test_a_balancer_needs_forwarding_fabric_input_and_for_mobile_ipv6_no_conntrack_checksum() -> None:
    config = load_balancer_config(BALANCER)  # fabric fab0; an IPv4 and an IPv6 VIP; service mobile
    assert check_balancer(config, balancer_node()) == []
    node = balancer_node()
    node.sysctls.update(
        {
            ("net", "mpls", "conf", "fab0", "input"): "0",
            ("net", "ipv6", "conf", "all", "forwarding"): "0",
            ("net", "netfilter", "nf_conntrack_checksum"): "1",
        }
    )
    node.modules.discard("act_mpls")
    problems = check_balancer(config, node)
    assert lines(problems)[:3] == [
        "kernel module act_mpls is not available (not loaded, built in or installed for this kernel); "
        "fix: install this kernel's modules",
        "sysctl net.mpls.conf.fab0.input is 0, not 1: MPLS input is off (labelled packets from the fabric); "
        "fix: sysctl -w net.mpls.conf.fab0.input=1",
        "sysctl net.ipv6.conf.all.forwarding is 0, not 1: IPv6 first packets are not forwarded; "
        "fix: sysctl -w net.ipv6.conf.all.forwarding=1",
    ]
    assert lines(problems)[3].startswith("sysctl net.netfilter.nf_conntrack_checksum is 1: a mobile node computes")
    assert lines(problems)[3].endswith("fix: sysctl -w net.netfilter.nf_conntrack_checksum=0")
    node.modules.add("act_mpls")
    make_ready(config, node, fix=True)
    assert check_balancer(config, node) == []


def test_without_a_mobile_service_the_balancer_keeps_conntracks_checksum_check() -> None:
    import dataclasses

    config = load_balancer_config(BALANCER)
    plain = dataclasses.replace(config, services=tuple(s for s in config.services if s.name != "mobile"))
    node = balancer_node()
    node.sysctls[("net", "netfilter", "nf_conntrack_checksum")] = "1"
    assert check_balancer(plain, node) == []
    assert len(check_balancer(config, node)) == 1


def test_before_conntrack_is_loaded_the_balancer_loads_it_and_then_turns_the_checksum_check_off() -> None:
    config = load_balancer_config(BALANCER)
    node = balancer_node()
    del node.sysctls[("net", "netfilter", "nf_conntrack_checksum")]  # nothing used conntrack yet

    def modprobe(name: str) -> None:  # loading it makes its sysctls appear, at their defaults
        node.sysctls[("net", "netfilter", "nf_conntrack_checksum")] = "1"

    node.modprobe = modprobe  # type: ignore[method-assign]
    assert lines(check_balancer(config, node)) == [
        "kernel module nf_conntrack is not loaded (no net.netfilter.nf_conntrack_checksum); fix: modprobe nf_conntrack",
        "sysctl net.netfilter.nf_conntrack_checksum will be 1 (nf_conntrack is not loaded): a mobile node computes "
        "its transport checksum over its home address (RFC 6275), so conntrack would judge every packet of service "
        "mobile invalid and never queue its first packet (the servers still verify checksums); "
        "fix: sysctl -w net.netfilter.nf_conntrack_checksum=0",
    ]
    assert make_ready(config, node, fix=True) == [
        "done: modprobe nf_conntrack",
        "done: sysctl -w net.netfilter.nf_conntrack_checksum=0",
    ]
    assert node.sysctls[("net", "netfilter", "nf_conntrack_checksum")] == "0"
