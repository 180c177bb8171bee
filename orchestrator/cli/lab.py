"""`mplsorch lab ...`: the kernel lab (network namespaces, in a VM when the kernel lacks MPLS)."""

from __future__ import annotations

import typer

lab_app = typer.Typer(no_args_is_help=True, help="Build the netns lab and run commands, demos and benchmarks in it.")


# ---- lab run, status, pytest ----


def _backend_name(value: str | None) -> str | None:
    from orchestrator.lab.backend import BACKENDS

    if value is not None and value not in BACKENDS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(BACKENDS)}")
    return value


@lab_app.command("run", context_settings={"allow_interspersed_args": False})
def lab_run(
    cmd: list[str] = typer.Argument(..., metavar="CMD...", help="Command to run while the lab is up."),
    topology: str | None = typer.Option(
        None, "--topology", metavar="FILE", help="Topology YAML (default: the embedded default lab)."
    ),
    json_output: bool = typer.Option(
        False, "--json", help="Print one JSON summary on stdout at the end (CMD's stdout then goes to stderr)."
    ),
    backend: str | None = typer.Option(
        None,
        "--backend",
        metavar="host|uml|vm",
        callback=_backend_name,
        help="The lab's kernel (default: MPLSORCH_LAB_BACKEND, else the first "
        "available of host, uml, vm; see `lab status`).",
    ),
) -> None:
    """Build the netns lab (in a guest kernel when this one lacks MPLS), run CMD in it, tear it down.

    Exit status: CMD's; 2 bad topology; 3 the lab cannot be built; 130/143 interrupted."""
    from orchestrator.lab.runner import run_lab

    raise typer.Exit(run_lab(topology, json_output, list(cmd), backend))


@lab_app.command("status")
def lab_status(
    json_output: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
    backend: str | None = typer.Option(
        None,
        "--backend",
        metavar="host|uml|vm",
        callback=_backend_name,
        help="Judge this backend instead of choosing one.",
    ),
) -> None:
    """Which backend `lab run` would use and why, the kernels, and what each other backend lacks.

    Exit status: 0 a backend can run; 3 none can (or not the one asked for)."""
    import json

    from orchestrator.lab import backend as backends

    st = backends.status(backend or backends.requested())
    if json_output:
        print(json.dumps(st))
    else:
        print(f"backend: {st['backend'] or 'none'} ({st['reason']})")
        print(f"host kernel: {st['host_kernel']}")
        for name, b in st["backends"].items():
            print(f"  {name:<5} {'available' if b['available'] else 'missing  '}  {b['detail']}")
        k = st["uml_kernel"]
        print(
            f"UML kernel: {k['path'] + ' (' + k.get('release', '?') + ', ' + k.get('source_package', '?') + ' ' + k.get('source_version', '?') + ')' if k else 'not built'}"
            f"; cache {st['uml_cache']}, config fragment {st['uml_fragment_sha256']}"
        )
    raise typer.Exit(0 if st["backend"] else 3)


@lab_app.command("pytest", context_settings={"allow_interspersed_args": False})
def lab_pytest(
    paths: list[str] = typer.Argument(
        ..., metavar="PATH... [-- PYTEST_ARGS]", help="Test modules, or directories of test_*.py modules."
    ),
    jobs: int | None = typer.Option(
        None, "--jobs", "-j", min=1, help="Labs at once (default: one per core on uml, else 1)."
    ),
    backend: str | None = typer.Option(
        None, "--backend", metavar="host|uml|vm", callback=_backend_name, help="As for `lab run`."
    ),
) -> None:
    """Run each test module in a lab of its own, several labs at once, and print one combined
    pytest summary. Arguments after `--` go to every pytest.

    Exit status: 0 all passed; 1 a test failed or erred, a lab failed, or a module ran no test;
    2 no module found, or a PATH that is not there; 3 no backend can run; 130/143 interrupted."""
    from orchestrator.lab.parallel import run_parallel

    args = list(paths)
    extra = args[args.index("--") + 1 :] if "--" in args else []
    args = args[: args.index("--")] if "--" in args else args
    raise typer.Exit(run_parallel(args, jobs, backend, extra))


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


