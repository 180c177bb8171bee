"""Bad input everywhere (issue 13, item 5): every start-up failure of either role is one stderr line
`mplsorch: ...` and a documented exit code, never a traceback; at run time a bad reload, a full
queue or lost conntrack events are a logged and counted event, and a bad reload keeps the running
configuration whole."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from orchestrator.capture import nftables
from orchestrator.capture.conntrack import ConntrackListener
from orchestrator.capture.nfqueue import NfQueue, QueuedPacket
from orchestrator.cli import daemon as cli_daemon
from orchestrator.cli.main import app
from orchestrator.config import load_server_config
from orchestrator.config.model import BalancerConfig
from orchestrator.config.server_model import ServerConfig
from orchestrator.core.events import FlowKey, FlowTableResync
from orchestrator.daemon.balancer import BalancerDaemon
from orchestrator.daemon.loop import Daemon
from orchestrator.daemon.server import ServerDaemon
from orchestrator.dataplane import ops
from orchestrator.dataplane.fake import FakeProvider
from tests.unit.conftest import (
    BALANCER_EXAMPLE,
    EXAMPLE,
    SERVER_EXAMPLE,
    ScriptedConntrack,
    ScriptedQueue,
    balancer_daemon,
    config,
    scripted_capture,
    server_daemon,
)
from tests.unit.conftest import syn as syn_bytes

NFT_ERROR = "/dev/stdin:12:3-9: Error: Could not process rule: No such file or directory"


# -- helpers ---------------------------------------------------------------------------------------------


def syn(n: int, src: str) -> QueuedPacket:
    return QueuedPacket(0, n, syn_bytes(src), 0, None, 0)


class ReadyBalancer(BalancerDaemon):
    """The balancer on a node the tests declare ready (the real check reads this host)."""

    def make_ready(self, config: Any) -> None:
        pass


class ReadyServer(ServerDaemon):
    def make_ready(self, config: Any) -> None:
        pass


def fake_nft(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, status: int = 1, stderr: str = NFT_ERROR) -> Path:
    """An `nft` first on PATH that reads its ruleset, says `stderr` and exits `status`; it keeps the
    last ruleset it was given, as the kernel would keep the table it loaded."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "nft"
    kept = tmp_path / "loaded.nft"
    script.write_text(
        "#!/bin/sh\n"
        f'cat > "{tmp_path}/offered.nft"\n'
        f'if [ {status} -eq 0 ]; then cp "{tmp_path}/offered.nft" "{kept}"; fi\n'
        f"printf '%s\\n   add rule inet mplsorch x\\n   ^^^^^\\n' '{stderr}' >&2\n"
        f"exit {status}\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return kept


def run_cli(monkeypatch: pytest.MonkeyPatch, make: Any, path: Path = BALANCER_EXAMPLE) -> Result:
    """`mplsorch run --config PATH` with the daemon `make(config)` builds over fakes instead of the
    kernel's provider and sockets; the loop is the real one."""

    def serve(config_path: str, cfg: BalancerConfig | ServerConfig, log_format: str) -> int:
        daemon: Daemon = make(cfg)
        return asyncio.run(daemon.run())

    monkeypatch.setattr(cli_daemon, "serve_on_kernel", serve)
    return CliRunner().invoke(app, ["run", "--config", str(path)])


def balancer_over(provider: FakeProvider) -> Any:
    def make(cfg: BalancerConfig) -> Daemon:
        return ReadyBalancer(str(BALANCER_EXAMPLE), provider, scripted_capture(ScriptedQueue()), cfg)

    return make


def kernel() -> FakeProvider:
    """The balancer's fake kernel as after setup: clsact on the fabric, the clients on-link."""
    k = FakeProvider(["lan0", "lan1", "fab0"])
    k.apply([ops.Add(ops.ClsactQdisc("fab0"))])
    k.add_ip_route("10.0.0.0/16", "lan0")
    return k


def one_line(result: Result, code: int, expected: str) -> None:
    """Exit `code`, stderr is exactly one `mplsorch:` line starting with `expected`, no traceback."""
    assert result.exit_code == code, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert "Traceback" not in result.output + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


class Failing(FakeProvider):
    """A kernel whose dump, or whose every apply, fails as a netlink socket does."""

    def __init__(self, devices: list[str], fail: str) -> None:
        super().__init__(devices)
        self.fail = fail

    def dump(self, elements: bool = True) -> Any:
        if self.fail == "dump":
            raise OSError(errno.ENOBUFS, "No buffer space available")
        return super().dump(elements)

    def apply(self, operations: Any) -> Any:
        if self.fail == "apply":
            raise OSError(errno.EBADF, "Bad file descriptor")
        return super().apply(operations)


# -- start-up --------------------------------------------------------------------------------------------


def test_a_ruleset_nft_refuses_at_start_is_one_line_and_exit_5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nft(tmp_path, monkeypatch)
    result = run_cli(monkeypatch, balancer_over(FakeProvider(["lan0", "lan1", "fab0"])))
    one_line(result, 5, f"mplsorch: cannot start: nftables ruleset: nft refused the ruleset: {NFT_ERROR}")


def test_a_server_ruleset_nft_refuses_at_start_is_one_line_and_exit_5(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nft(tmp_path, monkeypatch)

    def make(cfg: ServerConfig) -> Daemon:
        return ReadyServer(str(SERVER_EXAMPLE), FakeProvider(["eth0"]), scripted_capture(ScriptedQueue()), cfg)

    result = run_cli(monkeypatch, make, SERVER_EXAMPLE)
    one_line(result, 5, "mplsorch: cannot start: nftables ruleset: nft refused the ruleset: /dev/stdin:12")


def test_no_nft_at_all_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nft anywhere
    result = run_cli(monkeypatch, balancer_over(FakeProvider(["lan0", "lan1", "fab0"])))
    one_line(result, 5, "mplsorch: cannot start: nftables ruleset: cannot run nft: No such file or directory")


@pytest.mark.parametrize(
    ("fail", "expected"),
    [
        ("dump", "mplsorch: cannot start: restore from the kernel: [Errno 105] No buffer space available"),
        ("apply", "mplsorch: cannot start: node objects: [Errno 9] Bad file descriptor"),
    ],
)
def test_a_netlink_error_at_start_names_its_step(monkeypatch: pytest.MonkeyPatch, fail: str, expected: str) -> None:
    result = run_cli(monkeypatch, balancer_over(Failing(["lan0", "lan1", "fab0"], fail)))
    one_line(result, 5, expected)


def test_a_missing_fabric_interface_is_one_line_with_the_kernels_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    result = run_cli(monkeypatch, balancer_over(FakeProvider(["lan0", "lan1"])))  # no fab0
    one_line(result, 5, "mplsorch: cannot start: node objects: add qdisc clsact dev fab0: no such device fab0")


def test_a_queue_that_cannot_be_bound_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nft(tmp_path, monkeypatch, status=0, stderr="")

    def make(cfg: BalancerConfig) -> Daemon:
        def busy(first: int, last: int) -> ScriptedQueue:
            raise OSError(errno.EBUSY, "Device or resource busy")

        capture = scripted_capture(ScriptedQueue())
        return ReadyBalancer(
            str(BALANCER_EXAMPLE), FakeProvider(["lan0", "lan1", "fab0"]), type(capture)(busy, capture.conntrack), cfg
        )

    result = run_cli(monkeypatch, make)
    one_line(result, 5, "mplsorch: cannot start: nfqueue 0-1: [Errno 16] Device or resource busy")


def test_not_root_is_exit_3_and_a_bug_is_still_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    class Denied(FakeProvider):
        def dump(self, elements: bool = True) -> Any:
            raise PermissionError(errno.EPERM, "Operation not permitted")

    result = run_cli(monkeypatch, balancer_over(Denied(["lan0", "lan1", "fab0"])))
    one_line(result, 3, "mplsorch: not permitted (run as root with CAP_NET_ADMIN)")

    class Buggy(FakeProvider):
        def dump(self, elements: bool = True) -> Any:
            raise KeyError("oops")

    result = run_cli(monkeypatch, balancer_over(Buggy(["lan0", "lan1", "fab0"])))
    one_line(result, 1, "mplsorch: unexpected error: KeyError: 'oops'")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, "cannot read the configuration"),  # a directory where the file should be
        ("role: balancer\nnode: [1, 2\n", "not valid YAML"),
        (EXAMPLE.replace("fabric_next_hop: 10.255.0.2", "fabric_next_hop: nowhere"), "interfaces.fabric_next_hop"),
    ],
)
def test_an_unreadable_or_invalid_configuration_at_start_is_one_line_and_exit_2(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str | None, expected: str
) -> None:
    path = tmp_path / "lb.yaml"
    if text is None:
        path.mkdir()
    else:
        path.write_text(text)
    result = run_cli(monkeypatch, balancer_over(FakeProvider(["fab0"])), path)
    one_line(result, 2, f"mplsorch: {path}")
    assert expected in result.stderr


