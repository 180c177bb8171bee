#!/usr/bin/python
# -*- coding: utf-8 -*-
# Part of mplsorch (Apache-2.0). An Ansible module of the mpls_node role.
"""Make a node ready for kernel MPLS in one call: modules, sysctls, loopback addresses, label
routes and the files that redo it at boot. One call per node keeps a roll-out short (every
module call costs a round trip and a Python start on the node)."""

from __future__ import annotations

import os
import tempfile

from ansible.module_utils.basic import AnsibleModule

DOCUMENTATION = r"""
module: mpls_node
short_description: Kernel MPLS readiness of one node (modules, sysctls, loopback addresses, label routes)
description:
  - Loads kernel modules that are neither loaded nor built in, sets sysctls in the node's own
    network namespace, adds addresses to C(lo), installs MPLS label routes with C(ip -f mpls route replace),
    and writes the modules-load.d, sysctl.d and rt_protos.d files that redo the modules and sysctls at boot.
  - Supports check mode and diff mode. Changes only what differs.
options:
  modules: {description: Kernel modules to load., type: list, elements: str, default: []}
  platform_labels:
    description:
      - Wanted C(net.mpls.platform_labels). A bigger value already set is kept unless I(shrink_platform_labels)
        (shrinking deletes every label route above the new size, also those of other label users).
    type: int
  shrink_platform_labels: {description: Set I(platform_labels) even when it is smaller than the current value., type: bool, default: false}
  input_interfaces: {description: Devices that get MPLS input (C(net.mpls.conf.DEV.input = 1))., type: list, elements: str, default: []}
  no_input_interfaces: {description: Devices whose MPLS input is kept off (C(= 0))., type: list, elements: str, default: []}
  forwarding: {description: "IP versions to forward: 4 (C(net.ipv4.ip_forward)), 6 (C(net.ipv6.conf.all.forwarding))", type: list, elements: int, default: []}
  rp_filter_loose:
    description: Devices whose reverse-path filter must not be strict; a strict one (1) becomes loose (2), off (0) stays off.
    type: list
    elements: str
    default: []
  conntrack_checksum: {description: "C(net.netfilter.nf_conntrack_checksum); omitted: left alone.", type: bool}
  sysctls: {description: More sysctls, dotted name to value., type: dict, default: {}}
  loopback_addresses: {description: Addresses on C(lo) (a bare address is a host route)., type: list, elements: str, default: []}
  label_routes:
    description: MPLS label routes C(LABEL via VIA dev DEV) (transport labels of a fabric switch).
    type: list
    elements: dict
    default: []
  modules_load_file: {description: modules-load.d file for I(modules); empty for none., type: str, default: ""}
  sysctl_file: {description: sysctl.d file for the sysctls; empty for none., type: str, default: ""}
  rt_protos_file: {description: iproute2 rt_protos.d file naming route protocol 195 mplsorch; empty for none., type: str, default: ""}
"""

EXAMPLES = r"""
- name: A fabric switch with two transport labels
  mpls_node:
    modules: [mpls_router]
    platform_labels: 102
    input_interfaces: [pl, ps1]
    forwarding: [4, 6]
    label_routes:
      - {label: 100, via: 10.255.0.1, dev: pl}
      - {label: 101, via: 10.1.1.10, dev: ps1}
"""

RETURN = r"""
actions: {description: What was done (or would be in check mode), as the commands an operator would type., type: list, returned: always}
"""

PROC_SYS = "/proc/sys"
RT_PROTOS = "# mplsorch: routes and rules installed by the mplsorch dataplane provider\n195\tmplsorch\n"


def sysctl_parts(name):
    """sysctl(8)'s dotted name as /proc/sys path parts ('/' in a part is a '.' in a device name)."""
    return [p.replace("/", ".") for p in name.split(".")]


def sysctl_name(parts):
    return ".".join(p.replace(".", "/") for p in parts)


def read_sysctl(parts):
    try:
        with open(os.path.join(PROC_SYS, *parts)) as f:
            return f.read().strip()
    except OSError:
        return None


def module_present(name):
    """Loaded, or built into this kernel."""
    canon = name.replace("-", "_")
    if os.path.exists(os.path.join("/sys/module", canon)):
        return True
    try:
        with open(os.path.join("/lib/modules", os.uname().release, "modules.builtin")) as f:
            return any(os.path.basename(line.strip()).split(".")[0].replace("-", "_") == canon for line in f)
    except OSError:
        return False


