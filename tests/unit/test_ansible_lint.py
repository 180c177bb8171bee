"""ansible/: ansible-lint (production profile) and `ansible-playbook --syntax-check` pass, every
role has meta/argument_specs.yml, and the lab inventory matches the default lab topology. The
roll-out itself runs in the kernel lab (netns_tests/test_ansible.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.lab.topology import CLIENT_ROLES, load

ANSIBLE = Path(__file__).resolve().parents[2] / "ansible"
ROLES = ("mpls_node", "mplsorch", "mplsorch_balancer", "mplsorch_server")


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{name} is not installed next to {sys.executable}: pip install -e '.[test]'")
    return str(path)


def _env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ) | {
        "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
        "ANSIBLE_HOME": str(tmp_path),
        "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp"),
        "NO_COLOR": "1",
        "LC_ALL": os.environ.get("LC_ALL") or "C.UTF-8",
    }


def test_ansible_lint_passes(tmp_path: Path) -> None:
    out = subprocess.run(
        [_tool("ansible-lint"), "--offline", "--profile", "production", "--format", "pep8"],
        cwd=ANSIBLE,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_playbook_passes_its_syntax_check(tmp_path: Path) -> None:
    out = subprocess.run(
        [_tool("ansible-playbook"), "--syntax-check", "-i", "inventories/lab", "site.yml"],
        cwd=ANSIBLE,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_role_has_an_argument_spec() -> None:
    for role in ROLES:
        spec = yaml.safe_load((ANSIBLE / "roles" / role / "meta" / "argument_specs.yml").read_text())
        options = spec["argument_specs"]["main"]["options"]
        defaults = yaml.safe_load((ANSIBLE / "roles" / role / "defaults" / "main.yml").read_text()) or {}
        assert set(defaults) <= set(options), (role, set(defaults) - set(options))


def test_the_lab_inventory_is_the_default_lab() -> None:
    """Addresses, transport labels and the fabric switch's ports as the lab builds them."""
    topo = load(None)
    hosts: dict[str, dict] = {}
    for group in yaml.safe_load((ANSIBLE / "inventories" / "lab" / "hosts.yml").read_text()).values():
        hosts.update(group["hosts"])
    # The clients are no Ansible hosts (the label-aware one runs its agent only in a netns test).
    assert sorted(hosts) == sorted(n.name for n in topo.nodes if n.role not in CLIENT_ROLES)
    for name, host in hosts.items():
        attachments = topo.attachments(name)
        assert host["ansible_host"] == str(attachments[0][1].address), name  # its sshd's address
        node = topo.node(name)
        assert host.get("mplsorch_transport_label") == node.transport_label, name
        if node.transport_label is not None:
            seg, me = next((seg, m) for seg, m in attachments if any(o.node == "p" for o in seg.members))
            port = next(o.dev for o in seg.members if o.node == "p")
            assert host["mplsorch_fabric_port"] == port, name
            assert host.get("mplsorch_fabric_address", host["ansible_host"]) == str(me.address), name
