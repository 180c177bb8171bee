"""`mplsorch run` and the commands that ask the running daemon over its control socket (the
operator's commands that change it are in `operate.py`).

Exit codes of the commands that ask: 0 answered; 1 the daemon answered an error; 2 bad input (an
unknown server name, a bad value: the daemon changed nothing); 3 no daemon answers."""

from __future__ import annotations

import functools
import json
import sys
from typing import TYPE_CHECKING, Any

import typer

from orchestrator.cli.client import BAD_INPUT, ConfigOption, JsonOption, SocketOption, ask, print_table

if TYPE_CHECKING:  # imported where used: `status` and the other commands that ask start faster
    from orchestrator.config.client_model import ClientConfig
    from orchestrator.config.model import BalancerConfig
    from orchestrator.config.server_model import ServerConfig


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("status")(status)
    app.command("labels")(labels)
    app.command("routes")(routes)


NODE_NOT_READY = 4  # the node check failed (node.setup: check, or apply could not fix it)
START_FAILED = 5  # the kernel refused a start-up step: the ruleset, a netlink request, a socket


def run(
    config: str = typer.Option(..., "--config", metavar="FILE", help="Daemon configuration."),
    log_format: str = typer.Option(
        "text", "--log-format", metavar="text|json", help="Log lines on stderr: text, or one JSON object per line."
    ),
    worker: int | None = typer.Option(None, "--worker", hidden=True, help="Run as worker I of nfqueue.workers."),
) -> None:
    """Run the daemon of the role the configuration names (balancer, server or client).

    Exit codes: 0 stopped (SIGTERM/SIGINT); 1 an unexpected error (one line); 2 the configuration is missing, unreadable or invalid, or a bad --log-format; 3 not permitted (root with CAP_NET_ADMIN); 4 the node is not ready (one line per problem and its fix); 5 the kernel refused a start-up step (one line naming it: netlink, node objects, restore, nftables ruleset, queue, control socket). Never a traceback.
    """
    from orchestrator.config.load import ConfigError, load_config
    from orchestrator.daemon.logs import FORMATS
    from orchestrator.daemon.loop import StartupError
    from orchestrator.daemon.node_setup import NodeNotReady

    if log_format not in FORMATS:
        typer.echo(f"mplsorch: --log-format {log_format!r}: one of {', '.join(FORMATS)}", err=True)
        raise typer.Exit(BAD_INPUT)
    try:
        loaded = load_config(config)
        if worker is None:
            code = serve_on_kernel(config, loaded, log_format)
        else:  # one of nfqueue.workers, started by the balancer's supervisor
            code = serve_on_kernel(config, loaded, log_format, worker)
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
    except StartupError as exc:
        typer.echo(f"mplsorch: cannot start: {exc}", err=True)
        raise typer.Exit(START_FAILED) from None
    except OSError as exc:  # a socket or netlink failure before the first step (e.g. opening netlink)
        typer.echo(f"mplsorch: cannot start: {exc}", err=True)
        raise typer.Exit(START_FAILED) from None
    except Exception as exc:  # a bug: still one line, never a traceback on the operator's screen
        typer.echo(f"mplsorch: unexpected error: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


def serve_on_kernel(
    config_path: str, config: BalancerConfig | ServerConfig | ClientConfig, log_format: str, worker: int | None = None
) -> int:
    """The daemon of the configuration's role over the kernel's dataplane and sockets: the one
    place that wires the real ones (the daemons take them as arguments). A balancer with
    `nfqueue.workers` > 1 runs as their supervisor (daemon.workers), which starts each worker as
    `mplsorch run --worker I`."""
    from orchestrator.capture.conntrack import ConntrackListener
    from orchestrator.capture.nfqueue import NfQueue
    from orchestrator.config.client_model import ClientConfig
    from orchestrator.config.server_model import ServerConfig
    from orchestrator.daemon.balancer import BalancerDaemon
    from orchestrator.daemon.client import ClientDaemon
    from orchestrator.daemon.loop import Capture, Daemon, serve, start_step
    from orchestrator.daemon.server import ServerDaemon
    from orchestrator.dataplane.netlink.provider import NetlinkProvider

    daemon: Daemon
    with start_step("netlink socket"):
        provider = NetlinkProvider()
    if isinstance(config, ServerConfig):
        daemon = ServerDaemon(config_path, provider, Capture(NfQueue, ConntrackListener), config)
    elif isinstance(config, ClientConfig):
        daemon = ClientDaemon(config_path, provider, Capture(NfQueue, ConntrackListener), config)
    elif config.nfqueue.workers > 1 and worker is None:
        from orchestrator.daemon import workers

        return workers.serve(config_path, config, provider, log_format)
    else:
        from orchestrator.core.shards import Shard

        # The balancer also hears its tagged flows start: those its fast path admitted count too.
        kernel = Capture(NfQueue, functools.partial(ConntrackListener, new_events=True))
        shard = Shard(worker, config.nfqueue.workers) if worker is not None else None
        if shard is not None:
            stop_with_parent()
        daemon = BalancerDaemon(config_path, provider, kernel, config, shard=shard)
    return serve(daemon, log_format)


def stop_with_parent() -> None:
    """A worker gets SIGTERM when its supervisor dies, however it dies (prctl PR_SET_PDEATHSIG),
    and so stops as on any SIGTERM: its sessions keep forwarding for the next supervisor."""
    import ctypes
    import os
    import signal

    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the call
        os.kill(os.getpid(), signal.SIGTERM)


def status(
    json_output: bool = JsonOption, socket: str | None = SocketOption, config: str | None = ConfigOption
) -> None:
    """The daemon's state on one screen."""
    answer = ask("status", socket, config)
    if json_output:
        print(json.dumps(answer))
        return
    for line in status_lines(answer):
        print(line)


def status_lines(answer: dict[str, Any]) -> list[str]:
    """`mplsorch status` without --json: role, services, servers, sessions, labels, queue drops and
    the counters that tell of trouble, each on a line."""
    head = f"{answer['role']}  pid {answer['pid']}  up {answer['uptime_s']} s"
    counters = answer.get("counters", {})
    if answer["role"] == "client":
        first, last = answer["range"]
        return [
            head,
            f"VIPs: {', '.join(answer['vips'])}",
            f"labels: {first}-{last}, balancer link {', '.join(answer['balancer_interfaces'])}, "
            f"queue {answer['queue']}",
            f"sessions: {answer['sessions']}",
            _offload_line(answer),
            _counter_line(counters),
        ]
    if answer["role"] == "server":
        first, last = answer["block"]
        return [
            head,
            f"VIPs: {', '.join(answer['vips'])}",
            f"labels: {first}-{last}, queue {answer['queue']}",
            f"sessions: {answer['sessions']}",
            _offload_line(answer),
            _counter_line(counters),
        ]
    labels, health, queue = answer["labels"], answer.get("health", {}), answer.get("queue", {})
    by_state = ", ".join(f"{n} {state}" for state, n in sorted(answer.get("sessions_by_state", {}).items()))
    draining = answer.get("draining") or []
    nft = answer.get("nft_counters", {})
    return [
        head,
        f"services: {', '.join(answer['services'])}",
        f"servers: {health.get('up', 0)} up, {health.get('down', 0)} down, {health.get('unknown', 0)} unknown"
        + (f"; draining: {', '.join(draining)}" if draining else ""),
        f"sessions: {answer['sessions']}"
        + (f" ({by_state})" if by_state else "")
        + "; per server: "
        + ", ".join(f"{k} {v}" for k, v in answer["servers"].items()),
        f"labels: {labels['in_use']} in use, {labels['held_down']} held down, {labels['free']} free "
        f"of {labels['total']} pairs",
        f"queue: {queue.get('waiting', 0)} waiting, {queue.get('queue_dropped', 0)} dropped (queue full), "
        f"{queue.get('user_dropped', 0)} dropped (daemon's buffer full), {nft.get('rate_limited', 0)} rate limited",
        f"dataplane: {answer['dataplane_ops'].get('ok', 0)} operations ok, "
        f"{answer['dataplane_ops'].get('error', 0)} failed",
        _offload_line(answer),
        _counter_line(counters),
    ]


def _offload_line(answer: dict[str, Any]) -> str:
    """Our filters and routes by what the kernel says of their offload (docs/offload.md)."""
    counts = answer.get("offload", {})
    line = "offload: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("in_hw", "not_in_hw", "trap", "offload_failed"))
    if "offload_age_s" not in answer:  # the agents dump on the request
        return line
    age = answer["offload_age_s"]
    return line + (" (no dump yet)" if age is None else f" (a dump {age} s old)")


def _counter_line(counters: dict[str, int]) -> str:
    keys = ("sessions_started", "sessions_ended", "sessions_reassigned", "packets_userspace")
    # A balancer's first packets the kernel's fast path could not take: worth seeing at a glance.
    trouble = sorted(
        (k, v)
        for k, v in counters.items()
        if k.split(":")[0]
        in (
            "refused",
            "malformed",
            "no_route",
            "batch_errors",
            "sessions_failed",
            "fastpath_unmatched",
            "fastpath_late",
            "offload_refused",
        )
    )
    shown = [*((k, counters.get(k, 0)) for k in keys), *trouble]
    if "flows_fast_path" in counters:
        shown.insert(len(keys), ("flows_fast_path", counters["flows_fast_path"]))
    return "counters: " + ", ".join(f"{k} {v}" for k, v in shown)


def labels(
    json_output: bool = JsonOption, socket: str | None = SocketOption, config: str | None = ConfigOption
) -> None:
    """Label pool use (balancer)."""
    answer = ask("labels", socket, config)["labels"]
    if json_output:
        print(json.dumps(answer))
        return
    print_table(
        "label pairs",
        ["total", "in use", "held down", "free"],
        [[answer["total"], answer["in_use"], answer["held_down"], answer["free"]]],
    )


def routes(
    json_output: bool = JsonOption, socket: str | None = SocketOption, config: str | None = ConfigOption
) -> None:
    """Our kernel objects, with their offload policy (filters) and what the kernel says of their
    offload state (filters and routes)."""
    rows = ask("routes", socket, config)["routes"]
    if json_output:
        print(json.dumps(rows))
        return
    print_table(
        "kernel objects", ["object", "policy", "offload"], [[r["object"], r.get("policy"), r["offload"]] for r in rows]
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(0)
