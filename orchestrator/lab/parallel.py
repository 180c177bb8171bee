"""`mplsorch lab pytest`: test modules spread over several labs at once, one combined summary.

Each module runs in a lab of its own (`lab run -- python -m pytest MODULE`): a fresh kernel and
topology per module, so no module depends on what another left behind, and on the uml backend as
many labs run side by side as the machine has cores (a UML kernel uses one CPU). The slowest
modules start first: the durations measured on this machine (kept in the lab cache), else those
kept beside the modules (`pytest-durations.json`, measured when they were written down), else the
file's size.
A module's output is printed in one piece when it ends. The run fails when any test fails or
errs, when a lab fails before its tests report (counted as an error), or when a module runs no
test; skipped tests are listed with their reasons.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from orchestrator.lab import backend, uml

DURATIONS_FILE = "pytest-durations.json"


@dataclass(frozen=True)
class ModuleResult:
    """One module's lab run: counts from its JUnit XML, or one error when the lab gave none."""

    module: str
    exit_code: int
    seconds: float
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: list[str] = field(default_factory=list)  # "nodeid: reason"
    problem: str | None = None  # why the module counts as an error

    @property
    def passed(self) -> int:
        return self.tests - self.failures - self.errors - len(self.skipped)

    @property
    def ok(self) -> bool:
        return self.problem is None and self.failures == 0 and self.errors == 0 and self.exit_code == 0


def collect(paths: list[str]) -> list[str]:
    """Test modules: PATHS that are files, and the test_*.py files of those that are directories."""
    out: list[str] = []
    for p in paths:
        path = Path(p)
        found = sorted(str(f) for f in path.glob("test_*.py")) if path.is_dir() else [str(path)]
        out += [f for f in found if f not in out]
    return out


def order(modules: list[str], durations: dict[str, float]) -> list[str]:
    """Slowest first, so that the last module to start is a short one; modules never timed go
    first (ordered by size), since they may be the slowest."""

    def key(m: str) -> tuple[int, float]:
        if m in durations:
            return (1, -durations[m])
        return (0, -float(Path(m).stat().st_size) if Path(m).exists() else 0.0)

    return sorted(modules, key=key)


def parse_junit(module: str, xml_path: Path, exit_code: int, seconds: float) -> ModuleResult:
    """The counts pytest wrote; a missing or unreadable file makes the module one error."""
    try:
        root = ET.parse(xml_path).getroot()
    except (OSError, ET.ParseError):
        return ModuleResult(
            module, exit_code, seconds, problem=f"the lab ended with exit status {exit_code} before pytest reported"
        )
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = failures = errors = 0
    skipped: list[str] = []
    for s in suites:
        tests += int(s.get("tests", 0))
        failures += int(s.get("failures", 0))
        errors += int(s.get("errors", 0))
        for case in s.iter("testcase"):
            for skip in case.iter("skipped"):
                skipped.append(f"{case.get('classname')}::{case.get('name')}: {skip.get('message', '')}")
    problem = None
    if tests == 0:
        problem = "no test ran"
    elif exit_code != 0 and failures == 0 and errors == 0:
        problem = f"pytest reported no failure but exited {exit_code}"
    return ModuleResult(module, exit_code, seconds, tests, failures, errors, skipped, problem)


def summary_line(results: list[ModuleResult], seconds: float) -> str:
    """pytest's closing line over all modules (errors include labs that never reported)."""
    passed = sum(r.passed for r in results)
    failed = sum(r.failures for r in results)
    errors = sum(r.errors + (1 if r.problem else 0) for r in results)
    skipped = sum(len(r.skipped) for r in results)
    parts = (
        [f"{passed} passed"]
        + ([f"{failed} failed"] if failed else [])
        + ([f"{skipped} skipped"] if skipped else [])
        + ([f"{errors} error{'s' if errors != 1 else ''}"] if errors else [])
    )
    return f"{'=' * 20} {', '.join(parts)} in {seconds:.2f}s {'=' * 20}"


