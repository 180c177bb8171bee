"""Ansible in the lab (netns_tests/test_ansible.py): bare nodes, sshd in each managed node, and
`ansible-playbook` runs of ansible/site.yml with the lab inventory (ansible/inventories/lab).

The lab's namespaces share one filesystem and have no link to the root namespace the controller
runs in. Each node's sshd listens on the node's own address, with its host key, configuration,
pid file and log in the node's runtime dir; ssh reaches it through `ip netns exec NODE busybox nc`
(the inventory's ProxyCommand). The client key and the known hosts are made into a directory of
the test's own, and handed to the playbook as extra variables with the wheel and the wheelhouse.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import os
import pwd
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.lab.kit import Lab

ROOT = Path(__file__).resolve().parents[2]  # netns_tests/harness/ansible_lab.py -> the repository
ANSIBLE_DIR = ROOT / "ansible"
INVENTORY = ANSIBLE_DIR / "inventories" / "lab"
# Filled by bootstrap.sh (`pip wheel`, which needs the package index): the lab VM has no network,
# so the nodes' virtual environments get mplsorch's dependencies (and the wheel build its
# setuptools) from here.
WHEELHOUSE = ROOT / ".wheelhouse"
MANAGED_ROLES = ("balancer", "fabric", "server")
SSHD = "/usr/sbin/sshd"
# An ansible-playbook run in the emulated VM: starting Python alone takes a while there, and every
# task costs each node one more.
PLAYBOOK_TIMEOUT = 600
RECAP_RE = re.compile(
    r"^(\S+)\s*:\s*ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)"
    r"\s+skipped=(\d+)\s+rescued=(\d+)\s+ignored=(\d+)",
    re.M,
)


def managed(lab: Lab) -> list[str]:
    """The nodes the playbook manages (clients are not in the inventory)."""
    return [n["name"] for n in lab.desc["nodes"] if n["role"] in MANAGED_ROLES]


@dataclass
class Taken:
    """What bare() took from the lab, for restore(): per node the sysctls it set (name to the
    value before), the fabric's label routes (`ip -f mpls route` lines), the servers' VIPs."""

    sysctls: dict[str, dict[str, str]]
    label_routes: dict[str, list[str]]
    vips: dict[str, list[str]]


def bare(lab: Lab) -> Taken:
    """Take back what the lab builder did that the roles own, so the roll-out starts from bare
    namespaces (links, addresses and plain routes only): the fabric's transport label routes,
    the label tables, MPLS input, forwarding, the servers' VIPs on lo and their loose rp_filter.
    Returns what it took: restore() gives it back for the test modules that run after."""
    taken = Taken({}, {}, {})
    for node in managed(lab):
        role = lab.node(node)["role"]
        devs = [i["dev"] for i in lab.node(node)["interfaces"]] + ["lo"]
        if role == "fabric":
            taken.label_routes[node] = mpls_routes(lab, node)
            for line in taken.label_routes[node]:
                if line.split()[0].isdigit():
                    lab.sh(node, "ip", "-f", "mpls", "route", "del", line.split()[0])
        settings = {"net.mpls.platform_labels": "0"} | {f"net.mpls.conf.{d}.input": "0" for d in devs}
        if role in ("balancer", "fabric"):
            settings |= {"net.ipv4.ip_forward": "0", "net.ipv6.conf.all.forwarding": "0"}
        if role == "server":
            # Strict: the role makes it loose where it must.
            settings |= {f"net.ipv4.conf.{d}.rp_filter": "1" for d in devs}
            taken.vips[node] = list(lab.desc["vips"])
            for vip in lab.desc["vips"]:
                lab.sh(node, "ip", "address", "del", f"{vip}/{128 if ':' in vip else 32}", "dev", "lo")
        taken.sysctls[node] = {name: lab.sh(node, "sysctl", "-n", name).stdout.strip() for name in settings}
        lab.sh(node, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items()))
    return taken


def restore(lab: Lab, taken: Taken) -> None:
    """Give the lab back what bare() took (the roll-out's own settings are overwritten: its label
    tables are smaller than the lab's), so later test modules find the lab as its builder left it."""
    for node, settings in taken.sysctls.items():
        lab.sh(node, "sysctl", "-q", "-w", *(f"{k}={v}" for k, v in settings.items()))
    for node, routes in taken.label_routes.items():
        for line in routes:
            lab.sh(node, "ip", "-f", "mpls", "route", "replace", *line.split())
    for node, vips in taken.vips.items():
        for vip in vips:
            lab.sh(node, "ip", "address", "replace", f"{vip}/{128 if ':' in vip else 32}", "dev", "lo")


def wheelhouse_wheel() -> Path:
    """The mplsorch wheel bootstrap.sh built into the wheelhouse, if it holds this tree's code.
    (Building it inside the emulated lab VM takes a quarter of an hour.)"""
    wheels = sorted(WHEELHOUSE.glob("mplsorch-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(
            f"expected one mplsorch wheel in {WHEELHOUSE}, found {[w.name for w in wheels]}: "
            "`bash bootstrap.sh setup` builds it"
        )
    with zipfile.ZipFile(wheels[0]) as z:
        record_name = next(n for n in z.namelist() if n.endswith(".dist-info/RECORD"))
        record = {row[0]: row[1] for row in csv.reader(z.read(record_name).decode().splitlines()) if row}
    package = ROOT / "orchestrator"
    tree = [p for p in package.rglob("*") if p.suffix == ".py" or (p.suffix == ".yaml" and p.parent.name == "lab")]
    stale = []
    for path in tree:
        name = str(path.relative_to(ROOT))
        digest = "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(path.read_bytes()).digest()).decode().rstrip("=")
        if record.get(name) != digest:
            stale.append(name)
    if stale:
        raise RuntimeError(
            f"{wheels[0].name} in {WHEELHOUSE} is older than the tree ({', '.join(sorted(stale)[:5])}"
            f"{' ...' if len(stale) > 5 else ''}): `bash bootstrap.sh setup` builds it again"
        )
    return wheels[0]


def mpls_routes(lab: Lab, node: str) -> list[str]:
    return [
        line.strip() for line in lab.sh(node, "ip", "-f", "mpls", "route", "show").stdout.splitlines() if line.strip()
    ]


@dataclass
class Run:
    """One ansible-playbook run: its exit status, its output and the PLAY RECAP per host."""

    rc: int
    output: str
    recap: dict[str, dict[str, int]]
    seconds: float = 0.0

    def changed(self) -> dict[str, int]:
        return {host: counts["changed"] for host, counts in self.recap.items()}

    def failed(self) -> dict[str, int]:
        return {host: counts["failed"] + counts["unreachable"] for host, counts in self.recap.items()}


def parse_recap(output: str) -> dict[str, dict[str, int]]:
    keys = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")
    tail = output[output.rfind("PLAY RECAP") :] if "PLAY RECAP" in output else ""
    return {m.group(1): dict(zip(keys, map(int, m.groups()[1:]))) for m in RECAP_RE.finditer(tail)}


class AnsibleLab:
    """sshd on every managed node and the controller's side (keys, known hosts, extra variables).
    `start()` and `close()`; close() stops only the sshd processes it started."""

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.dir = workdir
        self.key = workdir / "id_ed25519"
        self.known_hosts = workdir / "known_hosts"
        self.vars_file = workdir / "lab-vars.yml"
        self.nodes = managed(lab)
        # The lab's runtime dir, where the inventory puts every node's files (lab_dir) and the
        # one venv all nodes share.
        self.lab_dir = Path(lab.node(self.nodes[0])["runtime_dir"]).parent
        self.venv = self.lab_dir / "venv"
        self.sshd_pids: dict[str, int] = {}
        self.runs = 0
        # ssh's master connections: unix sockets, on a local filesystem (not the VM's 9p share).
        self.control_dir = Path(tempfile.mkdtemp(prefix="mplsorch-ssh-"))

    def node_dir(self, node: str) -> Path:
        return Path(self.lab.node(node)["runtime_dir"])

    # -- sshd ----------------------------------------------------------------------------------
    def start(self, wheel: Path | None = None) -> None:
        """Keys, known hosts, one sshd per managed node; the playbook's extra variables."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for d in ("home", "local"):
            (self.dir / d).mkdir(exist_ok=True)
        if not self.key.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mplsorch-lab", "-f", str(self.key)])
        (self.dir / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
        known = []
        for node in self.nodes:
            known.append(self._sshd(node))
        self.known_hosts.write_text("".join(known))
        for node in self.nodes:
            self._wait_listening(node)
        self.write_vars(wheel)

    def _sshd(self, node: str) -> str:
        d = self.node_dir(node) / "sshd"
        d.mkdir(parents=True, exist_ok=True)
        host_key = d / "ssh_host_ed25519_key"
        if not host_key.exists():
            _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", node, "-f", str(host_key)])
        address = self.lab.address(node)
        config = d / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress {address}",
                    "Port 22",
                    f"HostKey {host_key}",
                    f"PidFile {d / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
                    "StrictModes no",  # the key lives in the test's own directory
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    # With PAM, not sshd itself, judging the account: root's password is locked in the lab
                    # VM (virtme-ng's own /etc/shadow), which sshd alone refuses even for a key.
                    "UsePAM yes",
                    "UseDNS no",
                    "PrintMotd no",
                    "X11Forwarding no",
                    "AllowTcpForwarding no",
                    "MaxStartups 100",
                    "MaxSessions 100",
                    "LoginGraceTime 600",
                    "Subsystem sftp internal-sftp",
                    "LogLevel " + os.environ.get("MPLSORCH_SSHD_LOGLEVEL", "INFO"),
                    "",
                ]
            )
        )
        pid_file = d / "sshd.pid"
        pid_file.unlink(missing_ok=True)
        self.lab.sh(node, SSHD, "-t", "-f", str(config))
        self.lab.sh(
            node,
            "sh",
            "-c",
            self._hide_rc_files() + 'exec "$@"',
            "sshd",
            SSHD,
            "-f",
            str(config),
            "-E",
            str(d / "sshd.log"),
        )
        deadline = time.monotonic() + 60
        while not pid_file.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd did not start in {node}: {(d / 'sshd.log').read_text()}")
            time.sleep(0.2)
        self.sshd_pids[node] = int(pid_file.read_text().split()[0])
        return (
            f"{address} {host_key.with_suffix('.pub').read_text().split(' ')[0]} "
            f"{host_key.with_suffix('.pub').read_text().split(' ')[1]}\n"
        )

    def _hide_rc_files(self) -> str:
        """Shell commands that bind an empty file over root's shell start-up files, in the mount
        namespace `ip netns exec` made for sshd (nothing outside it changes). sshd runs every
        command through root's login shell, and bash sources ~/.bashrc for commands that come
        over ssh: this machine's (pyenv init) costs 7 s a command in the emulated VM, and
        Ansible runs one for every module call."""
        empty = self.dir / "empty-rc"
        empty.write_text("")
        home = Path(pwd.getpwnam("root").pw_dir)
        files = [home / name for name in (".bashrc", ".bash_profile", ".bash_login", ".profile")]
        return "".join(
            f"mount --bind {shlex.quote(str(empty))} {shlex.quote(str(f))} && " for f in files if f.is_file()
        )

    def _wait_listening(self, node: str) -> None:
        deadline = time.monotonic() + 60
        while f"{self.lab.address(node)}:22" not in self.lab.sh(node, "ss", "-Hltn").stdout:
            if time.monotonic() > deadline:
                raise RuntimeError(f"sshd in {node} does not listen on {self.lab.address(node)}:22")
            time.sleep(0.2)

    def write_vars(self, wheel: Path | None = None, **more: Any) -> None:
        """The extra variables every run gets: the key, the known hosts, the wheelhouse, the wheel
        (none: the first run builds it from this repository), where the wheel is built."""
        extra: dict[str, Any] = {
            "lab_dir": str(self.lab_dir),
            "lab_ssh_key": str(self.key),
            "lab_known_hosts": str(self.known_hosts),
            "lab_wheelhouse": str(WHEELHOUSE),
            "mplsorch_wheel_build_dir": str(self.dir / "wheels"),
        }
        if wheel is not None:
            extra["mplsorch_wheel"] = str(wheel)
        extra.update(more)
        self.vars_file.write_text(yaml.safe_dump(extra))

    # -- ansible-playbook ----------------------------------------------------------------------
    def env(self) -> dict[str, str]:
        bindir = str(Path(sys.executable).parent)
        return dict(os.environ) | {
            "PATH": bindir + os.pathsep + os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
            "ANSIBLE_CONFIG": str(ANSIBLE_DIR / "ansible.cfg"),
            # In the VM the home directory is read-only: Ansible's own files go to the test's dir.
            "ANSIBLE_HOME": str(self.dir / "home"),
            "ANSIBLE_LOCAL_TEMP": str(self.dir / "local"),
            "ANSIBLE_SSH_CONTROL_PATH_DIR": str(self.control_dir),
            "ANSIBLE_SSH_CONTROL_PATH": "%(directory)s/%%C",  # as close() names them to end them
            "LC_ALL": os.environ.get("LC_ALL") or "C.UTF-8",  # ansible-core insists on a UTF-8 locale
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_STDOUT_CALLBACK": "default",
            "ANSIBLE_DISPLAY_OK_HOSTS": "1",
        }

    def playbook(self, *args: str, timeout: float = PLAYBOOK_TIMEOUT, **extra_vars: Any) -> Run:
        """ansible-playbook -i inventories/lab site.yml -e @<lab vars> [-e <extra_vars as JSON>] ARGS."""
        self.runs += 1
        argv = [
            str(Path(sys.executable).parent / "ansible-playbook"),
            "-i",
            str(INVENTORY),
            str(ANSIBLE_DIR / "site.yml"),
            "-e",
            f"@{self.vars_file}",
        ]
        if extra_vars:
            argv += ["-e", json.dumps(extra_vars)]
        argv += list(args)
        log = self.dir / f"run-{self.runs}.log"  # each line with the seconds since the start
        start = time.monotonic()
        lines: list[str] = []
        with open(log, "w") as out:
            out.write("$ " + " ".join(argv) + "\n")
            proc = subprocess.Popen(
                argv,
                cwd=ANSIBLE_DIR,
                env=self.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                out.write(f"[{time.monotonic() - start:6.0f}s] {line}")
                out.flush()
                if time.monotonic() - start > timeout:
                    proc.kill()
            rc = proc.wait()
            seconds = time.monotonic() - start
            out.write(f"# exit status {rc} after {seconds:.0f} s\n")
        output = "".join(lines)
        return Run(rc, output, parse_recap(output), seconds)

    # -- the daemons the roll-out started --------------------------------------------------------
    def daemon_pid(self, node: str) -> int:
        """The pid in the fallback supervisor's pid file (0 when none)."""
        path = self.node_dir(node) / "run" / "mplsorch.pid"
        return int(path.read_text().split()[0]) if path.exists() else 0

    def daemon_log(self, node: str) -> str:
        path = self.node_dir(node) / "mplsorch.log"
        return path.read_text() if path.exists() else ""

    def config_file(self, node: str) -> Path:
        role = self.lab.node(node)["role"]
        return self.node_dir(node) / "etc" / f"{role}.yaml"

    def stop_daemons(self) -> None:
        """SIGTERM to the daemons the roll-out started (by the pids in their pid files)."""
        for node in self.nodes:
            pid = self.daemon_pid(node)
            if pid and _alive(pid):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        for node in self.nodes:
            pid = self.daemon_pid(node)
            while pid and _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.2)

    def close(self) -> None:
        self.stop_daemons()
        for node in self.nodes:  # the master connections Ansible left (ControlPersist)
            subprocess.run(
                [
                    "ssh",
                    "-O",
                    "exit",
                    "-o",
                    f"ControlPath={self.control_dir}/%C",
                    "-p",
                    "22",
                    "-l",
                    "root",
                    self.lab.address(node),
                ],
                capture_output=True,
                timeout=30,
                check=False,
            )
        for pid in self.sshd_pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGTERM)
        self.sshd_pids.clear()
        shutil.rmtree(self.control_dir, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, text=True, timeout=120)
