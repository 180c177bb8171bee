"""The `mplsorch` command line. Exit codes: 0 ok, 1 operation failed, 2 bad input or
configuration, 3 environment not usable (missing kernel features, not root)."""

from __future__ import annotations

import typer

from orchestrator.cli import daemon
from orchestrator.cli.config import config_app
from orchestrator.cli.lab import lab_app
from orchestrator.cli.operate import cluster_app, servers_app, sessions_app

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="Linux kernel MPLS route orchestrator (session-label load balancing).",
)
app.add_typer(lab_app, name="lab")
app.add_typer(config_app, name="config")
daemon.register(app)
app.add_typer(sessions_app, name="sessions")
app.add_typer(servers_app, name="servers")
app.add_typer(cluster_app, name="cluster")


def main() -> None:
    app()
