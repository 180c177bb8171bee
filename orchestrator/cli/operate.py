"""`mplsorch sessions [flush]`, `mplsorch servers [drain|enable|weight]` and `mplsorch cluster
[ready|leave]` as typer commands: the tables, and the operator's commands that change the running
balancer without a restart (what each does is in `asking.py`). An unknown name or a bad value
changes nothing and exits 2, naming it."""

from __future__ import annotations

import typer

from orchestrator.cli import asking
from orchestrator.cli.options import ConfigOption, JsonOption, SocketOption

sessions_app = typer.Typer(help="The session table; `flush` ends sessions.")
servers_app = typer.Typer(help="Servers: health, admin state, weight; drain, enable, weight.")
cluster_app = typer.Typer(help="This balancer as a member of a cluster (cluster:): ready, leave.")


@sessions_app.callback(invoke_without_command=True)
def sessions(
    ctx: typer.Context,
    json_output: bool = JsonOption,
    socket: str | None = SocketOption,
    config: str | None = ConfigOption,
    limit: int | None = typer.Option(None, "--limit", min=1, metavar="N", help="At most N sessions (a page)."),
    offset: int = typer.Option(0, "--offset", min=0, metavar="N", help="Skip the first N sessions."),
) -> None:
    """The session table, or a page of it (--limit, --offset; in the table's order)."""
    if ctx.invoked_subcommand is None:
        asking.sessions(json_output, socket, config, limit, offset)


@sessions_app.command("flush")
def flush(
    server: str | None = typer.Option(None, "--server", metavar="NAME", help="Only sessions on it."),
    client: str | None = typer.Option(None, "--client", metavar="ADDRESS", help="Only sessions of it."),
    json_output: bool = JsonOption,
    socket: str | None = SocketOption,
    config: str | None = ConfigOption,
) -> None:
    """End sessions (all of them without --server or --client) and delete their kernel objects."""
    asking.flush(json_output, socket, config, server, client)


@servers_app.callback(invoke_without_command=True)
def servers(
    ctx: typer.Context,
    json_output: bool = JsonOption,
    socket: str | None = SocketOption,
    config: str | None = ConfigOption,
) -> None:
    """Every server of every pool: health, admin state, weight, sessions, response time."""
    if ctx.invoked_subcommand is None:
        asking.servers(json_output, socket, config)


@servers_app.command("drain")
def drain(
    name: str = typer.Argument(..., metavar="NAME"),
    json_output: bool = JsonOption,
    socket: str | None = SocketOption,
    config: str | None = ConfigOption,
) -> None:
    """No new sessions for NAME; its sessions stay until they end."""
    asking.drain(json_output, socket, config, name)


@servers_app.command("enable")
def enable(
    name: str = typer.Argument(..., metavar="NAME"),
    json_output: bool = JsonOption,
    socket: str | None = SocketOption,
    config: str | None = ConfigOption,
) -> None:
    """NAME takes new sessions again."""
    asking.enable(json_output, socket, config, name)


@servers_app.command("weight")
def weight(
    name: str = typer.Argument(..., metavar="NAME"),
    value: int = typer.Argument(..., metavar="W", help="0 or more; 0 takes no new sessions."),
    json_output: bool = JsonOption,
    socket: str | None = SocketOption,
    config: str | None = ConfigOption,
) -> None:
    """Set NAME's weight in every pool; maglev tables are rebuilt and the keys that moved reported."""
    asking.weight(json_output, socket, config, name, value)


@cluster_app.command("ready")
def cluster_ready(
    json_output: bool = JsonOption,
    socket: str | None = SocketOption,
    config: str | None = ConfigOption,
) -> None:
    """Exit 0 while this balancer takes new sessions as a member (announce it), 1 once it leaves
    (withdraw it): the check of the ECMP route's or VIP's announcer (docs/scale.md)."""
    asking.cluster_ready(json_output, socket, config)


@cluster_app.command("leave")
def cluster_leave(
    json_output: bool = JsonOption,
    socket: str | None = SocketOption,
    config: str | None = ConfigOption,
) -> None:
    """Leave the cluster gracefully: no new sessions, every session handed to the members that
    stay, the label blocks given up, the lease revoked; then the daemon exits (0)."""
    asking.cluster_leave(json_output, socket, config)
