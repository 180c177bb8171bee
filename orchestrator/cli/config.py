"""`mplsorch config ...`: check and print a configuration file of either role (balancer, server or client).
Reads the file only: no daemon, no kernel. Exit codes: 0 ok, 2 the file is missing, unreadable or
invalid (message on stderr)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from orchestrator.config import BalancerConfig, ServerConfig
    from orchestrator.config.client_model import ClientConfig

config_app = typer.Typer(
    no_args_is_help=True, help="Validate and show configuration files (balancer, server or client)."
)


def _load(file: str) -> BalancerConfig | ServerConfig | ClientConfig:
    from orchestrator.config import ConfigError, load_config

    try:
        return load_config(file)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def summary(cfg: BalancerConfig | ServerConfig | ClientConfig) -> str:
    """The part of `validate`'s line in parentheses: what the file configures, in a few numbers."""
    from orchestrator.config import ServerConfig
    from orchestrator.config.client_model import ClientConfig

    if isinstance(cfg, ClientConfig):
        return f"client, {_count(len(cfg.vips), 'VIP')}, {_count(len(cfg.s2c_labels()), 'S2C label')}"
    if isinstance(cfg, ServerConfig):
        return f"server, {_count(len(cfg.vips), 'VIP')}, {_count(len(cfg.c2s_labels()), 'C2S label')}"
    return f"{len(cfg.services)} services, {len(cfg.servers)} servers"  # unchanged since before servers


@config_app.command("validate")
def config_validate(file: str = typer.Argument(..., metavar="FILE", help="Configuration (YAML).")) -> None:
    """Check FILE; print "FILE: ok (N services, M servers)" for a balancer, "FILE: ok (server, N VIPs,
    M C2S labels)" for a server. Exit 2 with "FILE:LINE: KEY.PATH: message" on stderr when it is
    invalid, missing or unreadable."""
    cfg = _load(file)
    typer.echo(f"{file}: ok ({summary(cfg)})")


@config_app.command("show")
def config_show(
    file: str = typer.Argument(..., metavar="FILE", help="Configuration (YAML)."),
    json_output: bool = typer.Option(False, "--json", help="JSON instead of YAML."),
) -> None:
    """Print the effective configuration of FILE, defaults filled in (durations in seconds).
    Exit 2 as `validate` does when FILE is unusable."""
    data = _load(file).to_dict()
    if json_output:
        # UTF-8 as it is: a YAML reader does not join JSON's surrogate-pair escapes of non-BMP text.
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        import yaml

        typer.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=None).rstrip("\n"))