class _Runner:
    """Worker threads, each running one module's lab at a time; SIGINT/SIGTERM only set a flag
    and pass SIGTERM on to the running labs (each tears its own guest down)."""

    def __init__(self, modules: list[str], jobs: int, backend_name: str, pytest_args: list[str], out_dir: Path) -> None:
        self.todo: queue.Queue[str] = queue.Queue()
        for m in modules:
            self.todo.put(m)
        self.jobs, self.backend_name, self.pytest_args, self.out_dir = jobs, backend_name, pytest_args, out_dir
        self.results: list[ModuleResult] = []
        self.procs: set[subprocess.Popen[bytes]] = set()
        self.lock = threading.Lock()
        self.stopping: int | None = None

    def _one(self, module: str) -> ModuleResult:
        stem = module.replace("/", "_")
        xml, log = self.out_dir / f"{stem}.xml", self.out_dir / f"{stem}.log"
        argv = [
            sys.executable,
            "-m",
            "orchestrator",
            "lab",
            "run",
            "--backend",
            self.backend_name,
            "--",
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"--junitxml={xml}",
            *self.pytest_args,
            module,
        ]
        t0 = time.monotonic()
        with open(log, "wb") as f:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT)
            with self.lock:
                self.procs.add(proc)
            code = proc.wait()
            with self.lock:
                self.procs.discard(proc)
        res = parse_junit(module, xml, code, time.monotonic() - t0)
        with self.lock:
            status = "ok" if res.ok else "FAILED"
            print(f"\n{'-' * 10} {module}: {status} in {res.seconds:.1f}s (lab exit {code}) {'-' * 10}", flush=True)
            sys.stdout.buffer.write(log.read_bytes())
            sys.stdout.flush()
        return res

    def _worker(self) -> None:
        while self.stopping is None:
            try:
                module = self.todo.get_nowait()
            except queue.Empty:
                return
            res = self._one(module)
            with self.lock:
                self.results.append(res)

    def _signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = signum
        with self.lock:
            for p in self.procs:
                p.send_signal(signal.SIGTERM)

    def run(self) -> None:
        old = {s: signal.signal(s, self._signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            workers = [threading.Thread(target=self._worker) for _ in range(self.jobs)]
            for w in workers:
                w.start()
            for w in workers:
                while w.is_alive():
                    w.join(timeout=0.5)
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def default_jobs(name: str) -> int:
    """uml: one lab per core; host: one (a host has one set of lab namespaces); vm: one (each VM
    wants two emulated CPUs)."""
    return max(1, os.cpu_count() or 1) if name == "uml" else 1


def _read_durations(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text())
        return {str(k): float(v) for k, v in data.items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return {}


def known_durations(modules: list[str], cache: Path) -> dict[str, float]:
    """Seconds per module: this machine's last measurements over those kept beside the modules."""
    out: dict[str, float] = {}
    for d in sorted({str(Path(m).parent) for m in modules}):
        out |= {str(Path(d) / k): v for k, v in _read_durations(Path(d) / DURATIONS_FILE).items()}
    return out | _read_durations(cache)


def run_parallel(paths: list[str], jobs: int | None, backend_name: str | None, pytest_args: list[str]) -> int:
    """Exit status: 0 every test passed; 1 a test failed or erred, a lab failed, or a module ran
    no test; 2 nothing to run (or a PATH that is not there); 3 no backend; 128+N interrupted by
    signal N."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:  # `-q` before `--` was once taken for a module: its lab ran every test of the tree
        print(
            f"mplsorch lab: no such test module or directory: {' '.join(missing)} (pytest's own arguments go after --)",
            file=sys.stderr,
        )
        return 2
    modules = collect(paths)
    if not modules:
        print(f"mplsorch lab: no test modules in {' '.join(paths)}", file=sys.stderr)
        return 2
    try:
        choice = backend.choose(backend_name or backend.requested())
    except backend.BackendError as e:
        print(f"mplsorch lab: cannot build the lab: {e}", file=sys.stderr)
        return 3
    n = min(jobs or default_jobs(choice.name), len(modules))
    if choice.name == "host" and n > 1:
        print("mplsorch lab: the host backend runs one lab at a time", file=sys.stderr)
        n = 1
    durations_path = uml.cache_dir() / DURATIONS_FILE
    ordered = order(modules, known_durations(modules, durations_path))
    print(f"mplsorch lab: {len(modules)} test modules on {n} {choice.name} lab(s): {choice.detail}", flush=True)
    t0 = time.monotonic()
    # the guests write JUnit files here: not under /tmp or /run, which a guest replaces
    with tempfile.TemporaryDirectory(prefix="mplsorch-pytest-", dir="/var/tmp") as tmp:
        runner = _Runner(ordered, n, choice.name, pytest_args, Path(tmp))
        runner.run()
    elapsed = time.monotonic() - t0
    results = sorted(runner.results, key=lambda r: r.module)
    print(f"\n{'module':<44} {'tests':>5} {'passed':>6} {'failed':>6} {'errors':>6} {'skipped':>7} {'seconds':>8}")
    for r in results:
        print(
            f"{r.module:<44} {r.tests:>5} {r.passed:>6} {r.failures:>6} {r.errors + bool(r.problem):>6} "
            f"{len(r.skipped):>7} {r.seconds:>8.1f}" + (f"  {r.problem}" if r.problem else "")
        )
    for r in results:
        for s in r.skipped:
            print(f"SKIPPED {s}")
    not_run = [m for m in modules if m not in {r.module for r in results}]
    for m in not_run:
        print(f"NOT RUN {m} (interrupted)")
    print(summary_line(results, elapsed), flush=True)
    measured = {r.module: round(r.seconds, 1) for r in results if r.ok}  # a failed module's time says little
    try:
        durations_path.parent.mkdir(parents=True, exist_ok=True)
        durations_path.write_text(json.dumps(_read_durations(durations_path) | measured, indent=1, sort_keys=True))
    except OSError:
        pass
    if runner.stopping is not None:
        return 128 + runner.stopping
    return 0 if all(r.ok for r in results) and not not_run else 1
