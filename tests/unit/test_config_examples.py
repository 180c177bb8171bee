"""orchestrator.config.examples: the one helper that makes configurations from the example files
by key path (the lab's harnesses and the unit tests use it instead of editing the text)."""

from __future__ import annotations

import pytest

from orchestrator.config import load_config, parse_config
from orchestrator.config.examples import DELETE, apply_changes, example, example_data, example_path


@pytest.mark.parametrize("role", ["balancer", "server"])
def test_an_unchanged_example_reads_as_the_file_does(role: str) -> None:
    assert parse_config(example(role), "x.yaml").to_dict() == load_config(example_path(role)).to_dict()


def test_changes_set_and_add_keys_by_dotted_path() -> None:
    cfg = parse_config(
        example(
            "balancer",
            {
                "labels.range": [1001, 1999],
                "services.http.ports": [80, 8080],
                "labels.allocation": "pool",
                "metrics.listen": "127.0.0.1:9469",
            },
        )
    )
    assert cfg.to_dict()["labels"]["range"] == [1001, 1999]
    http = next(s for s in cfg.services if s.name == "http")
    assert list(http.ports) == [80, 8080]
    assert cfg.metrics is not None and cfg.metrics.port == 9469


def test_a_tuple_path_reaches_keys_with_dots_and_delete_removes() -> None:
    text = example("server", {("vips", "10.0.0.200"): {"table": 102}, ("vips", "fd00:100::100"): DELETE})
    assert [str(v.address) for v in parse_config(text).vips] == ["10.0.0.100", "10.0.0.200"]
    assert "labels" not in apply_changes(example_data("server"), {"labels": DELETE})


def test_a_change_that_misses_is_an_error_and_the_example_stays_untouched() -> None:
    with pytest.raises(KeyError, match="no such key"):
        example("balancer", {"labels.no_such_key": DELETE})
    with pytest.raises(KeyError, match="no mapping"):
        example("balancer", {"labels.range.first": 1})
    with pytest.raises(ValueError, match="no example"):
        example("fabric")
    data = example_data("balancer")
    data["labels"]["range"] = [1, 2]
    assert example_data("balancer")["labels"]["range"] == [1000, 99999]