# -- reload ----------------------------------------------------------------------------------------------


def reloading_balancer(path: Path) -> BalancerDaemon:
    d = balancer_daemon(config(), kernel(), daemon_class=ReadyBalancer)
    d.config_path = str(path)
    return d


@pytest.mark.parametrize("bad", ["unreadable", "invalid", "refused"])
def test_a_bad_reload_keeps_the_running_configuration_and_is_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, bad: str
) -> None:
    path = tmp_path / "lb.yaml"
    d = reloading_balancer(path)
    d.decide([syn(1, "10.0.1.10")])
    running = d.config
    if bad == "unreadable":
        path.mkdir()
    elif bad == "invalid":
        path.write_text(EXAMPLE.replace("hold_down: 2s", "hold_down: soon"))
    else:
        path.write_text(EXAMPLE.replace("hold_down: 2s", "hold_down: 5s"))
        fake_nft(tmp_path, monkeypatch)
    d.flag("reload")
    d.do_reload()
    assert d.config is running and d.core.config is running and len(d.core.table) == 1
    assert d.core.counters["reloads_rejected"] == 1
    [line] = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert line.getMessage().startswith("reload rejected, keeping the running configuration: ")
    assert line.exc_info is None


def test_a_reload_that_raises_anything_else_is_logged_counted_and_the_daemon_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    d = balancer_daemon(config(), kernel())

    def broken() -> None:
        raise KeyError("bug")

    d.reload = broken  # type: ignore[method-assign]
    d.do_reload()
    assert d.core.counters["reloads_rejected"] == 1
    assert caplog.messages == ["reload failed, keeping the running configuration: KeyError: 'bug'"]


