"""`interfaces.offload`: the tc filters' hardware policy per fabric interface (issue 17):
validated with its line and key path, defaulted to `auto`, shown by `config show`, and used by
the balancer core for the C2S filters it installs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli.main import app
from orchestrator.config import ConfigError, parse_config
from orchestrator.dataplane.ops import OffloadPolicy

TWO = """\
role: balancer
node:
  transport_label: 100
interfaces:
  clients: [lan0]
  fabric: [fab0, fab1]
  fabric_next_hop: 10.255.0.2
labels:
  range: [1000, 1999]
pools:
  web:
    servers:
      s1: {address: 10.1.1.10, transport_label: 101}
services:
  http:
    vip: 10.0.0.100
    protocol: tcp
    ports: [80]
    pool: web
"""


def _edit(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} must occur once"
    return text.replace(old, new)


def assert_error(text: str, marker: str, path: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "lb.yaml")
    e = info.value
    line = next(i + 1 for i, row in enumerate(text.splitlines()) if marker in row)
    assert (e.line, e.path) == (line, path), str(e)
    assert fragment in e.message, str(e)
    assert str(e) == f"lb.yaml:{line}: {path}: {e.message}"


def test_every_fabric_interface_is_auto_unless_given() -> None:
    cfg = parse_config(TWO)
    assert cfg.interfaces.offload == (("fab0", OffloadPolicy.AUTO), ("fab1", OffloadPolicy.AUTO))
    assert cfg.interfaces.required_offload() == ()
    assert cfg.to_dict()["interfaces"]["offload"] == {"fab0": "auto", "fab1": "auto"}


def test_a_mapping_sets_each_interface_and_leaves_the_others_auto() -> None:
    cfg = parse_config(_edit(TWO, "  fabric_next_hop:", "  offload: {fab1: required}\n  fabric_next_hop:"))
    assert cfg.interfaces.offload_of("fab0") is OffloadPolicy.AUTO
    assert cfg.interfaces.offload_of("fab1") is OffloadPolicy.REQUIRED
    assert cfg.interfaces.required_offload() == ("fab1",)


def test_one_word_sets_every_fabric_interface() -> None:
    cfg = parse_config(_edit(TWO, "  fabric_next_hop:", "  offload: never\n  fabric_next_hop:"))
    assert [policy for _, policy in cfg.interfaces.offload] == [OffloadPolicy.NEVER] * 2
    assert cfg.to_dict()["interfaces"]["offload"] == {"fab0": "never", "fab1": "never"}


@pytest.mark.parametrize("offload", ["required", "{fab0: never}", "{fab1: required, fab0: auto}"])
def test_show_output_reads_back_equal(offload: str) -> None:
    cfg = parse_config(_edit(TWO, "  fabric_next_hop:", f"  offload: {offload}\n  fabric_next_hop:"))
    assert parse_config(yaml.safe_dump(cfg.to_dict(), sort_keys=False)) == cfg
    assert parse_config(json.dumps(cfg.to_dict())) == cfg


@pytest.mark.parametrize(
    "offload,marker,path,fragment",
    [
        (
            "software",
            "offload:",
            "interfaces.offload",
            "unknown offload policy 'software'; expected one of auto, never, required",
        ),
        ("{fab0: skip_sw}", "offload:", "interfaces.offload.fab0", "unknown offload policy 'skip_sw'"),
        (
            "{lan0: required}",
            "offload:",
            "interfaces.offload.lan0",
            "interface 'lan0' is not in interfaces.fabric: the offload policy is for the fabric links",
        ),
        ("{fab2: never}", "offload:", "interfaces.offload.fab2", "did you mean"),
        ("[fab0]", "offload:", "interfaces.offload", "expected a mapping"),
    ],
    ids=["old word", "bad word", "client interface", "unknown interface", "a list"],
)
def test_bad_offload_values_name_line_and_key(offload: str, marker: str, path: str, fragment: str) -> None:
    assert_error(_edit(TWO, "  fabric_next_hop:", f"  offload: {offload}\n  fabric_next_hop:"), marker, path, fragment)


def test_cli_config_show_prints_the_policy(tmp_path: Path) -> None:
    f = tmp_path / "lb.yaml"
    f.write_text(_edit(TWO, "  fabric_next_hop:", "  offload: {fab0: required}\n  fabric_next_hop:"))
    r = CliRunner().invoke(app, ["config", "show", str(f), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["interfaces"]["offload"] == {"fab0": "required", "fab1": "auto"}
    r = CliRunner().invoke(app, ["config", "show", str(f)])
    assert yaml.safe_load(r.stdout)["interfaces"]["offload"] == {"fab0": "required", "fab1": "auto"}
