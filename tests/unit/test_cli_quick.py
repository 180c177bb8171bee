"""The asking commands' quick path (`orchestrator/cli/quick.py`, issue 15: `mplsorch status` and
a `sessions` page answer in under 1 s at 500,000 sessions in the lab's guest, where every import
costs): what `sessions` and `status` load, the quick path's options against typer's own command
tree, and the same output and exit code both ways for every command line the quick path takes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from orchestrator import control_socket
from orchestrator.capture.nfqueue import QueuedPacket
from orchestrator.cli import quick
from orchestrator.cli.client import json_list
from orchestrator.cli.main import app
from orchestrator.daemon.balancer import BalancerDaemon
from orchestrator.dataplane import ops
from orchestrator.dataplane.fake import FakeProvider
from tests.unit.conftest import balancer_daemon, config, syn

# What the asking commands do not need, each measured on their path before (python -X importtime
# in the lab's UML guest, 2026-11-30): typer (with its click, 0.14 s of imports in the guest) and
# what it brings (inspect, dataclasses' inspect, typing, shellingham, subprocess, uuid), rich
# (typer's help and errors), the configuration models and YAML (only `--config` needs them), the
# daemon's and the lab's modules, netlink (pyroute2, our dataplane), jinja2, asyncio.
NOT_LOADED = (
    "typer",
    "click",
    "rich",
    "typing",
    "inspect",
    "dataclasses",
    "subprocess",
    "uuid",
    "shellingham",
    "yaml",
    "jinja2",
    "pyroute2",
    "asyncio",
    "orchestrator.config",
    "orchestrator.config.model",
    "orchestrator.daemon",
    "orchestrator.lab",
    "orchestrator.dataplane",
    "orchestrator.cli.app",
    "orchestrator.cli.options",
    "orchestrator.cli.lab",
    "orchestrator.cli.config",
)

RUN_AND_LIST = """
import json, runpy, sys
sys.argv = ["mplsorch", *json.loads(sys.argv[1])]
code = 0
try:
    runpy.run_module("orchestrator", run_name="__main__")
except SystemExit as exc:
    code = exc.code
sys.stderr.write(json.dumps({"code": code, "modules": sorted(sys.modules)}) + "\\n")
"""


@contextlib.contextmanager
def answering(path: Path, answer: bytes) -> Iterator[Path]:
    """A control socket at `path` that answers every request with `answer`."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(4)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(5)


@pytest.fixture
def daemon_socket(tmp_path: Path) -> Iterator[Path]:
    """A control socket that answers every request with a one-row `sessions` page (the
    answer's shape is all the command reads)."""
    row = {"id": 1, "service": "http", "client": "10.0.1.10", "key": "10.0.1.10", "server": "s1"}
    row |= {"c2s_label": 1001, "s2c_label": 1002, "state": "serving", "flows": 1}
    answer = json.dumps({"role": "balancer", "sessions": [row], "offset": 0, "total": 1}).encode() + b"\n"
    with answering(tmp_path / "ctl.sock", answer) as path:
        yield path


def command(args: list[str]) -> tuple[int, list[str], str]:
    """`python -m orchestrator ARGS` in a fresh interpreter: exit code, the modules it loaded, stdout."""
    out = subprocess.run(
        [sys.executable, "-c", RUN_AND_LIST, json.dumps(args)], capture_output=True, text=True, timeout=60
    )
    report = json.loads(out.stderr.splitlines()[-1])
    return report["code"], report["modules"], out.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["sessions", "--limit", "1000", "--json"],
        ["sessions", "--offset", "5", "--limit", "1000"],
        ["status", "--json"],
    ],
)
def test_the_asking_commands_load_none_of_what_they_do_not_need(daemon_socket: Path, args: list[str]) -> None:
    code, modules, stdout = command([*args, "--socket", str(daemon_socket)])
    assert code == 0 and stdout  # it asked and printed
    assert "orchestrator.cli.quick" in modules and "json" in modules and "socket" in modules
    loaded = [m for m in NOT_LOADED if m in modules or any(n.startswith(m + ".") for n in modules)]
    assert loaded == []


def test_help_and_usage_errors_go_to_typer_and_load_no_rich(daemon_socket: Path) -> None:
    code, modules, stdout = command(["sessions", "--help"])
    assert code == 0 and "--limit N" in stdout and "typer" in modules
    code, modules, _ = command(["sessions", "--limit", "0", "--socket", str(daemon_socket)])
    assert code == 2 and "typer" in modules
    assert not [m for m in modules if m == "rich" or m.startswith("rich.")]