def test_a_server_reload_nft_refuses_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    kernel = FakeProvider(["eth0"])
    d = server_daemon(load_server_config(SERVER_EXAMPLE), kernel, ScriptedQueue())
    d.__class__ = ReadyServer
    d.install_node_objects()
    before = {i.obj for i in kernel.dump()}
    running = d.config
    path = tmp_path / "s1.yaml"
    # A new VIP: were it applied, its rule would be in the kernel and the core would serve it.
    text = SERVER_EXAMPLE.read_text()
    assert "10.0.0.100:" in text
    path.write_text(text.replace("10.0.0.100:", "10.0.0.101:"))
    d.config_path = str(path)
    fake_nft(tmp_path, monkeypatch)
    d.do_reload()
    assert d.config is running and {i.obj for i in kernel.dump()} == before
    assert d.core.counters["reloads_rejected"] == 1
    assert any(m.startswith("reload rejected, keeping the running configuration: nft refused") for m in caplog.messages)


# -- run time: the queue and conntrack -------------------------------------------------------------------


def test_a_full_queue_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    queue = ScriptedQueue()
    d = balancer_daemon(config(), kernel(), queue)
    queue.overruns = 2
    queue.script(syn(1, "10.0.1.10"))
    d.on_packets()
    d.on_packets()  # no new overrun: nothing more counted
    assert d.core.counters["queue_overruns"] == 2 and len(d.core.table) == 1
    assert [m for m in caplog.messages if "ENOBUFS" in m] == [
        "nfqueue: the daemon's socket buffer was full (ENOBUFS): queued packets were lost"
    ]


