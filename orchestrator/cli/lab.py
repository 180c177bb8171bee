"""`mplsorch lab ...`: the kernel lab (network namespaces, in a VM when the kernel lacks MPLS)."""

from __future__ import annotations

import typer

lab_app = typer.Typer(no_args_is_help=True, help="Build the netns lab and run commands, demos and benchmarks in it.")


# ---- lab run (owner: lab runner; self-contained) ----
from typing import List, Optional  # noqa: E402


@lab_app.command("run", context_settings={"allow_interspersed_args": False})
def lab_run(
    cmd: List[str] = typer.Argument(..., metavar="CMD...", help="Command to run while the lab is up."),
    topology: Optional[str] = typer.Option(None, "--topology", metavar="FILE",
                                           help="Topology YAML (default: the embedded default lab)."),
    json_output: bool = typer.Option(False, "--json", help="Print one JSON summary on stdout at the end "
                                                            "(CMD's stdout then goes to stderr)."),
) -> None:
    """Build the netns lab (in a VM when this kernel lacks MPLS), run CMD in it, tear it down.

    Exit status: CMD's; 2 bad topology; 3 the lab cannot be built; 130/143 interrupted."""
    from orchestrator.lab.runner import run_lab

    raise typer.Exit(run_lab(topology, json_output, list(cmd)))


# ---- lab demo / lab bench: run a module of orchestrator.lab inside the default lab ----
import sys  # noqa: E402

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: the project beside its reference, one run.")
lab_app.add_typer(bench_app, name="bench")


def _in_lab(module: str, args: list[str]) -> int:
    from orchestrator.lab.runner import run_lab

    return run_lab(None, False, [sys.executable, "-m", module, *args])


@lab_app.command("demo")
def lab_demo(json_output: bool = typer.Option(False, "--json", help="One JSON object on stdout.")) -> None:
    """The main job on the embedded default lab: sessions programmed over netlink, HTTP from every
    client through the VIP, label stacks seen on the fabric. Exit 1 if any session failed."""
    raise typer.Exit(_in_lab("orchestrator.lab.demo", ["--json"] if json_output else []))


@bench_app.command("program")
def bench_program(
    sessions: int = typer.Option(20000, "--sessions", min=1, help="Sessions to install and delete."),
    json_output: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Install and delete N sessions' objects through the provider, then through ip/tc -batch, in one
    kernel; print both rates and the ratios provider/iproute2 (install_ratio, delete_ratio)."""
    args = ["--sessions", str(sessions)] + (["--json"] if json_output else [])
    raise typer.Exit(_in_lab("orchestrator.lab.bench_program", args))


@bench_app.command("setup")
def bench_setup(
    sessions: int = typer.Option(2000, "--sessions", min=1, max=40000,
                                 help="First packets (new sessions) for the rate."),
    samples: int = typer.Option(100, "--samples", min=1, max=4000,
                                help="New/existing connect pairs for the latency."),
    json_output: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """New sessions per second turned into kernel state, and the added latency of a new session's
    first packet (p50, p99), for the balancer and for IPVS (tunnel mode) in one lab run; ratios
    balancer/IPVS (setup_ratio, latency_p50_ratio, latency_p99_ratio)."""
    args = ["--sessions", str(sessions), "--samples", str(samples)] + (["--json"] if json_output else [])
    raise typer.Exit(_in_lab("orchestrator.lab.bench_setup", args))
