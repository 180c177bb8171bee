"""The `mplsorch` command line. Exit codes: 0 ok, 1 operation failed, 2 bad input or
configuration, 3 environment not usable (missing kernel features, not root).

A well-formed command line of a command that asks the running daemon (`status`, `sessions`, ...)
runs on the quick path, without importing typer (`quick.py`); anything else, help and usage
errors included, goes to the typer application (`app.py`), imported only then."""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing's own costs an import: not on the quick path
if TYPE_CHECKING:
    from typing import Any

    import typer

    app: typer.Typer


def main() -> None:
    from orchestrator.cli import quick

    if not quick.run(sys.argv[1:]):
        from orchestrator.cli.app import app

        app()


def __getattr__(name: str) -> Any:
    """`orchestrator.cli.main.app`, the typer application, imported on first use."""
    if name == "app":
        from orchestrator.cli.app import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
