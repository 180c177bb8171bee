"""`mplsorch config ...`: check and print a balancer configuration file. Reads the file only: no
daemon, no kernel. Exit codes: 0 ok, 2 the file is missing, unreadable or invalid (message on stderr)."""

from __future__ import annotations

import json

import typer

config_app = typer.Typer(no_args_is_help=True, help="Validate and show balancer configuration files.")


def _load(file: str):
    from orchestrator.config import ConfigError, load_config

    try:
        return load_config(file)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2) from None


@config_app.command("validate")
def config_validate(file: str = typer.Argument(..., metavar="FILE", help="Balancer configuration (YAML).")) -> None:
    """Check FILE; print "FILE: ok (N services, M servers)". Exit 2 with "FILE:LINE: KEY.PATH: message"
    on stderr when it is invalid, missing or unreadable."""
    cfg = _load(file)
    typer.echo(f"{file}: ok ({len(cfg.services)} services, {len(cfg.servers)} servers)")


@config_app.command("show")
def config_show(
    file: str = typer.Argument(..., metavar="FILE", help="Balancer configuration (YAML)."),
    json_output: bool = typer.Option(False, "--json", help="JSON instead of YAML."),
) -> None:
    """Print the effective configuration of FILE, defaults filled in (durations in seconds).
    Exit 2 as `validate` does when FILE is unusable."""
    data = _load(file).to_dict()
    if json_output:
        typer.echo(json.dumps(data, indent=2))
    else:
        import yaml

        typer.echo(yaml.safe_dump(data, sort_keys=False, default_flow_style=None).rstrip("\n"))
