"""netns tests run inside `mplsorch lab run` (which boots a VM when this kernel has no MPLS
routing). Outside a lab they fail at once with the reason: they are never skipped silently."""

from __future__ import annotations

import os
from typing import Iterator

import pytest

from orchestrator.lab.kit import Lab


def pytest_configure(config: pytest.Config) -> None:
    if not os.environ.get("MPLSORCH_LAB_JSON"):
        raise pytest.UsageError(
            "netns tests need the kernel lab: run them as "
            "`mplsorch lab run -- python -m pytest netns_tests` (MPLSORCH_LAB_JSON is not set)"
        )


@pytest.fixture(scope="session")
def lab() -> Iterator[Lab]:
    lab = Lab.from_env()
    yield lab
    lab.close()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The Ansible roll-out runs last: it takes back what the lab builder set up and lets the
    roles redo it (its teardown restores the builder's settings, but no other module should
    depend on that)."""
    items.sort(key=lambda item: item.module.__name__.endswith("test_ansible") if item.module else False)
