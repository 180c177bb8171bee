"""The `mplsorch` command as a typer application: every command, its help and its usage errors.
Built only when the quick path (`quick.py`) does not take the command line. Help and errors are
plain text (`rich_markup_mode=None`, typer's documented switch): rich, which typer would import
for them, is not one of our dependencies."""

from __future__ import annotations

import typer

from orchestrator.cli import daemon
from orchestrator.cli.config import config_app
from orchestrator.cli.lab import lab_app
from orchestrator.cli.operate import cluster_app, servers_app, sessions_app

app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    help="Linux kernel MPLS route orchestrator (session-label load balancing).",
)
app.add_typer(lab_app, name="lab")
app.add_typer(config_app, name="config")
daemon.register(app)
app.add_typer(sessions_app, name="sessions")
app.add_typer(servers_app, name="servers")
app.add_typer(cluster_app, name="cluster")
