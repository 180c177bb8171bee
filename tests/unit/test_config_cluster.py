"""`cluster:` of the balancer configuration: defaults, what `config show` prints reads back, and
each wrong value named with its line (literal text, as the other configuration tests)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from orchestrator.config.examples import example
from orchestrator.config.load import ConfigError, parse_config
from orchestrator.config.model import BalancerConfig, ClusterConfig, StoreDown


def load(cluster: object, changes: dict[str, object] | None = None) -> BalancerConfig:
    cfg = parse_config(example("balancer", {"cluster": cluster, **(changes or {})}))
    assert isinstance(cfg, BalancerConfig)
    return cfg


def test_absent_or_null_is_one_balancer_and_defaults_fill_in() -> None:
    assert parse_config(example("balancer")).cluster is None  # type: ignore[union-attr]
    assert load(None).cluster is None
    cfg = load({"name": "lb1", "endpoints": ["10.0.0.5:2379", "[fd00::5]:2379", "etcd-1.example:2379"]})
    assert cfg.cluster == ClusterConfig(
        "lb1", (("10.0.0.5", 2379), ("fd00::5", 2379), ("etcd-1.example", 2379)), None, 10, 256, "/mplsorch/"
    )
    assert cfg.cluster.when_store_down is StoreDown.REFUSE
    again = parse_config(example("balancer", {"cluster": cfg.to_dict()["cluster"]}))
    assert again == cfg
    local = load({"name": "lb1", "endpoints": ["10.0.0.5:2379"], "when_store_down": "local"})
    assert local.cluster is not None and local.cluster.when_store_down is StoreDown.LOCAL
    assert parse_config(example("balancer", {"cluster": local.to_dict()["cluster"]})) == local
    own = load({"name": "lb1", "endpoints": ["10.0.0.5:2379"], "member_label": 201})
    assert own.cluster is not None and own.cluster.member_label == 201 and cfg.cluster.member_label is None
    assert parse_config(example("balancer", {"cluster": own.to_dict()["cluster"]})) == own


TEXT = """role: balancer
node: {transport_label: 100}
interfaces: {clients: [lan0], fabric: [fab0], fabric_next_hop: 10.1.0.2}
labels: {range: [1000, 1999]}
pools:
  web:
    servers:
      s1: {address: 10.2.0.1, transport_label: 101}
services:
  http: {vip: 10.0.0.100, protocol: tcp, ports: [80], pool: web, admission: {min_free_labels: 0}}
cluster:
  name: lb1
  endpoints: ["127.0.0.1:2379"]
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("  lease_ttl: 1\n", "test.yaml:14: cluster.lease_ttl: lease_ttl 1 is out of range: must be 2..3600"),
        ("  label_block: 0\n", "test.yaml:14: cluster.label_block: label_block 0 is out of range: must be >= 1"),
        (
            "  label_block: 500\n",
            "test.yaml:14: cluster.label_block: a block of 500 pairs is larger than labels.range (499 pairs)",
        ),
        ("  prefix: mplsorch\n", "test.yaml:14: cluster.prefix: 'mplsorch' is not a key prefix"),
        ("  when_store_down: maybe\n", "test.yaml:14: cluster.when_store_down: unknown policy 'maybe'"),
        ("  tls: {ca: /ca.pem}\n", "test.yaml:14: cluster.tls.cert: required key is missing"),
        ("  members: 3\n", "test.yaml:14: cluster.members: unknown key"),
        ("  member_label: 15\n", "test.yaml:14: cluster.member_label: member label 15 is out of range"),
        ("  member_label: 1001\n", "test.yaml:14: cluster.member_label: member label 1001 lies inside labels.range"),
        (
            "  member_label: 101\n",
            "test.yaml:14: cluster.member_label: member label 101 is already used by server 's1'",
        ),
        ("  member_label: 100\n", "test.yaml:14: cluster.member_label: member label 100 is already used by node"),
    ],
)
def test_wrong_values_are_named_with_their_line(extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(TEXT + extra, "test.yaml")
    assert str(err.value).startswith(message), str(err.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (TEXT.replace('["127.0.0.1:2379"]', "[]"), "test.yaml:13: cluster.endpoints: at least one etcd endpoint"),
        (
            TEXT.replace('["127.0.0.1:2379"]', '["127.0.0.1"]'),
            "test.yaml:13: cluster.endpoints[0]: '127.0.0.1' is not an etcd endpoint",
        ),
        (
            TEXT.replace('["127.0.0.1:2379"]', '["a:1", "a:1"]'),
            "test.yaml:13: cluster.endpoints[1]: endpoint a:1 is listed twice",
        ),
        (
            TEXT.replace('["127.0.0.1:2379"]', '["a:70000"]'),
            "test.yaml:13: cluster.endpoints[0]: port 70000 is out of range",
        ),
        (TEXT.replace("name: lb1", "name: lb/1"), "test.yaml:12: cluster.name: invalid member name 'lb/1'"),
        (TEXT.replace("  name: lb1\n", ""), "test.yaml:11: cluster.name: required key is missing"),
    ],
)
def test_wrong_names_and_endpoints_are_named_with_their_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "test.yaml")
    assert str(err.value).startswith(message), str(err.value)


def test_server_blocks_are_refused_with_cluster() -> None:
    with pytest.raises(ConfigError, match="server-blocks is not supported with cluster"):
        load(
            {"name": "lb1", "endpoints": ["127.0.0.1:2379"]},
            {
                "labels.allocation": "server-blocks",
                "pools.web.servers.s1.label_block": [1000, 1999],
                "pools.web.servers.s2.label_block": [2000, 2999],
                "pools.web.servers.s3.label_block": [3000, 3999],
            },
        )


def test_one_balancer_never_imports_etcds_client() -> None:
    code = (
        "import sys\n"
        "from orchestrator.config.examples import example\n"
        "from orchestrator.config.load import parse_config\n"
        "from orchestrator.daemon.balancer import BalancerDaemon\n"
        "from orchestrator.dataplane.fake import FakeProvider\n"
        "from orchestrator.daemon.loop import Capture\n"
        "d = BalancerDaemon('x', FakeProvider(['fab0']), Capture(None, None), parse_config(example('balancer')))\n"
        "assert d.member is None\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('aetcd', 'grpc') or m.startswith('orchestrator.cluster')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
