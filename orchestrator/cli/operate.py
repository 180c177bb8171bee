"""`mplsorch sessions [flush]`, `mplsorch servers [drain|enable|weight]` and `mplsorch cluster
[ready|leave]`: the tables, and the operator's commands that change the running balancer without
a restart. An unknown name or a bad value changes nothing and exits 2, naming it."""

from __future__ import annotations

import json
from typing import Any

import typer

from orchestrator.cli.client import BAD_INPUT, ConfigOption, JsonOption, SocketOption, ask, print_table

sessions_app = typer.Typer(help="The session table; `flush` ends sessions.")
servers_app = typer.Typer(help="Servers: health, admin state, weight; drain, enable, weight.")
cluster_app = typer.Typer(help="This balancer as a member of a cluster (cluster:): ready, leave.")
LEAVE_TIMEOUT_S = 300.0  # a hand-over of 100,000 sessions is about 800 etcd transactions
NOT_READY = 1


def _print(answer: Any, json_output: bool, text: str) -> None:
    print(json.dumps(answer) if json_output else text)


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
    if ctx.invoked_subcommand is not None:
        return
    page = {k: v for k, v in (("limit", limit), ("offset", offset or None)) if v is not None}
    answer = ask("sessions", socket, config, **page)
    rows = answer["sessions"]
    if json_output:
        print(json.dumps(rows))
        return
    _table(answer, rows)
    if "total" in answer and (limit is not None or offset):
        print(f"sessions {offset + 1}-{offset + len(rows)} of {answer['total']}")


def _table(answer: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    if answer.get("role") == "server":
        print_table(
            "sessions",
            ["client", "VIP", "C2S", "S2C", "state", "flows"],
            [[s["client"], s["vip"], s["c2s_label"], s["s2c_label"], s["state"], s["flows"]] for s in rows],
        )
        return
    print_table(
        "sessions",
        ["id", "service", "client", "key", "server", "C2S", "S2C", "state", "flows"],
        [
            [
                s["id"],
                s["service"],
                s["client"],
                s["key"],
                s["server"],
                s["c2s_label"],
                s["s2c_label"],
                s["state"],
                s["flows"],
            ]
            for s in rows
        ],
    )


@sessions_app.command("flush")
def flush(
    server: str | None = typer.Option(None, "--server", metavar="NAME", help="Only sessions on it."),
    client: str | None = typer.Option(None, "--client", metavar="ADDRESS", help="Only sessions of it."),
    json_output: bool = JsonOption,
    socket: str | None = SocketOption,
    config: str | None = ConfigOption,
) -> None:
    """End sessions (all of them without --server or --client) and delete their kernel objects."""
    args: dict[str, Any] = {k: v for k, v in (("server", server), ("client", client)) if v is not None}
    answer = ask("flush", socket, config, **args)
    errors = f" ({answer['errors']} kernel operations failed, see the daemon's log)" if answer.get("errors") else ""
    _print(answer, json_output, f"flushed {answer['flushed']} sessions{errors}")
    if answer.get("errors"):
        raise typer.Exit(1)


@servers_app.callback(invoke_without_command=True)
def servers(
    ctx: typer.Context,
    json_output: bool = JsonOption,
    socket: str | None = SocketOption,
    config: str | None = ConfigOption,
) -> None:
    """Every server of every pool: health, admin state, weight, sessions, response time."""
    if ctx.invoked_subcommand is not None:
        return
    rows = ask("servers", socket, config)["servers"]
    if json_output:
        print(json.dumps(rows))
        return
    print_table(
        "servers",
        ["server", "pool", "address", "state", "admin", "weight", "sessions", "response ms", "reason"],
        [
            [
                r["name"],
                r["pool"],
                r["address"],
                r["state"] if r["checked"] else f"{r['state']} (no check)",
                r["admin"],
                r["weight"],
                r["sessions"],
                None if r["response_time"] is None else f"{r['response_time'] * 1000:.1f}",
                r["reason"],
            ]
            for r in rows
        ],
    )


@servers_app.command("drain")
def drain(
    name: str = typer.Argument(..., metavar="NAME"),
    json_output: bool = JsonOption,
    socket: str | None = SocketOption,
    config: str | None = ConfigOption,
) -> None:
    """No new sessions for NAME; its sessions stay until they end."""
    answer = ask("drain", socket, config, server=name)
    _print(
        answer,
        json_output,
        f"{answer['server']}: draining (was {answer['previous']}); "
        f"its {answer['sessions']} sessions stay until they end",
    )


@servers_app.command("enable")
def enable(
    name: str = typer.Argument(..., metavar="NAME"),
    json_output: bool = JsonOption,
    socket: str | None = SocketOption,
    config: str | None = ConfigOption,
) -> None:
    """NAME takes new sessions again."""
    answer = ask("enable", socket, config, server=name)
    _print(answer, json_output, f"{answer['server']}: enabled (was {answer['previous']})")


@servers_app.command("weight")
def weight(
    name: str = typer.Argument(..., metavar="NAME"),
    value: int = typer.Argument(..., metavar="W", help="0 or more; 0 takes no new sessions."),
    json_output: bool = JsonOption,
    socket: str | None = SocketOption,
    config: str | None = ConfigOption,
) -> None:
    """Set NAME's weight in every pool; maglev tables are rebuilt and the keys that moved reported."""
    answer = ask("weight", socket, config, server=name, weight=value)
    moved = ", ".join(f"{svc} {share:.1%}" for svc, share in answer["moved"].items()) or "no maglev service"
    _print(
        answer,
        json_output,
        f"{answer['server']}: weight {answer['weight']} (was {answer['previous']}); keys moved: {moved}",
    )


@cluster_app.command("ready")
def cluster_ready(
    json_output: bool = JsonOption,
    socket: str | None = SocketOption,
    config: str | None = ConfigOption,
) -> None:
    """Exit 0 while this balancer takes new sessions as a member (announce it), 1 once it leaves
    (withdraw it): the check of the ECMP route's or VIP's announcer (docs/scale.md)."""
    cluster = ask("status", socket, config).get("cluster")
    if cluster is None:
        typer.echo("mplsorch: this balancer is not a member of a cluster (no cluster: in its configuration)", err=True)
        raise typer.Exit(BAD_INPUT)
    answer = {"ready": cluster["ready"], "state": cluster["state"], "store": cluster["store"]}
    _print(answer, json_output, f"{cluster['name']}: {cluster['state']}{'' if cluster['ready'] else ' (not ready)'}")
    if not cluster["ready"]:
        raise typer.Exit(NOT_READY)


@cluster_app.command("leave")
def cluster_leave(
    json_output: bool = JsonOption,
    socket: str | None = SocketOption,
    config: str | None = ConfigOption,
) -> None:
    """Leave the cluster gracefully: no new sessions, every session handed to the members that
    stay, the label blocks given up, the lease revoked; then the daemon exits (0)."""
    answer = ask("leave", socket, config, timeout=LEAVE_TIMEOUT_S)
    to = ", ".join(f"{n} to {m}" for m, n in sorted(answer["to"].items())) or "none"
    blocks = ", ".join(map(str, answer["label_blocks"])) or "none"
    _print(
        answer,
        json_output,
        f"left the cluster: {answer['sessions']} sessions handed over ({to}); label blocks given up: {blocks}",
    )