class Node(object):
    def __init__(self, module):
        self.m = module
        self.p = module.params
        self.check = module.check_mode
        self.actions = []
        self.before = []
        self.after = []
        self.diffs = []
        self.loading = False  # check mode: a module would be loaded (its sysctls are not there yet)

    def change(self, what, before, after, action):
        self.before.append("%s: %s" % (what, before))
        self.after.append("%s: %s" % (what, after))
        self.actions.append(action)

    def run(self, argv):
        rc, out, err = self.m.run_command(argv)
        if rc != 0:
            self.m.fail_json(
                msg="%s failed (%d): %s" % (" ".join(argv), rc, (err or out).strip()), actions=self.actions
            )
        return out

    # -- modules --------------------------------------------------------------------------------
    def modules(self):
        for name in self.p["modules"]:
            if module_present(name):
                continue
            self.change("module " + name, "not loaded", "loaded", "modprobe " + name)
            self.loading = True
            if not self.check:
                self.run(["modprobe", name])

    # -- sysctls --------------------------------------------------------------------------------
    def wanted_sysctls(self):
        """[(parts, value, optional)]: optional ones are per device (a missing device at boot is no error)."""
        p = self.p
        out = []
        if p["platform_labels"] is not None:
            out.append((["net", "mpls", "platform_labels"], str(p["platform_labels"]), False))
        for dev in p["input_interfaces"]:
            out.append((["net", "mpls", "conf", dev, "input"], "1", dev != "lo"))
        for dev in p["no_input_interfaces"]:
            out.append((["net", "mpls", "conf", dev, "input"], "0", dev != "lo"))
        for version in p["forwarding"]:
            if version not in (4, 6):
                self.m.fail_json(msg="forwarding: %r is not an IP version (4 or 6)" % version)
            out.append(
                (
                    ["net", "ipv4", "ip_forward"] if version == 4 else ["net", "ipv6", "conf", "all", "forwarding"],
                    "1",
                    False,
                )
            )
        for dev in p["rp_filter_loose"]:
            out.append((["net", "ipv4", "conf", dev, "rp_filter"], "2", dev != "lo"))
        if p["conntrack_checksum"] is not None:
            out.append((["net", "netfilter", "nf_conntrack_checksum"], "1" if p["conntrack_checksum"] else "0", False))
        for name, value in p["sysctls"].items():
            out.append((sysctl_parts(name), str(value), False))
        return out

    def sysctls(self, wanted):
        for parts, value, _optional in wanted:
            name = sysctl_name(parts)
            current = read_sysctl(parts)
            if current is None:
                if self.check and self.loading:
                    # Not there yet: a module this run would load brings it.
                    self.change(name, "(absent)", value, "sysctl -w %s=%s" % (name, value))
                    continue
                self.m.fail_json(
                    msg="sysctl %s does not exist here (is the interface missing, or its kernel "
                    "module not loaded?)" % name,
                    actions=self.actions,
                )
            if parts[-1] == "platform_labels" and not self.p["shrink_platform_labels"] and int(current) >= int(value):
                continue
            if parts[-1] == "rp_filter" and current != "1":
                continue  # only strict is in the way: off or loose stay as they are
            if current == value:
                continue
            self.change(name, current, value, "sysctl -w %s=%s" % (name, value))
            if not self.check:
                try:
                    with open(os.path.join(PROC_SYS, *parts), "w") as f:
                        f.write(value)
                except OSError as e:
                    self.m.fail_json(msg="cannot set %s=%s: %s" % (name, value, e), actions=self.actions)

    # -- addresses and label routes -------------------------------------------------------------
    def loopback(self):
        wanted = self.p["loopback_addresses"]
        if not wanted:
            return
        have = set()
        for line in self.run(["ip", "-o", "address", "show", "dev", "lo"]).splitlines():
            words = line.split()
            if len(words) > 3 and words[2] in ("inet", "inet6"):
                have.add(words[3])
        for address in wanted:
            cidr = address if "/" in address else address + ("/128" if ":" in address else "/32")
            if cidr in have:
                continue
            self.change("lo address " + cidr, "absent", "present", "ip address add %s dev lo" % cidr)
            if not self.check:
                self.run(["ip", "address", "add", cidr, "dev", "lo"])

    def label_routes(self):
        wanted = self.p["label_routes"]
        if not wanted:
            return
        have = {}
        if read_sysctl(["net", "mpls", "platform_labels"]) is not None:
            for line in self.run(["ip", "-f", "mpls", "route", "show"]).splitlines():
                words = line.split()
                if not words or not words[0].isdigit():
                    continue
                via = dev = None
                if "via" in words and words.index("via") + 2 < len(words):
                    via = words[words.index("via") + 2]
                if "dev" in words and words.index("dev") + 1 < len(words):
                    dev = words[words.index("dev") + 1]
                swaps = "as" in words  # a swap route is not a transport label's pop
                have[int(words[0])] = (None if swaps else via, dev, " ".join(words[1:]))
        for route in wanted:
            try:
                label, via, dev = int(route["label"]), str(route["via"]), str(route["dev"])
            except (KeyError, TypeError, ValueError):
                self.m.fail_json(msg="label_routes: %r: each route needs label, via and dev" % (route,))
            current = have.get(label)
            if current is not None and current[:2] == (via, dev):
                continue
            family = "inet6" if ":" in via else "inet"
            self.change(
                "mpls route %d" % label,
                current[2] if current else "(none)",
                "via %s %s dev %s" % (family, via, dev),
                "ip -f mpls route replace %d via %s %s dev %s" % (label, family, via, dev),
            )
            if not self.check:
                self.run(
                    [
                        "ip",
                        "-f",
                        "mpls",
                        "route",
                        "replace",
                        str(label),
                        "via",
                        family,
                        via,
                        "dev",
                        dev,
                        "proto",
                        "static",
                    ]
                )

    # -- files ------------------------------------------------------------------------------------
    def file(self, path, content):
        if not path:
            return
        try:
            with open(path) as f:
                current = f.read()
        except OSError:
            current = None
        if current == content:
            return
        self.diffs.append({"before_header": path, "after_header": path, "before": current or "", "after": content})
        self.actions.append("write " + path)
        if self.check:
            return
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            os.makedirs(directory, 0o755)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".mplsorch.")
        with os.fdopen(fd, "w") as f:
            f.write(content)
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)

    def files(self, wanted):
        p = self.p
        if p["modules"]:
            self.file(
                p["modules_load_file"],
                "# mplsorch (mpls_node role): kernel modules loaded at boot\n"
                + "".join(name + "\n" for name in p["modules"]),
            )
        lines = [
            "# mplsorch (mpls_node role): applied at boot by systemd-sysctl, after modules-load.d",
            "# (per device lines start with '-': a device that is not there yet is no error).",
        ]
        for parts, value, optional in wanted:
            lines.append("%s%s = %s" % ("-" if optional else "", sysctl_name(parts), value))
        self.file(p["sysctl_file"], "\n".join(lines) + "\n")
        self.file(p["rt_protos_file"], RT_PROTOS)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            modules=dict(type="list", elements="str", default=[]),
            platform_labels=dict(type="int"),
            shrink_platform_labels=dict(type="bool", default=False),
            input_interfaces=dict(type="list", elements="str", default=[]),
            no_input_interfaces=dict(type="list", elements="str", default=[]),
            forwarding=dict(type="list", elements="int", default=[]),
            rp_filter_loose=dict(type="list", elements="str", default=[]),
            conntrack_checksum=dict(type="bool"),
            sysctls=dict(type="dict", default={}),
            loopback_addresses=dict(type="list", elements="str", default=[]),
            label_routes=dict(type="list", elements="dict", default=[]),
            modules_load_file=dict(type="str", default=""),
            sysctl_file=dict(type="str", default=""),
            rt_protos_file=dict(type="str", default=""),
        ),
        supports_check_mode=True,
    )
    overlap = set(module.params["input_interfaces"]) & set(module.params["no_input_interfaces"])
    if overlap:
        module.fail_json(msg="MPLS input both on and off for %s" % ", ".join(sorted(overlap)))
    node = Node(module)
    node.modules()
    wanted = node.wanted_sysctls()
    node.sysctls(wanted)
    node.loopback()
    node.label_routes()
    node.files(wanted)
    diff = list(node.diffs)
    if node.before:
        diff.insert(
            0,
            {
                "before_header": "kernel state",
                "after_header": "kernel state",
                "before": "\n".join(node.before) + "\n",
                "after": "\n".join(node.after) + "\n",
            },
        )
    module.exit_json(changed=bool(node.actions), actions=node.actions, diff=diff)


if __name__ == "__main__":
    main()
