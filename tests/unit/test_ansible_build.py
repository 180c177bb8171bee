"""The mplsorch role's own wheel build (roles/mplsorch/tasks/build.yml, used when mplsorch_wheel is
empty), run on this machine as the controller runs it: the wheel is built from this repository,
and twice gives the same bytes, so a second roll-out copies and installs nothing. (The lab test
installs the wheel bootstrap.sh built the same way: building it in the emulated VM is too slow.)"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PLAYBOOK = """
- name: Build the wheel as the mplsorch role does
  hosts: localhost
  gather_facts: false
  connection: local
  tasks:
    - name: Build
      ansible.builtin.import_role:
        name: mplsorch
        tasks_from: build.yml
    - name: Show
      ansible.builtin.debug:
        msg: "WHEEL={{ mplsorch__wheel }}"
"""


def build(tmp: Path, out: str) -> Path:
    playbook = tmp / "build.yml"
    playbook.write_text(PLAYBOOK)
    wheelhouse = ROOT / ".wheelhouse"
    offline = any(wheelhouse.glob("setuptools-*.whl")) and any(wheelhouse.glob("wheel-*.whl"))
    args = f'["--no-index", "--find-links", "{wheelhouse}"]' if offline else "[]"
    env = dict(os.environ) | {
        "ANSIBLE_ROLES_PATH": str(ROOT / "ansible" / "roles"),
        "ANSIBLE_HOME": str(tmp / "home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp / "local"),
        "ANSIBLE_NOCOLOR": "1",
        "LC_ALL": os.environ.get("LC_ALL") or "C.UTF-8",
    }
    ansible_playbook = Path(sys.executable).parent / "ansible-playbook"
    if not ansible_playbook.exists():
        pytest.fail(f"ansible-playbook is not installed next to {sys.executable}: pip install -e '.[test]'")
    result = subprocess.run(
        [
            str(ansible_playbook),
            "-i",
            "localhost,",
            str(playbook),
            "-e",
            f"ansible_python_interpreter={sys.executable}",
            "-e",
            f"mplsorch_wheel_build_dir={tmp / out}",
            "-e",
            f'{{"mplsorch_wheel": "", "mplsorch_wheel_build_args": {args}}}',
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    wheel = Path(result.stdout.split("WHEEL=")[1].split('"')[0])
    assert wheel.parent == tmp / out and wheel.name.startswith("mplsorch-") and wheel.suffix == ".whl"
    return wheel


def test_the_role_builds_the_same_wheel_from_this_repository_twice(tmp_path: Path) -> None:
    first, second = build(tmp_path, "one"), build(tmp_path, "two")
    assert hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(second.read_bytes()).digest()
    with zipfile.ZipFile(first) as z:
        assert z.read("orchestrator/cli/main.py") == (ROOT / "orchestrator" / "cli" / "main.py").read_bytes()
        assert "orchestrator/lab/default.yaml" in z.namelist()
        # What an installed daemon reads at start (capture/nftables.py renders the node's ruleset).
        for name in ("nftables.balancer.nft.j2", "nftables.server.nft.j2", "mplsorch.service"):
            assert z.read(f"orchestrator/templates/{name}") == (ROOT / "templates" / name).read_bytes()