def click_command(words: tuple[str, ...]) -> Any:
    cmd: Any = typer.main.get_command(app)
    for word in words:
        cmd = cmd.commands[word]
    return cmd


@pytest.mark.parametrize("words", sorted(quick.COMMANDS), ids=" ".join)
def test_the_quick_path_reads_the_options_and_arguments_typer_declares(words: tuple[str, ...]) -> None:
    spec = quick.COMMANDS[words]
    params = click_command(words).params
    options = {opt: p for p in params if p.param_type_name == "option" for opt in p.opts}
    assert sorted(spec.options) == sorted(options)
    for name, (param, kind, default) in spec.options.items():
        p = options[name]
        assert (p.name, p.default, p.secondary_opts, p.multiple) == (param, default, [], False), name
        if kind == quick.FLAG:
            assert p.is_flag and p.type.name == "boolean", name
        elif kind == quick.TEXT:
            assert not p.is_flag and p.type.name == "str", name
        else:
            assert isinstance(kind, quick.Number) and p.type.name in ("int", "int range"), name
            assert kind.minimum >= (getattr(p.type, "min", None) or 0), name  # never takes what typer refuses
    arguments = [p for p in params if p.param_type_name == "argument"]
    assert [p.name for p in arguments] == [param for param, _ in spec.arguments]
    for p, (_, kind) in zip(arguments, spec.arguments):
        assert (p.type.name, p.nargs, p.required) == ("str" if kind == quick.TEXT else "int", 1, True)