def test_a_queue_read_error_is_logged_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(ScriptedQueue):
        def read_batch(self, limit: int) -> list[Any]:
            raise OSError(errno.EIO, "Input/output error")

    d = balancer_daemon(config(), kernel(), Broken())
    d.on_packets()
    assert d.core.counters["queue_errors"] == 1
    assert caplog.messages == ["nfqueue read failed: [Errno 5] Input/output error"]


class RaisingSocket:
    """recv_into raises the given errors in turn, then would block."""

    def __init__(self, *errors: OSError) -> None:
        self.errors = list(errors)

    def recv_into(self, buf: bytearray) -> int:
        if self.errors:
            raise self.errors.pop(0)
        raise BlockingIOError


def test_nfqueue_counts_enobufs_and_reads_on() -> None:
    queue = NfQueue.__new__(NfQueue)
    queue._sock = RaisingSocket(OSError(errno.ENOBUFS, "No buffer space available"))  # type: ignore[assignment]
    queue._buf = bytearray(64)
    queue.overruns = 0
    assert queue.read_batch(8) == [] and queue.overruns == 1


def test_conntrack_enobufs_resyncs_and_no_session_end_is_lost(caplog: pytest.LogCaptureFixture) -> None:
    listener = ConntrackListener.__new__(ConntrackListener)
    listener._sock = RaisingSocket(OSError(errno.ENOBUFS, "No buffer space available"))  # type: ignore[assignment]
    listener._buf = bytearray(64)
    listener.resyncs = 0
    listener.dump = lambda: frozenset()  # type: ignore[method-assign]
    events = listener.read()
    assert events == [FlowTableResync(frozenset())] and listener.resyncs == 1

    # The daemon hands the resync to the core: a session whose flows are all gone starts draining.
    conntrack = ScriptedConntrack()
    d = balancer_daemon(config(), kernel())
    d.conntrack = conntrack
    d.decide([syn(1, "10.0.1.10")])
    [session] = list(d.core.table)
    assert len(session.flows) >= 1
    conntrack.events = [FlowTableResync(frozenset())]
    d.sweep()
    assert not session.flows and d.core.counters["conntrack_resyncs"] == 1
    assert "conntrack: events lost (ENOBUFS); resynced from a dump of 0 live flows" in caplog.messages


def test_conntrack_enobufs_empties_the_queue_before_the_dump_that_resyncs() -> None:
    """After an overrun the kernel drops every later event for the socket without a word until
    a read empties its queue (NETLINK_S_CONGESTED): the listener reads out what is queued (older
    than the dump), then dumps; a further ENOBUFS while emptying is covered by that dump. The
    read before this change dumped with the queue still full."""
    from orchestrator.capture import conntrack as ct
    from orchestrator.dataplane.netlink.constants import IPCTNL_MSG_CT_DELETE

    flow = FlowKey(6, "10.0.1.10", "10.0.0.100", 40_000, 80)
    queued = [ct.event_message(IPCTNL_MSG_CT_DELETE, flow, ct.CT_TAG | 1)] * 3
    order: list[str] = []

    class Overrun:
        def __init__(self) -> None:
            self.script: list[bytes | OSError] = [OSError(errno.ENOBUFS, "overrun"), queued[0], queued[1]]
            self.script += [OSError(errno.ENOBUFS, "again"), queued[2]]

        def recv_into(self, buf: bytearray) -> int:
            if not self.script:
                order.append("empty")
                raise BlockingIOError
            item = self.script.pop(0)
            if isinstance(item, OSError):
                raise item
            order.append("queued")
            buf[: len(item)] = item
            return len(item)

    listener = ConntrackListener.__new__(ConntrackListener)
    listener._sock, listener._buf, listener.resyncs = Overrun(), bytearray(1 << 16), 0  # type: ignore[assignment]

    def dump() -> frozenset[FlowKey]:
        order.append("dump")
        return frozenset({flow})

    listener.dump = dump  # type: ignore[method-assign]
    events = listener.read()
    assert order == ["queued", "queued", "queued", "empty", "dump"]
    assert events == [FlowTableResync(frozenset({flow}))] and listener.resyncs == 1


