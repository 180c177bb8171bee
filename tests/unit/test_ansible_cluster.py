"""The balancer role's cluster settings, rendered on this machine as the controller runs them
(connection local, into a temporary directory): etcd's TLS files copied with their modes and
owner, and the configuration file (written by the mplsorch role's own template and checked by
`mplsorch config validate`) with the cluster's endpoints, the member's name (the inventory's host
name unless given) and cluster.tls naming the copies; without cluster settings no file is copied
and the configuration has no cluster. The roll-out itself runs in the kernel lab
(netns_tests/test_ansible.py)."""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.config.examples import example_data
from orchestrator.config.load import parse_config
from orchestrator.config.model import BalancerConfig, ClusterTls, StoreDown

ROOT = Path(__file__).resolve().parents[2]

PLAY = """
- name: {name}
  hosts: localhost
  gather_facts: false
  connection: local
  vars_files: [{vars}]
  tasks:
    - name: The balancer role's TLS files
      ansible.builtin.import_role:
        name: mplsorch_balancer
        tasks_from: cluster_tls.yml
    - name: The configuration file, as the balancer role hands it to mplsorch
      ansible.builtin.import_role:
        name: mplsorch
        tasks_from: config.yml
      vars:
        mplsorch_role: balancer
        mplsorch_config: "{{{{ mplsorch_balancer__config }}}}"
"""


def run(tmp: Path, plays: list[tuple[str, dict[str, object]]]) -> None:
    text = ""
    for name, variables in plays:
        path = tmp / f"{name}.vars.json"
        path.write_text(json.dumps(variables))
        text += PLAY.format(name=name, vars=json.dumps(str(path)))
    playbook = tmp / "play.yml"
    playbook.write_text(text)
    tool = Path(sys.executable).parent / "ansible-playbook"
    if not tool.exists():
        pytest.fail(f"ansible-playbook is not installed next to {sys.executable}: pip install -e '.[test]'")
    env = dict(os.environ) | {
        "ANSIBLE_ROLES_PATH": str(ROOT / "ansible" / "roles"),
        "ANSIBLE_HOME": str(tmp / "home"),
        "ANSIBLE_LOCAL_TEMP": str(tmp / "local"),
        "ANSIBLE_NOCOLOR": "1",
        "LC_ALL": os.environ.get("LC_ALL") or "C.UTF-8",
    }
    out = subprocess.run(
        [str(tool), "-i", "localhost,", str(playbook), "-e", f"ansible_python_interpreter={sys.executable}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_balancer_role_copies_etcds_tls_files_and_writes_the_cluster_settings(tmp_path: Path) -> None:
    sources = {}
    for name in ("ca", "cert", "key"):
        sources[name] = tmp_path / f"source-{name}.pem"
        sources[name].write_text(f"-----BEGIN {name.upper()}-----\n{name} of the test\n")
    balancer = example_data("balancer")
    del balancer["role"]
    user = pwd.getpwuid(os.getuid()).pw_name
    tls_dir = tmp_path / "node" / "etcd"
    common = {
        "mplsorch_balancer_config": balancer,
        "mplsorch_venv": sys.prefix,
        "mplsorch_control_socket": str(tmp_path / "lb.sock"),
    }
    run(
        tmp_path,
        [
            (
                "cluster",
                {
                    **common,
                    "mplsorch_config_file": str(tmp_path / "node" / "balancer.yaml"),
                    "mplsorch_balancer_cluster": {
                        "endpoints": ["10.0.0.5:2379", "10.0.0.6:2379"],
                        "when_store_down": "local",
                    },
                    "mplsorch_balancer_cluster_tls": {k: str(v) for k, v in sources.items()},
                    "mplsorch_balancer_cluster_tls_dir": str(tls_dir),
                    "mplsorch_balancer_cluster_tls_owner": user,
                    "mplsorch_balancer_cluster_tls_group": grp.getgrgid(os.getgid()).gr_name,
                },
            ),
            ("single", {**common, "mplsorch_config_file": str(tmp_path / "single" / "balancer.yaml")}),
        ],
    )
    written = (tmp_path / "node" / "balancer.yaml").read_text()
    config = parse_config(written)
    assert isinstance(config, BalancerConfig) and config.cluster is not None
    assert config.cluster.name == "localhost"  # the inventory's host name
    assert config.cluster.endpoints == (("10.0.0.5", 2379), ("10.0.0.6", 2379))
    assert config.cluster.when_store_down is StoreDown.LOCAL
    assert config.cluster.tls == ClusterTls(
        str(tls_dir / "ca.pem"), str(tls_dir / "cert.pem"), str(tls_dir / "key.pem")
    )
    modes = {"ca": 0o644, "cert": 0o644, "key": 0o600}
    for name, source in sources.items():
        copy = tls_dir / f"{name}.pem"
        assert copy.read_text() == source.read_text()
        st = copy.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (modes[name], os.getuid(), os.getgid()), name
    # the rest of the configuration is the inventory's, unchanged
    assert yaml.safe_load(written)["services"] == balancer["services"]
    single = parse_config((tmp_path / "single" / "balancer.yaml").read_text())
    assert isinstance(single, BalancerConfig) and single.cluster is None
