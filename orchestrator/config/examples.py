"""Configurations made from the example files (templates/balancer.example.yaml and
templates/server.example.yaml) by changing keys, for the lab (the demo, the benchmarks, the netns
tests) and the unit tests: one place where an example is edited, as data, never as text.

    example("balancer", {"labels.range": [1001, 1999], "services.http.ports": [80, 8080],
                         "labels.hold_down": DELETE})

A key path is a dotted string (`"services.http.scheduler"`) or a tuple of keys, for keys that hold
dots themselves (`("vips", "10.0.0.100", "table")`). Setting a path creates the mappings it goes
through; `DELETE` removes the key. The result is YAML that `parse_config` reads; the example's
comments and line numbers are not kept (tests of error lines use literal text). Nothing here is
used by the daemons."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import yaml

__all__ = ["DELETE", "EXAMPLES", "KeyPath", "apply_changes", "example", "example_data", "example_path", "render"]

EXAMPLES = Path(__file__).resolve().parents[1] / "templates"
ROLES = ("balancer", "server", "client")

KeyPath = str | tuple[str, ...]


class _Delete:
    def __repr__(self) -> str:
        return "DELETE"


DELETE: Any = _Delete()
"""The value that removes its key path."""


def example_path(role: str) -> Path:
    if role not in ROLES:
        raise ValueError(f"no example configuration of role {role!r} (one of {', '.join(ROLES)})")
    return EXAMPLES / f"{role}.example.yaml"


@cache
def _loaded(role: str) -> dict[str, Any]:
    data = yaml.safe_load(example_path(role).read_text())
    assert isinstance(data, dict)
    return data


def example_data(role: str) -> dict[str, Any]:
    """The example of `role` as data (a fresh copy, free to change)."""
    return copy.deepcopy(_loaded(role))


def _keys(path: KeyPath) -> tuple[Any, ...]:
    keys = tuple(path.split(".")) if isinstance(path, str) else tuple(path)
    if not keys or any(k == "" for k in keys):
        raise ValueError(f"empty key in path {path!r}")
    return keys


def apply_changes(data: dict[str, Any], changes: Mapping[KeyPath, Any]) -> dict[str, Any]:
    """`data` with each key path set to its value (a deep copy), or removed when it is DELETE.
    Removing a path that is not there, or going through a value that is no mapping, is an error:
    a change that silently misses is a test that tests nothing."""
    data = copy.deepcopy(data)
    for path, value in changes.items():
        *parents, last = _keys(path)
        here: Any = data
        for i, key in enumerate(parents):
            if key not in here and value is not DELETE:
                here[key] = {}
            if not isinstance(here.get(key), dict):
                raise KeyError(
                    f"{'.'.join(map(str, (*parents[:i], key)))}: no mapping to change in (in change {path!r})"
                )
            here = here[key]
        if value is DELETE:
            if last not in here:
                raise KeyError(f"{path!r}: no such key to delete")
            del here[last]
        else:
            here[last] = copy.deepcopy(value)
    return data


def render(data: Mapping[str, Any]) -> str:
    """YAML of `data`, keys in their order, lists in flow style."""
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=None, width=1000)


def example(role: str, changes: Mapping[KeyPath, Any] | None = None) -> str:
    """The example of `role` with `changes` applied, as YAML text the loader accepts."""
    return render(apply_changes(_loaded(role), changes or {}))
