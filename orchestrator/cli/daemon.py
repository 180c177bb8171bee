"""`mplsorch run`, and `status`, `labels` and `routes` as typer commands (what they do is in
`asking.py`; the operator's commands that change the daemon are in `operate.py`)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import typer

from orchestrator.cli import asking
from orchestrator.cli.client import BAD_INPUT
from orchestrator.cli.options import ConfigOption, JsonOption, SocketOption

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
    asking.status(json_output, socket, config)


def labels(
    json_output: bool = JsonOption, socket: str | None = SocketOption, config: str | None = ConfigOption
) -> None:
    """Label pool use (balancer)."""
    asking.labels(json_output, socket, config)


def routes(
    json_output: bool = JsonOption, socket: str | None = SocketOption, config: str | None = ConfigOption
) -> None:
    """Our kernel objects, with their offload policy (filters) and what the kernel says of their
    offload state (filters and routes)."""
    asking.routes(json_output, socket, config)