def test_every_asking_command_is_on_the_quick_path() -> None:
    """Every command of typer's tree that takes --socket (asks the daemon) is in the quick path's table."""

    def asking(cmd: Any, words: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        if any("--socket" in p.opts for p in cmd.params):
            yield words
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from asking(sub, (*words, name))

    assert sorted(asking(typer.main.get_command(app), ())) == sorted(quick.COMMANDS)


def syn_packet(n: int, src: str) -> QueuedPacket:
    return QueuedPacket(0, n, syn(src), 0, None, 0)


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> BalancerDaemon:
    kernel = FakeProvider(["lan0", "fab0"])
    kernel.apply([ops.Add(ops.ClsactQdisc("fab0"))])
    kernel.add_ip_route("10.0.0.0/16", "lan0")
    d = balancer_daemon(config(), kernel)
    d.decide([syn_packet(i + 1, f"10.0.1.{10 + i}") for i in range(4)])
    monkeypatch.setattr("orchestrator.capture.nftables.read_counters", lambda: {"rate_limited": 4})
    answers: dict[str, dict[str, Any]] = {}

    def request(path: str, cmd: str, **args: Any) -> dict[str, Any]:
        """The daemon's answer to each distinct request, asked once: both ways see the same."""
        args.pop("timeout", None)
        key = json.dumps({"cmd": cmd, **args}, sort_keys=True)
        if key not in answers:
            answers[key] = asyncio.run(d.answer({"cmd": cmd, **args}))
        return answers[key]

    monkeypatch.setattr(control_socket, "request", request)
    return d


TAKEN = [
    ["status"],
    ["status", "--json"],
    ["labels"],
    ["labels", "--json", "--socket=/run/x.sock"],
    ["routes", "--json"],
    ["sessions"],
    ["sessions", "--json"],
    ["sessions", "--limit", "2"],
    ["sessions", "--limit=2", "--offset", "1", "--json"],
    ["sessions", "--offset", "3"],
    ["sessions", "--offset", "0", "--limit", "9"],
    ["servers"],
    ["servers", "--json", "--socket", ""],
    ["servers", "drain", "s1"],
    ["servers", "drain", "--json", "s9"],
    ["servers", "enable", "s1", "--json"],
    ["servers", "weight", "s3", "1"],
    ["servers", "weight", "s3", "0", "--json"],
    ["sessions", "flush", "--client", "somewhere"],
    ["sessions", "flush", "--server", "s1", "--json"],
    ["cluster", "ready"],
    ["cluster", "ready", "--json"],
]


@pytest.mark.parametrize("args", TAKEN, ids=" ".join)
def test_the_quick_path_prints_and_exits_as_typer_does(
    daemon: BalancerDaemon, args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    typed = CliRunner().invoke(app, args)
    assert typed.exception is None or isinstance(typed.exception, SystemExit), typed.exception
    code = 0
    try:
        assert quick.run(args) is True
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    assert (code, out.out, out.err) == (typed.exit_code, typed.stdout, typed.stderr)
    assert typed.stdout or typed.stderr


LEFT_TO_TYPER = [
    [],
    ["--help"],
    ["status", "--help"],
    ["sessions", "--help"],
    ["status", "--json", "--json"],
    ["status", "--json=1"],
    ["status", "--socket"],
    ["status", "--socket", "--json"],
    ["status", "-h"],
    ["status", "--bogus"],
    ["status", "extra"],
    ["status", "--", "--json"],
    ["sessions", "--limit", "0"],
    ["sessions", "--limit", "-1"],
    ["sessions", "--limit", "1_000"],
    ["sessions", "--limit", " 5"],
    ["sessions", "--offset", "x"],
    ["sessions", "--json", "flush"],
    ["sessions", "nothing"],
    ["servers", "drain"],
    ["servers", "drain", "a", "b"],
    ["servers", "weight", "s1", "-2"],
    ["servers", "weight", "s1", "two"],
    ["cluster"],
    ["run", "--config", "x.yaml"],
    ["config", "validate", "x.yaml"],
    ["lab", "status"],
]


@pytest.mark.parametrize("args", LEFT_TO_TYPER, ids=lambda a: " ".join(a) or "nothing")
def test_the_quick_path_leaves_everything_else_to_typer(args: list[str]) -> None:
    assert quick.parse(args) is None
    assert quick.run(args) is False


@pytest.mark.parametrize(
    "rows",
    [
        [],
        [{}],
        [{"id": 1, "client": "fd00:1::10", "created": 1796064778.027, "ends_at": None, "embryonic": True}],
        [{"name": "serveur \u00e9t\u00e9 \u2603 \U0001f600", "nested": {"a": [1, 2.5, None, 'x\n"y"']}}, [3, "t"]],
    ],
)
def test_a_page_is_printed_as_json_dumps_prints_it(rows: list[Any]) -> None:
    assert json_list(rows) == json.dumps(rows)


# Rows whose strings hold both marks `with_rows_text` looks for, quotes, escapes and non-ASCII text.
TRICKY_ROWS: list[Any] = [
    {"id": 1, "client": 'a"], "offset": 3, "x', "key": '"sessions": [', "created": 1796064778.027, "ends_at": None},
    {"id": 2, "name": "serveur \u00e9t\u00e9 \u2603 \U0001f600", "n": [1, 2.5, None, 'x\n"y"\\'], "f": 0.1 + 0.2},
]


@pytest.mark.parametrize("rows", [[], TRICKY_ROWS], ids=["empty", "tricky"])
@pytest.mark.parametrize("role", ["balancer", "server"])
def test_a_pages_rows_are_kept_as_the_daemon_encoded_them(rows: list[Any], role: str) -> None:
    answer = {"role": role, "sessions": rows, "offset": 7, "total": 9}
    kept = control_socket.with_rows_text(json.dumps(answer).encode() + b"\n")
    assert isinstance(kept["sessions"], control_socket.RowsText)
    assert kept["sessions"] == json_list(rows) and json.loads(kept["sessions"]) == rows
    assert kept == {**answer, "sessions": json_list(rows)}
    for other in ({"error": 'no "sessions": [ here], "offset": 1', "bad_input": True}, {"role": role, "x": 1}):
        assert control_socket.with_rows_text(json.dumps(other).encode()) == other  # parsed whole


def test_sessions_json_prints_the_daemons_rows_text_byte_for_byte(tmp_path: Path) -> None:
    """Through a real socket and a fresh interpreter: the page as `json_list` of the rows prints it
    (as the command printed it when it parsed the rows and encoded them again)."""
    answer = json.dumps({"role": "balancer", "sessions": TRICKY_ROWS, "offset": 0, "total": 2}).encode() + b"\n"
    with answering(tmp_path / "ctl.sock", answer) as path:
        code, modules, stdout = command(["sessions", "--json", "--limit", "2", "--socket", str(path)])
    assert code == 0 and stdout == json_list(TRICKY_ROWS) + "\n" and "orchestrator.cli.quick" in modules
    error = json.dumps({"error": 'offset beyond "sessions": [', "bad_input": True}).encode() + b"\n"
    with answering(tmp_path / "bad.sock", error) as path:
        out = subprocess.run(
            [sys.executable, "-m", "orchestrator", "sessions", "--json", "--socket", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert (out.returncode, out.stdout, out.stderr) == (2, "", 'mplsorch: offset beyond "sessions": [\n')
