"""`mplsorch run` and the commands that ask the running daemon over its control socket."""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from orchestrator.config.model import DEFAULT_CONTROL_SOCKET

SocketOption = typer.Option(None, "--socket", metavar="PATH", help="Control socket of the daemon.")
ConfigOption = typer.Option(None, "--config", metavar="FILE", help="Find the socket in this config.")
JsonOption = typer.Option(False, "--json", help="The documented JSON on stdout.")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("status")(status)
    app.command("sessions")(sessions)
    app.command("labels")(labels)
    app.command("routes")(routes)


NODE_NOT_READY = 4  # the server role's node check failed (node.setup: check, or apply could not fix it)


def run(config: str = typer.Option(..., "--config", metavar="FILE", help="Daemon configuration.")) -> None:
    """Run the daemon of the role the configuration names (balancer or server)."""
    from orchestrator.config.load import ConfigError, load_config
    from orchestrator.config.server import ServerConfig
    from orchestrator.daemon import balancer, server
    from orchestrator.daemon.node_setup import NodeNotReady

    try:
        loaded = load_config(config)
        code = server.run(config, loaded) if isinstance(loaded, ServerConfig) else balancer.run(config, loaded)
    except ConfigError as exc:
        typer.echo(f"mplsorch: {exc}", err=True)
        raise typer.Exit(2) from None
    except PermissionError as exc:
        typer.echo(f"mplsorch: not permitted (run as root with CAP_NET_ADMIN): {exc}", err=True)
        raise typer.Exit(3) from None
    except NodeNotReady as exc:
        for problem in exc.problems:
            typer.echo(f"mplsorch: node not ready: {problem}", err=True)
        raise typer.Exit(NODE_NOT_READY) from None
    raise typer.Exit(code)


def _ask(cmd: str, socket_path: Optional[str], config: Optional[str]) -> dict[str, Any]:
    from orchestrator.daemon.control import request

    path = socket_path
    if path is None and config is not None:
        from orchestrator.config.load import ConfigError, load_config

        try:
            path = load_config(config).node.control_socket
        except ConfigError as exc:
            typer.echo(f"mplsorch: {exc}", err=True)
            raise typer.Exit(2) from None
    path = path or DEFAULT_CONTROL_SOCKET
    try:
        answer = request(path, cmd)
    except (FileNotFoundError, ConnectionRefusedError):
        typer.echo(f"mplsorch: no daemon answers on {path} (is `mplsorch run` running?)", err=True)
        raise typer.Exit(3) from None
    except PermissionError:
        typer.echo(f"mplsorch: {path}: the control socket is for root only", err=True)
        raise typer.Exit(3) from None
    if "error" in answer:
        typer.echo(f"mplsorch: {answer['error']}", err=True)
        raise typer.Exit(1)
    return answer


def _table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*("" if v is None else str(v) for v in row))
    Console().print(table)


def status(json_output: bool = JsonOption, socket: Optional[str] = SocketOption,
           config: Optional[str] = ConfigOption) -> None:
    """The daemon's state on one screen."""
    answer = _ask("status", socket, config)
    if json_output:
        print(json.dumps(answer))
        return
    head = f"role {answer['role']}  pid {answer['pid']}  up {answer['uptime_s']} s  sessions {answer['sessions']}"
    if answer["role"] == "server":
        first, last = answer["block"]
        print(f"{head}  VIPs {', '.join(answer['vips'])}  labels {first}-{last}  queue {answer['queue']}")
    else:
        labels = answer["labels"]
        print(f"{head}  services {', '.join(answer['services'])}")
        print(f"labels: {labels['in_use']} in use, {labels['held_down']} held down, {labels['free']} free "
              f"of {labels['total']} pairs")
        _table("servers", ["server", "sessions"], [[k, v] for k, v in answer["servers"].items()])
    _table("counters", ["counter", "value"], sorted([k, v] for k, v in answer["counters"].items()))


def sessions(json_output: bool = JsonOption, socket: Optional[str] = SocketOption,
             config: Optional[str] = ConfigOption) -> None:
    """The session table."""
    answer = _ask("sessions", socket, config)
    rows = answer["sessions"]
    if json_output:
        print(json.dumps(rows))
        return
    if answer.get("role") == "server":
        _table("sessions", ["client", "VIP", "C2S", "S2C", "state", "flows"],
               [[s["client"], s["vip"], s["c2s_label"], s["s2c_label"], s["state"], s["flows"]] for s in rows])
        return
    _table("sessions", ["id", "service", "client", "key", "server", "C2S", "S2C", "state", "flows"],
           [[s["id"], s["service"], s["client"], s["key"], s["server"], s["c2s_label"], s["s2c_label"],
             s["state"], s["flows"]] for s in rows])


def labels(json_output: bool = JsonOption, socket: Optional[str] = SocketOption,
           config: Optional[str] = ConfigOption) -> None:
    """Label pool use (balancer)."""
    answer = _ask("labels", socket, config)["labels"]
    if json_output:
        print(json.dumps(answer))
        return
    _table("label pairs", ["total", "in use", "held down", "free"],
           [[answer["total"], answer["in_use"], answer["held_down"], answer["free"]]])


def routes(json_output: bool = JsonOption, socket: Optional[str] = SocketOption,
           config: Optional[str] = ConfigOption) -> None:
    """Our kernel objects, with what the kernel says of their offload state."""
    rows = _ask("routes", socket, config)["routes"]
    if json_output:
        print(json.dumps(rows))
        return
    _table("kernel objects", ["object", "offload"], [[r["object"], r["offload"]] for r in rows])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