def test_a_failed_conntrack_read_is_counted_and_a_sweep_follows_soon(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(ScriptedConntrack):
        def read(self) -> list[Any]:
            raise OSError(errno.ENOBUFS, "No buffer space available")

    d = balancer_daemon(config(), kernel())
    d.conntrack = Broken()
    d.next_sweep = 1e12
    d._on_conntrack()
    assert d.core.counters["conntrack_errors"] == 1 and d.next_sweep < 1e12
    assert caplog.messages == ["conntrack events failed: OSError: [Errno 105] No buffer space available"]


def test_nft_load_reports_the_first_line_of_nfts_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nft(tmp_path, monkeypatch)
    with pytest.raises(nftables.NftError) as raised:
        nftables.load("table inet mplsorch {}\n")
    assert str(raised.value) == f"nft refused the ruleset: {NFT_ERROR}"


def test_a_failing_tick_is_logged_counted_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    """A session's end whose deletes meet a broken netlink socket: the tick fails, the loop does not."""

    class Broken(FakeProvider):
        def apply(self, operations: Any) -> Any:
            raise OSError(errno.ENOBUFS, "No buffer space available")

    d = balancer_daemon(config(), Broken(["lan0", "fab0"]))
    ended = [ops.Delete(ops.MplsRoute(1002, "lan0", "10.0.1.10"))]
    d.core.expire = lambda now: (ended, [])  # type: ignore[method-assign]
    d.guarded_tick()
    d.guarded_tick()
    assert d.core.counters["tick_errors"] == 2
    assert caplog.messages.count("tick failed: OSError: [Errno 105] No buffer space available") == 2


def test_a_netlink_socket_that_cannot_open_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.dataplane.netlink import provider as netlink_provider

    def no_netlink(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.EPROTONOSUPPORT, "Protocol not supported")

    monkeypatch.setattr(netlink_provider, "NetlinkProvider", no_netlink)
    result = CliRunner().invoke(app, ["run", "--config", str(BALANCER_EXAMPLE)])
    one_line(result, 5, "mplsorch: cannot start: netlink socket: [Errno 93] Protocol not supported")


def test_a_control_request_that_fails_inside_the_daemon_is_an_error_answer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from orchestrator.control_socket import request
    from orchestrator.daemon.control import ControlServer

    async def broken(req: dict[str, Any]) -> dict[str, Any]:
        raise ZeroDivisionError("division by zero")

    async def scenario() -> dict[str, Any]:
        server = ControlServer(str(tmp_path / "s.sock"), broken)
        await server.start()
        try:
            return await asyncio.to_thread(request, str(tmp_path / "s.sock"), "status")
        finally:
            await server.stop()

    assert asyncio.run(scenario()) == {"error": "internal error: ZeroDivisionError: division by zero"}
    assert caplog.messages == ["control request failed: ZeroDivisionError: division by zero"]


def test_a_control_socket_that_cannot_be_made_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nft(tmp_path, monkeypatch, status=0, stderr="")
    (tmp_path / "file").write_text("")
    where = tmp_path / "file" / "mplsorch.sock"  # under a file: no directory can be made there

    def make(cfg: BalancerConfig) -> Daemon:
        d = ReadyBalancer(str(BALANCER_EXAMPLE), kernel(), scripted_capture(ScriptedQueue()), cfg)
        d.control_socket = str(where)
        return d

    result = run_cli(monkeypatch, make)
    one_line(result, 5, f"mplsorch: cannot start: control socket {where}: [Errno 17] File exists")