@lab_app.command("fuzz")
def lab_fuzz(
    packets: int = typer.Option(100_000, "--packets", min=1, help="Mutated first packets to send."),
    seed: int = typer.Option(1, "--seed", help="The corpus's seed: the same seed, the same packets."),
    distinct: int = typer.Option(
        50_000, "--distinct", min=1, help="Distinct mutants built before sending; the packets cycle through them."
    ),
    json_output: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Malformed and mutated first packets through the running balancer daemon while established
    sessions carry counted traffic; counts by reason, the daemon's pid and memory, what the
    established flows lost. Exit 1 if the daemon died, an established session lost anything or
    the counts do not add up."""
    args = ["--packets", str(packets), "--seed", str(seed), "--distinct", str(distinct)]
    raise typer.Exit(_in_lab("orchestrator.lab.fuzz", args + (["--json"] if json_output else [])))


@bench_app.command("program")
def bench_program(
    sessions: int = typer.Option(20000, "--sessions", min=1, help="Sessions to install and delete."),
    json_output: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """Install and delete N sessions' objects through the provider, then through ip/tc -batch, in one
    kernel; print both rates and the ratios provider/iproute2 (install_ratio, delete_ratio)."""
    args = ["--sessions", str(sessions)] + (["--json"] if json_output else [])
    raise typer.Exit(_in_lab("orchestrator.lab.bench.program", args))


@bench_app.command("setup")
def bench_setup(
    sessions: int = typer.Option(
        2000, "--sessions", min=1, max=40000, help="First packets (new sessions) for the rate."
    ),
    samples: int = typer.Option(
        100, "--samples", min=1, max=4000, help="New/existing connect pairs per system and repeat."
    ),
    repeats: int = typer.Option(1, "--repeats", min=1, max=4000, help="Latency runs (samples x repeats <= 4000)."),
    json_output: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """The kernel's limit (the daemon's per-session objects through tc/ip/nft batches), the daemon's
    new sessions/s, IPVS's new connections/s, new connections/s of existing sessions, connect
    p50/p99 (new, existing session) against IPVS beside it, interleaved, per repeat and pooled,
    in one lab run; ratios and goals (issue 15)."""
    args = ["--sessions", str(sessions), "--samples", str(samples), "--repeats", str(repeats)]
    args += ["--json"] if json_output else []
    raise typer.Exit(_in_lab("orchestrator.lab.bench.setup", args))


@bench_app.command("nexthops")
def bench_nexthops(
    sessions: list[int] = typer.Option(
        [10_000, 50_000], "--sessions", min=1, max=400_000, help="Return routes per run (repeat for several N)."
    ),
    repeats: int = typer.Option(2, "--repeats", min=1, max=10, help="Runs of each, plain and nexthop alternating."),
    json_output: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """A server's S2C return routes sharing one gateway, plain encap routes against routes to
    nexthop objects: `ip -batch` routes/s and the server agent's sessions/s each way, per N
    (the fastest of the repeats)."""
    args = ["--sessions", *(str(n) for n in sessions), "--repeats", str(repeats)]
    args += ["--json"] if json_output else []
    raise typer.Exit(_in_lab("orchestrator.lab.bench.nexthops", args))


@bench_app.command("scale")
def bench_scale(
    sessions: int = typer.Option(500_000, "--sessions", min=3, help="Concurrent sessions to hold (N)."),
    reference: int = typer.Option(10_000, "--reference", min=1, help="The smaller size the rate is compared at."),
    probe: int = typer.Option(2000, "--probe", min=1, max=20_000, help="New sessions per timed probe."),
    json_output: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """The daemon holding N sessions opened by first packets: memory per session, the programming
    rate at the reference size and at N, `status` and `sessions` pages answered at N."""
    args = ["--sessions", str(sessions), "--reference", str(reference), "--probe", str(probe)]
    raise typer.Exit(_in_lab("orchestrator.lab.bench.scale", args + (["--json"] if json_output else [])))


@bench_app.command("restart")
def bench_restart(
    sessions: int = typer.Option(
        100000, "--sessions", min=1, max=400000, help="Sessions in the kernel when the daemon restarts."
    ),
    json_output: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
    profile: bool = typer.Option(False, "--profile", help="A cProfile of the restore path on stderr."),
) -> None:
    """The balancer's restart with N sessions' objects in the kernel: the daemon's reconcile time
    (restore to ready), its start-to-ready time, and the datagrams a few live sessions' paced UDP
    streams lost across the SIGKILL, the install and the restart."""
    args = ["--sessions", str(sessions)] + (["--json"] if json_output else []) + (["--profile"] if profile else [])
    raise typer.Exit(_in_lab("orchestrator.lab.bench.restart", args))


@bench_app.command("cluster")
def bench_cluster(
    sessions: int = typer.Option(
        10_000, "--sessions", min=2, max=30_000, help="First packets (new sessions) per phase."
    ),
    json_output: bool = typer.Option(False, "--json", help="One JSON object on stdout."),
) -> None:
    """New sessions/s of one balancer, then of two in cluster mode with etcd (the first packets
    spread over both), the ratio; etcd's writes per session (its own counters); the failover gap
    in ms of a counted UDP stream when one balancer is killed. One lab run (issue 16)."""
    args = ["--sessions", str(sessions)] + (["--json"] if json_output else [])
    raise typer.Exit(_in_lab("orchestrator.lab.bench.cluster", args))


# ---- lab kernel: the UML backend's kernel ----
kernel_app = typer.Typer(no_args_is_help=True, help="The lab's User-Mode Linux kernel.")
lab_app.add_typer(kernel_app, name="kernel")


@kernel_app.command("build")
def kernel_build(
    force: bool = typer.Option(False, "--force", help="Build even when the cached kernel is current."),
    jobs: int | None = typer.Option(None, "--jobs", "-j", min=1, help="Parallel compile jobs (default: all cores)."),
) -> None:
    """Build the UML kernel from Debian's linux-source package and the repository's config fragment,
    unless the cache already holds one for this source version and fragment.

    Exit status: 0 built or already current; 3 it cannot be built (the message says why)."""
    from orchestrator.lab.guest import GuestUnavailable
    from orchestrator.lab.runner import EXIT_ENV, say
    from orchestrator.lab.uml import build_kernel

    try:
        kernel, built = build_kernel(say, jobs=jobs, force=force)
    except GuestUnavailable as e:
        say(f"cannot build the UML kernel: {e}")
        raise typer.Exit(EXIT_ENV) from None
    if not built:
        say(f"the UML kernel is current: {kernel.binary} ({kernel.release})")
