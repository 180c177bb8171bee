"""Is this node ready for its role? Kernel modules, sysctls, and on a server the VIPs on lo and
rp_filter; on a balancer forwarding, for Mobile IPv6 services conntrack's checksum check, and
hw-tc-offload on every fabric interface whose `interfaces.offload` is `required`.

A daemon refuses to start half-configured: `check` (`check_balancer`) returns every problem at
once, each naming the exact module, sysctl or address and the command that fixes it; with
`node.setup: apply` the daemon runs those fixes itself and checks again. The checks are pure functions over a `NodeSystem`
(the real one reads /proc/sys, /sys/module and the provider), so unit tests need no root.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from orchestrator import kmod
from orchestrator.analyze.keys import SessionKeyKind
from orchestrator.config.client_model import ClientConfig
from orchestrator.config.model import BalancerConfig
from orchestrator.config.server import ServerConfig
from orchestrator.daemon import ethtool
from orchestrator.dataplane.provider import Provider, UnknownDevice

MPLS_MODULE = "mpls_router"  # present when net.mpls.platform_labels exists
CONNTRACK_MODULE = "nf_conntrack"  # present when net.netfilter.nf_conntrack_checksum exists
# Modules the agent's objects need besides mpls_router: lwtunnel MPLS encap (return routes), clsact
# (sch_ingress), cls_flower and act_skbedit (the label-marking filters), nfnetlink_queue (first packets).
MODULES = ("mpls_iptunnel", "sch_ingress", "cls_flower", "act_skbedit", "nfnetlink_queue")
# The balancer's: clsact on the fabric links, flower filters pushing the session labels (act_mpls).
BALANCER_MODULES = ("sch_ingress", "cls_flower", "act_mpls", "nfnetlink_queue")
# With clients.label_aware_interfaces: the label-aware sessions' liveness filters count with act_gact.
LIVENESS_MODULES = ("act_gact",)
# The client agent's: the server agent's label-marking filters, and act_mpls for its C2S filters.
CLIENT_MODULES = ("sch_ingress", "cls_flower", "act_skbedit", "act_mpls", "nfnetlink_queue")
STRICT = 1  # rp_filter 1: strict reverse-path check; 0 off, 2 loose
TC_OFFLOAD = "hw-tc-offload"  # NETIF_F_HW_TC, as ethtool names it: the driver takes tc filters


def sysctl_name(*parts: str) -> str:
    """sysctl(8)'s name: dots between the parts, and a dot inside a part (a device like eth0.100)
    written as a slash."""
    return ".".join(p.replace(".", "/") for p in parts)


class NodeSystem(Protocol):
    """What the checks read and the fixes change."""

    def sysctl(self, *parts: str) -> str | None:
        """The value of net.X.Y (as path parts), None when it does not exist."""

    def module(self, name: str) -> bool | None:
        """True when loaded, built in or installed (the kernel loads it on first use), False when
        none of these, None when that cannot be told."""

    def device_exists(self, dev: str) -> bool: ...

    def addresses(self, dev: str) -> set[str]: ...

    def write_sysctl(self, parts: tuple[str, ...], value: str) -> None: ...

    def modprobe(self, name: str) -> None: ...

    def add_address(self, dev: str, address: str) -> None: ...

    def feature(self, dev: str, name: str) -> ethtool.Feature | None:
        """The ethtool feature `name` of `dev` (None: the kernel knows no such feature)."""

    def set_feature(self, dev: str, name: str, on: bool) -> None: ...


@dataclass(frozen=True)
class Fix:
    """One action that makes the node ready; `command` is how an operator would do it by hand."""

    kind: str  # "sysctl" | "modprobe" | "address" | "feature"
    target: tuple[str, ...]  # the sysctl's path parts, (module,), (dev, address/prefix) or (dev, feature)
    value: str = ""

    @property
    def command(self) -> str:
        if self.kind == "sysctl":
            return f"sysctl -w {sysctl_name(*self.target)}={self.value}"
        if self.kind == "modprobe":
            return f"modprobe {self.target[0]}"
        if self.kind == "feature":
            return f"ethtool -K {self.target[0]} {self.target[1]} {self.value}"
        return f"ip address add {self.target[1]} dev {self.target[0]}"

    def apply(self, system: NodeSystem) -> None:
        if self.kind == "sysctl":
            system.write_sysctl(self.target, self.value)
        elif self.kind == "modprobe":
            system.modprobe(self.target[0])
        elif self.kind == "feature":
            system.set_feature(self.target[0], self.target[1], self.value == "on")
        else:
            system.add_address(*self.target)


@dataclass(frozen=True)
class Problem:
    """What is wrong, and either a Fix or, when the agent cannot fix it, what to do."""

    text: str
    fix: Fix | None = None
    hint: str = ""

    def __str__(self) -> str:
        return f"{self.text}; fix: {self.fix.command if self.fix else self.hint}"


class NodeNotReady(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(map(str, problems)))
        self.problems = problems


def check(config: ServerConfig, system: NodeSystem) -> list[Problem]:
    """Every problem of a server node."""
    problems, devices = _mpls(system, MODULES, config.block[1], config.fabric, "lo")
    problems += _rp_filter(system, ["lo", *devices])
    on_lo = system.addresses("lo")
    for vip in config.vips:
        if str(vip.address) not in on_lo:
            problems.append(
                Problem(
                    f"VIP {vip.address} is not on lo (servers answer from it)",
                    Fix("address", ("lo", f"{vip.address}/{vip.address.max_prefixlen}")),
                )
            )
    return problems


def check_client(config: ClientConfig, system: NodeSystem) -> list[Problem]:
    """Every problem of a label-aware client node: MPLS input on the balancer links (and lo, where
    the S2C termination routes deliver), a label table past the balancer's range, rp_filter not
    strict where answers re-enter (lo)."""
    problems, devices = _mpls(
        system, CLIENT_MODULES, config.label_range[1], config.balancer, "lo", "interfaces.balancer"
    )
    return problems + _rp_filter(system, ["lo", *devices])


def check_balancer(config: BalancerConfig, system: NodeSystem) -> list[Problem]:
    """Every problem of a balancer node."""
    modules = BALANCER_MODULES + (LIVENESS_MODULES if config.clients.label_aware_interfaces else ())
    problems, devices = _mpls(system, modules, config.labels.range[1], config.interfaces.fabric, None)
    problems += _tc_offload(system, [dev for dev in config.interfaces.required_offload() if dev in devices])
    problems += _client_input(system, config.interfaces.clients, config.clients.label_aware_interfaces)
    for version in sorted({s.vip.version for s in config.services}):
        parts = ("net", "ipv4", "ip_forward") if version == 4 else ("net", "ipv6", "conf", "all", "forwarding")
        if system.sysctl(*parts) != "1":
            problems.append(
                Problem(
                    f"sysctl {sysctl_name(*parts)} is {system.sysctl(*parts)}, not 1: "
                    f"IPv{version} first packets are not forwarded",
                    Fix("sysctl", parts, "1"),
                )
            )
    mobile = [s.name for s in config.services if s.session_key == SessionKeyKind.MIP6_HOME_ADDRESS]
    checksum = ("net", "netfilter", "nf_conntrack_checksum")
    value = system.sysctl(*checksum)
    if mobile and value is None:
        # Its sysctls appear when the module loads (at the latest with our ruleset), at their defaults.
        problems.append(
            Problem(
                f"kernel module {CONNTRACK_MODULE} is not loaded (no {sysctl_name(*checksum)})",
                Fix("modprobe", (CONNTRACK_MODULE,)),
            )
        )
    if mobile and value != "0":
        now = f"is {value}" if value is not None else f"will be 1 ({CONNTRACK_MODULE} is not loaded)"
        problems.append(
            Problem(
                f"sysctl {sysctl_name(*checksum)} {now}: a mobile node computes its transport checksum over its home "
                f"address (RFC 6275), so conntrack would judge every packet of service {', '.join(mobile)} invalid "
                "and never queue its first packet (the servers still verify checksums)",
                Fix("sysctl", checksum, "0"),
            )
        )
    return problems


def _mpls(
    system: NodeSystem,
    modules: tuple[str, ...],
    last_label: int,
    fabric: tuple[str, ...],
    local: str | None,
    key: str = "interfaces.fabric",
) -> tuple[list[Problem], list[str]]:
    """The problems of the MPLS side, modules first (so that applying the fixes in order works even
    when mpls_router is missing: its sysctls are then judged by their values after loading, 0),
    and the fabric devices that exist. `local`: a device labelled packets are delivered to."""
    problems: list[Problem] = []
    mpls_loaded = system.sysctl("net", "mpls", "platform_labels") is not None
    if not mpls_loaded:
        problems.append(
            Problem(
                f"kernel module {MPLS_MODULE} is not loaded (no net.mpls.platform_labels): no MPLS label routes",
                Fix("modprobe", (MPLS_MODULE,)),
            )
        )
    for module in modules:
        if system.module(module) is False:
            problems.append(
                Problem(
                    f"kernel module {module} is not available (not loaded, built in or installed for this kernel)",
                    hint="install this kernel's modules",
                )
            )

    def mpls_sysctl(*parts: str) -> int:
        value = system.sysctl("net", "mpls", *parts) if mpls_loaded else "0"
        return int(value) if value is not None else 0

    now = "is" if mpls_loaded else f"will be ({MPLS_MODULE} is not loaded)"
    labels = mpls_sysctl("platform_labels")
    if labels <= last_label:
        problems.append(
            Problem(
                f"sysctl {sysctl_name('net', 'mpls', 'platform_labels')} {now} {labels}: the session labels end at "
                f"{last_label}, so it must be greater",
                Fix("sysctl", ("net", "mpls", "platform_labels"), str(last_label + 1)),
            )
        )
    devices = []
    for dev in fabric:
        if system.device_exists(dev):
            devices.append(dev)
        else:
            problems.append(Problem(f"interface {dev} ({key}) does not exist", hint=f"create it or correct {key}"))
    for dev in [*devices, *([local] if local else [])]:
        if mpls_sysctl("conf", dev, "input") != 1:
            why = (
                "labelled packets from the fabric"
                if dev != local
                else "the C2S termination routes deliver to lo"
                if key == "interfaces.fabric"
                else "the S2C termination routes deliver to lo"
            )
            problems.append(
                Problem(
                    f"sysctl {sysctl_name('net', 'mpls', 'conf', dev, 'input')} {now} "
                    f"{mpls_sysctl('conf', dev, 'input')}, not 1: MPLS input is off ({why})",
                    Fix("sysctl", ("net", "mpls", "conf", dev, "input"), "1"),
                )
            )
    return problems, devices


def _client_input(system: NodeSystem, clients: tuple[str, ...], aware: tuple[str, ...]) -> list[Problem]:
    """MPLS input on the client interfaces: on where label-aware clients send their labelled
    packets (clients.label_aware_interfaces), off on every other one, where no client may inject
    labelled packets into the fabric. Interfaces that do not exist (yet) are not judged."""
    problems = []
    for dev in clients:
        if not system.device_exists(dev):
            continue
        want = 1 if dev in aware else 0
        value = system.sysctl("net", "mpls", "conf", dev, "input")
        have = int(value) if value is not None else 0
        if have != want:
            why = (
                "labelled packets of label-aware clients arrive there (clients.label_aware_interfaces)"
                if want
                else "a client interface not in clients.label_aware_interfaces must not take labelled packets"
            )
            problems.append(
                Problem(
                    f"sysctl {sysctl_name('net', 'mpls', 'conf', dev, 'input')} is {have}, not {want}: {why}",
                    Fix("sysctl", ("net", "mpls", "conf", dev, "input"), str(want)),
                )
            )
    return problems


def _tc_offload(system: NodeSystem, devs: list[str]) -> list[Problem]:
    """A fabric interface with `interfaces.offload: required` must take tc filters into hardware
    (hw-tc-offload on), or every session's filter there would be refused: better refuse to start
    and say so than fail each session."""
    problems = []
    for dev in devs:
        state = system.feature(dev, TC_OFFLOAD)
        why = f"interface {dev} has interfaces.offload required"
        if state is not None and state.active:
            continue
        if state is not None and state.available:
            problems.append(
                Problem(
                    f"{why} but {TC_OFFLOAD} is off: the driver would refuse every session's filter",
                    Fix("feature", (dev, TC_OFFLOAD), "on"),
                )
            )
        else:
            problems.append(
                Problem(
                    f"{why} but its driver offers no {TC_OFFLOAD} (ethtool -k {dev} shows it "
                    "off [fixed]): no filter can be in hardware there",
                    hint=f"use a device whose driver offloads flower filters, or set interfaces.offload.{dev} to auto",
                )
            )
    return problems


def _rp_filter(system: NodeSystem, devs: list[str]) -> list[Problem]:
    """Session packets arrive on lo from client addresses whose route leaves elsewhere, so the
    effective rp_filter (the kernel takes max(all, dev)) must not be strict on lo or the fabric
    links. One problem per sysctl that makes it strict."""

    def value(dev: str) -> int:
        return int(system.sysctl("net", "ipv4", "conf", dev, "rp_filter") or 0)

    every = value("all")
    strict = [dev for dev in devs if max(every, value(dev)) == STRICT]
    problems = [
        Problem(
            f"sysctl {sysctl_name('net', 'ipv4', 'conf', dev, 'rp_filter')} is 1 (strict): drops "
            f"session packets arriving on {dev} from client addresses",
            Fix("sysctl", ("net", "ipv4", "conf", dev, "rp_filter"), "0"),
        )
        for dev in strict
        if value(dev) == STRICT
    ]
    if strict and every == STRICT:
        problems.append(
            Problem(
                f"sysctl {sysctl_name('net', 'ipv4', 'conf', 'all', 'rp_filter')} is 1 (strict), "
                f"which makes rp_filter strict on {', '.join(strict)}: drops session packets "
                "arriving there from client addresses",
                Fix("sysctl", ("net", "ipv4", "conf", "all", "rp_filter"), "0"),
            )
        )
    return problems


def apply(problems: list[Problem], system: NodeSystem) -> list[str]:
    """Run every fix in order; one line per fix saying what was done or why it failed."""
    done = []
    for problem in problems:
        if problem.fix is None:
            continue
        try:
            problem.fix.apply(system)
            done.append(f"done: {problem.fix.command}")
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) and exc.stderr else exc
            done.append(f"failed: {problem.fix.command}: {detail}")
    return done


def make_ready(config: ServerConfig | BalancerConfig | ClientConfig, system: NodeSystem, fix: bool) -> list[str]:
    """Check the node for its role; with `fix`, apply the fixes and check again. Returns what was
    done; raises NodeNotReady with every remaining problem."""
    checker = (
        check
        if isinstance(config, ServerConfig)
        else check_client
        if isinstance(config, ClientConfig)
        else check_balancer
    )
    problems = checker(config, system)  # type: ignore[arg-type]
    done = apply(problems, system) if problems and fix else []
    if done:
        problems = checker(config, system)  # type: ignore[arg-type]
    if problems:
        raise NodeNotReady(problems)
    return done


class HostSystem:
    """The node this process runs on (its network namespace): /proc/sys, /sys/module, the
    kernel's modules.builtin and modules.dep, and the provider for devices and for reading and
    adding addresses."""

    def __init__(
        self,
        provider: Provider,
        proc_sys: Path = Path("/proc/sys"),
        sys_module: Path = Path("/sys/module"),
        modules_dir: Path = Path("/lib/modules") / os.uname().release,
    ) -> None:
        self.provider = provider
        self.proc_sys = proc_sys
        self.sys_module = sys_module
        self.modules_dir = modules_dir

    def sysctl(self, *parts: str) -> str | None:
        try:
            return self.proc_sys.joinpath(*parts).read_text().strip()
        except OSError:
            return None

    def module(self, name: str) -> bool | None:
        return kmod.available(name, self.sys_module, self.modules_dir)

    def device_exists(self, dev: str) -> bool:
        try:
            self.provider.ifindex(dev)
        except UnknownDevice:
            return False
        return True

    def addresses(self, dev: str) -> set[str]:
        return set(self.provider.addresses(dev))

    def write_sysctl(self, parts: tuple[str, ...], value: str) -> None:
        self.proc_sys.joinpath(*parts).write_text(value + "\n")

    def modprobe(self, name: str) -> None:
        subprocess.run(["modprobe", name], check=True, capture_output=True, text=True)

    def feature(self, dev: str, name: str) -> ethtool.Feature | None:
        """Read with the SIOCETHTOOL ioctl in this namespace (no ethtool binary needed)."""
        return ethtool.feature(dev, name)

    def set_feature(self, dev: str, name: str, on: bool) -> None:
        ethtool.set_feature(dev, name, on)

    def add_address(self, dev: str, address: str) -> None:
        """Through the provider (one RTM_NEWADDR), not ip(8): product code speaks netlink itself.
        Already there counts as done, so `apply` stays idempotent; failures are OSError."""
        self.provider.add_address(dev, address)
