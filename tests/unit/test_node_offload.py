"""The node check of `interfaces.offload: required` (issue 17): such a fabric interface must have
hw-tc-offload on, else the balancer refuses to start naming the interface and what to enable;
`node.setup: apply` switches it on where the driver allows; a driver without it cannot be fixed.
Also the ethtool ioctl reader against this host's loopback, which never offloads tc."""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.config import parse_config
from orchestrator.config.examples import example
from orchestrator.config.model import BalancerConfig
from orchestrator.daemon import ethtool, node_setup
from orchestrator.daemon.node_setup import NodeNotReady, check_balancer, make_ready


class Node:
    """A ready balancer node (fabric fab0 and sw0) whose devices have ethtool features."""

    def __init__(self, features: dict[str, ethtool.Feature | None]) -> None:
        self.features = features
        self.devices = {"lo", "fab0", "sw0"}
        self.sysctls = {
            ("net", "mpls", "platform_labels"): "100000",
            ("net", "ipv4", "ip_forward"): "1",
            ("net", "ipv6", "conf", "all", "forwarding"): "1",
            ("net", "netfilter", "nf_conntrack_checksum"): "0",
            **{("net", "mpls", "conf", d, "input"): "1" for d in ("fab0", "sw0")},
        }
        self.set: list[tuple[str, str, bool]] = []

    def sysctl(self, *parts: str) -> str | None:
        return self.sysctls.get(parts)

    def module(self, name: str) -> bool | None:
        return True

    def device_exists(self, dev: str) -> bool:
        return dev in self.devices

    def addresses(self, dev: str) -> set[str]:
        return set()

    def write_sysctl(self, parts: tuple[str, ...], value: str) -> None:
        self.sysctls[parts] = value

    def modprobe(self, name: str) -> None:
        pass

    def add_address(self, dev: str, address: str) -> None:
        pass

    def feature(self, dev: str, name: str) -> ethtool.Feature | None:
        assert name == "hw-tc-offload"
        return self.features.get(dev)

    def set_feature(self, dev: str, name: str, on: bool) -> None:
        self.set.append((dev, name, on))
        state = self.features[dev]
        if state is None or not state.available:
            raise OSError(95, "Operation not supported")
        self.features[dev] = dataclasses.replace(state, active=on)


OFF = ethtool.Feature(available=True, active=False)
ON = ethtool.Feature(available=True, active=True)
FIXED = ethtool.Feature(available=False, active=False)


def cfg(offload: object) -> BalancerConfig:
    c = parse_config(example("balancer", {"interfaces.fabric": ["sw0", "fab0"], "interfaces.offload": offload}))
    assert isinstance(c, BalancerConfig)
    return c


def test_only_required_interfaces_are_asked_for_hw_tc_offload() -> None:
    node = Node({"sw0": FIXED, "fab0": FIXED})
    assert check_balancer(cfg({"sw0": "auto", "fab0": "never"}), node) == []
    assert check_balancer(cfg({"sw0": "required"}), Node({"sw0": ON, "fab0": FIXED})) == []


def test_required_with_hw_tc_offload_off_names_the_interface_and_the_command() -> None:
    node = Node({"sw0": OFF, "fab0": FIXED})
    [problem] = check_balancer(cfg({"sw0": "required"}), node)
    assert str(problem) == (
        "interface sw0 has interfaces.offload required but hw-tc-offload is off: the driver "
        "would refuse every session's filter; fix: ethtool -K sw0 hw-tc-offload on"
    )
    with pytest.raises(NodeNotReady, match="interface sw0 .* ethtool -K sw0 hw-tc-offload on"):
        make_ready(cfg({"sw0": "required"}), node, fix=False)
    assert node.set == []  # check never changes the node


def test_apply_switches_hw_tc_offload_on() -> None:
    node = Node({"sw0": OFF, "fab0": FIXED})
    assert make_ready(cfg({"sw0": "required"}), node, fix=True) == ["done: ethtool -K sw0 hw-tc-offload on"]
    assert node.set == [("sw0", "hw-tc-offload", True)] and node.features["sw0"] == ON


@pytest.mark.parametrize("state", [FIXED, None], ids=["fixed off", "unknown to the kernel"])
def test_a_driver_without_tc_offload_cannot_be_fixed_and_says_what_to_do(state: ethtool.Feature | None) -> None:
    node = Node({"sw0": state, "fab0": FIXED})
    with pytest.raises(NodeNotReady) as info:
        make_ready(cfg("required"), node, fix=True)
    assert [str(p) for p in info.value.problems] == [
        f"interface {dev} has interfaces.offload required but its driver offers no hw-tc-offload (ethtool -k {dev} "
        f"shows it off [fixed]): no filter can be in hardware there; fix: use a device whose driver offloads "
        f"flower filters, or set interfaces.offload.{dev} to auto"
        for dev in ("sw0", "fab0")
    ]
    assert node.set == []


def test_a_missing_required_interface_is_reported_once_as_missing() -> None:
    node = Node({"fab0": ON})
    node.devices.discard("sw0")
    problems = [str(p) for p in check_balancer(cfg("required"), node)]
    assert problems == ["interface sw0 (interfaces.fabric) does not exist; fix: create it or correct interfaces.fabric"]


def test_the_ioctl_reads_this_hosts_loopback_which_offers_no_tc_offload() -> None:
    assert ethtool.feature("lo", "hw-tc-offload") == FIXED
    assert ethtool.feature("lo", "no-such-feature") is None
    with pytest.raises(OSError):
        ethtool.feature("nosuchdev0", "hw-tc-offload")
    assert node_setup.Fix("feature", ("lo", "hw-tc-offload"), "on").command == "ethtool -K lo hw-tc-offload on"
