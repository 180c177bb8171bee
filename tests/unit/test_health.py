"""Health checks: the pure rise/fall machine, the scheduler hook, and the asyncio checkers against
real servers on 127.0.0.1 (every wait bounded)."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from orchestrator.config.model import HealthCheck, HealthCheckType
from orchestrator.core.schedulers import ResponseTime, ServerState
from orchestrator.health import (
    CheckResult,
    HealthEvent,
    HealthMachine,
    HealthRunner,
    HealthState,
    HealthTable,
    HealthView,
    Probe,
    Target,
    apply_health,
    check_http,
    check_tcp,
    check_udp,
    run_check,
)

OK = CheckResult(True, 0.010, "connected")
FAIL = CheckResult(False, None, "connection refused")


def run(coro: Awaitable[Any], limit: float = 10.0) -> Any:
    async def bounded() -> Any:
        async with asyncio.timeout(limit):
            return await coro

    return asyncio.run(bounded())


# ---- the state machine ----


def test_unknown_server_is_available_and_first_success_confirms_up() -> None:
    m = HealthMachine("web", "s1", rise=3, fall=2)
    assert m.health.state is HealthState.UNKNOWN and m.health.available
    ev = m.observe(OK, 5.0)
    assert ev == HealthEvent("web", "s1", HealthState.UNKNOWN, HealthState.UP, "connected", 0.010, 5.0)
    assert m.observe(OK, 6.0) is None  # no change, no event
    assert m.health.since == 5.0 and m.health.successes == 2


def test_fall_consecutive_failures_make_it_down_and_rise_successes_bring_it_back() -> None:
    m = HealthMachine("web", "s1", rise=2, fall=3)
    m.observe(OK, 0.0)
    assert m.observe(FAIL, 1.0) is None and m.observe(FAIL, 2.0) is None
    assert m.observe(OK, 3.0) is None  # a success in between resets the count
    assert m.observe(FAIL, 4.0) is None and m.observe(FAIL, 5.0) is None
    ev = m.observe(FAIL, 6.0)
    assert ev is not None and (ev.old, ev.new, ev.reason, ev.response_time, ev.at) == (
        HealthState.UP,
        HealthState.DOWN,
        "connection refused",
        None,
        6.0,
    )
    assert not m.health.available and m.health.failures == 3
    assert m.observe(OK, 7.0) is None and m.health.state is HealthState.DOWN
    assert m.observe(FAIL, 8.0) is None and m.observe(OK, 9.0) is None  # the failure reset the rise count
    ev = m.observe(CheckResult(True, 0.002, "status 200"), 10.0)
    assert ev is not None and (ev.old, ev.new, ev.reason) == (HealthState.DOWN, HealthState.UP, "status 200")
    assert ev.describe() == "server s1 (pool web) down -> up: status 200, 2.0 ms"


def test_never_answering_server_goes_down_from_unknown_after_fall() -> None:
    m = HealthMachine("web", "s1", rise=2, fall=2)
    assert m.observe(FAIL, 0.0) is None and m.health.state is HealthState.UNKNOWN
    ev = m.observe(FAIL, 1.0)
    assert ev is not None and (ev.old, ev.new) == (HealthState.UNKNOWN, HealthState.DOWN)


def test_events_are_frozen() -> None:
    ev = HealthMachine("p", "s", 1, 1).observe(OK, 0.0)
    assert ev is not None
    with pytest.raises(dataclasses.FrozenInstanceError):
        ev.new = HealthState.DOWN  # type: ignore[misc]


def test_response_time_is_smoothed_and_forgotten_when_down() -> None:
    m = HealthMachine("p", "s", rise=1, fall=1, smoothing=0.5)
    m.observe(CheckResult(True, 0.100, "ok"), 0.0)
    assert m.health.response_time == pytest.approx(0.100)
    m.observe(CheckResult(True, 0.200, "ok"), 1.0)
    assert m.health.response_time == pytest.approx(0.150)
    m.observe(CheckResult(True, None, "ok"), 2.0)  # a success without a time keeps the average
    assert m.health.response_time == pytest.approx(0.150)
    m.observe(FAIL, 3.0)
    assert m.health.state is HealthState.DOWN and m.health.response_time is None
    m.observe(CheckResult(True, 0.050, "ok"), 4.0)
    assert m.health.response_time == pytest.approx(0.050)  # judged by its new answers only


def test_bad_parameters() -> None:
    with pytest.raises(ValueError):
        HealthMachine("p", "s", rise=0, fall=1)
    with pytest.raises(ValueError):
        HealthMachine("p", "s", rise=1, fall=1, smoothing=0.0)


def test_table_configure_keeps_state_of_servers_that_stay() -> None:
    t = HealthTable()
    t.configure([Target("web", "s1", 1, 1), Target("web", "s2", 1, 1)])
    t.observe("web", "s1", FAIL, 1.0)
    assert t.get("web", "s1").state is HealthState.DOWN
    t.configure([Target("web", "s1", 2, 5)])  # reload: s2 leaves, s1 gets new rise/fall
    assert t.get("web", "s1").state is HealthState.DOWN and len(t) == 1
    assert t.observe("web", "s2", OK, 2.0) is None  # a late result of a removed server
    assert t.get("web", "s2").state is HealthState.UNKNOWN
    assert t.observe("web", "s1", OK, 3.0) is None  # rise is 2 now
    ev = t.observe("web", "s1", OK, 4.0)
    assert ev is not None and ev.new is HealthState.UP
    assert [h.server for h in t] == ["s1"]
    assert t.get("web", "s1").view()["health"] == "up"


# ---- the scheduler hook ----


def test_health_view_feeds_the_response_time_scheduler() -> None:
    t = HealthTable()
    t.configure([Target("web", n, 1, 1) for n in ("s1", "s2", "s3")])
    t.observe("web", "s1", CheckResult(True, 0.030, "ok"), 0.0)
    t.observe("web", "s2", CheckResult(True, 0.005, "ok"), 0.0)
    t.observe("web", "s3", FAIL, 0.0)
    view = HealthView.of(t)
    states = [ServerState("s1", sessions=1), ServerState("s2", sessions=9), ServerState("s3")]
    # Without health the response-time scheduler sees nothing measured and picks by sessions: s3.
    assert ResponseTime().pick("k", states) == "s3"
    fed = apply_health(states, "web", view)
    assert [(s.available, s.response_time) for s in fed] == [(True, 0.030), (True, 0.005), (False, None)]
    assert ResponseTime().pick("k", fed) == "s2"
    assert view.down("web") == frozenset({"s3"}) and view.down("other") == frozenset()
    # Another pool's view of the same server is independent; unknown servers stay available.
    assert apply_health(states, "dns", view) == states
    # The core's own unavailability (drain, max_sessions) is never overridden.
    drained = apply_health([ServerState("s2", available=False)], "web", view)
    assert drained[0].available is False and drained[0].response_time == 0.005


# ---- the checkers, against real servers ----


async def _tcp_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], host: str = "127.0.0.1"
) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, host, 0)
    return server, server.sockets[0].getsockname()[1]


def _closed_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_connect_ok_and_refused() -> None:
    async def main() -> tuple[CheckResult, CheckResult]:
        async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server, port = await _tcp_server(accept)
        async with server:
            ok = await check_tcp("127.0.0.1", port, 1.0)
        return ok, await check_tcp("127.0.0.1", _closed_port(), 1.0)

    ok, refused = run(main())
    assert ok.ok and ok.reason == "connected" and ok.response_time is not None and 0 <= ok.response_time < 1.0
    assert refused == CheckResult(False, None, "connection refused")


def _http_handler(answer: bytes, seen: list[bytes] | None = None, delay: float = 0.0):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            if seen is not None:
                seen.append(request)
            await asyncio.sleep(delay)
            writer.write(answer)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    return handle


def test_http_get_sends_path_and_host_and_checks_the_status() -> None:
    seen: list[bytes] = []

    async def main() -> list[CheckResult]:
        server, port = await _tcp_server(_http_handler(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", seen))
        async with server:
            return [
                await check_http("127.0.0.1", port, 1.0, "/healthz", (200,), "www.example.org"),
                await check_http("127.0.0.1", port, 1.0),
                await check_http("127.0.0.1", port, 1.0, "/", (204, 301)),
            ]

    named, default, wrong = run(main())
    assert named.ok and named.reason == "status 200" and named.response_time is not None
    first = seen[0].decode()
    assert first.startswith("GET /healthz HTTP/1.0\r\n") and "\r\nHost: www.example.org\r\n" in first
    port = int(seen[1].decode().split("Host: 127.0.0.1:")[1].split("\r\n")[0])
    assert default.ok and port > 0  # the default Host header: the address and port
    assert not wrong.ok and wrong.reason == "status 200, expected 204, 301" and wrong.response_time is not None


@pytest.mark.parametrize(
    "answer,reason",
    [
        (b"HTTP/1.0 503 Service Unavailable\r\n\r\n", "status 503, expected 200"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP answer"),
        (b"", "closed before answering"),
    ],
)
def test_http_failures(answer: bytes, reason: str) -> None:
    async def main() -> CheckResult:
        server, port = await _tcp_server(_http_handler(answer))
        async with server:
            return await check_http("127.0.0.1", port, 1.0)

    result = run(main())
    assert not result.ok and result.reason == reason


def test_http_timeout_when_the_server_does_not_answer() -> None:
    async def main() -> CheckResult:
        server, port = await _tcp_server(_http_handler(b"HTTP/1.0 200 OK\r\n\r\n", delay=5.0))
        async with server:
            return await check_http("127.0.0.1", port, 0.2)

    assert run(main()) == CheckResult(False, None, "timeout after 0.2s")


def test_http_refused() -> None:
    assert run(check_http("127.0.0.1", _closed_port(), 1.0)).reason == "connection refused"


class _Udp(asyncio.DatagramProtocol):
    """Answers every datagram with `prefix + datagram`, or never when `prefix` is None."""

    def __init__(self, prefix: bytes | None) -> None:
        self.prefix = prefix
        self.got: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.got.append(data)
        if self.prefix is not None:
            self.transport.sendto(self.prefix + data, addr)  # type: ignore[attr-defined]


async def _udp_server(prefix: bytes | None, host: str = "127.0.0.1") -> tuple[asyncio.DatagramTransport, _Udp, int]:
    transport, proto = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: _Udp(prefix), local_addr=(host, 0)
    )
    return transport, proto, transport.get_extra_info("sockname")[1]


def test_udp_request_response() -> None:
    async def main() -> tuple[list[CheckResult], list[bytes]]:
        transport, proto, port = await _udp_server(b"pong:")
        try:
            results = [
                await check_udp("127.0.0.1", port, 1.0, b"\x00ping\xff", b"pong:\x00ping"),
                await check_udp("127.0.0.1", port, 1.0, b"x", None),
                await check_udp("127.0.0.1", port, 1.0, b"x", b"nope"),
            ]
        finally:
            transport.close()
        return results, proto.got

    (match, any_answer, wrong), got = run(main())
    assert got == [b"\x00ping\xff", b"x", b"x"]
    assert match.ok and match.reason == "answer (11 bytes)" and match.response_time is not None
    assert any_answer.ok
    assert not wrong.ok and wrong.reason == "unexpected answer (6 bytes)"


def test_udp_timeout_and_port_unreachable() -> None:
    async def main() -> tuple[CheckResult, CheckResult]:
        transport, _, port = await _udp_server(None)
        try:
            silent = await check_udp("127.0.0.1", port, 0.2, b"ping")
        finally:
            transport.close()
        return silent, await check_udp("127.0.0.1", _closed_port(socket.SOCK_DGRAM), 1.0, b"ping")

    silent, unreachable = run(main())
    assert silent == CheckResult(False, None, "timeout after 0.2s")
    assert unreachable == CheckResult(False, None, "port unreachable")


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_checks_over_ipv6() -> None:
    seen: list[bytes] = []

    async def main() -> CheckResult:
        server, port = await _tcp_server(_http_handler(b"HTTP/1.0 200 OK\r\n\r\n", seen), "::1")
        async with server:
            return await check_http("::1", port, 1.0)

    assert run(main()).ok
    assert b"Host: [::1]:" in seen[0]


def test_run_check_follows_the_configuration() -> None:
    async def main() -> list[CheckResult]:
        server, tport = await _tcp_server(_http_handler(b"HTTP/1.0 404 Not Found\r\n\r\n"))
        transport, _, uport = await _udp_server(b"+")
        try:
            async with server:
                return [
                    await run_check(HealthCheck(HealthCheckType.TCP, tport, timeout=1.0), "127.0.0.1"),
                    await run_check(
                        HealthCheck(HealthCheckType.HTTP, tport, timeout=1.0, expect_status=(404,)), "127.0.0.1"
                    ),
                    await run_check(
                        HealthCheck(HealthCheckType.UDP, uport, timeout=1.0, send=b"q", expect=b"+q"), "127.0.0.1"
                    ),
                ]
        finally:
            transport.close()

    tcp, http, udp = run(main())
    assert (tcp.reason, http.reason, udp.reason) == ("connected", "status 404", "answer (2 bytes)")
    assert tcp.ok and http.ok and udp.ok


# ---- the runner ----


def test_runner_checks_every_interval_and_feeds_the_table() -> None:
    table = HealthTable()
    events: list[HealthEvent] = []

    def on_result(pool: str, server: str, result: CheckResult, now: float) -> None:
        ev = table.observe(pool, server, result, now)
        if ev is not None:
            events.append(ev)

    async def main() -> None:
        server, port = await _tcp_server(_http_handler(b"HTTP/1.0 200 OK\r\n\r\n"))
        check = HealthCheck(HealthCheckType.HTTP, port, interval=0.05, timeout=0.5, rise=1, fall=2)
        probe = Probe("web", "s1", "127.0.0.1", check)
        table.configure([Target("web", "s1", check.rise, check.fall)])
        runner = HealthRunner(on_result)
        runner.configure([probe])
        while not events:
            await asyncio.sleep(0.01)
        server.close()
        await server.wait_closed()
        while len(events) < 2:
            await asyncio.sleep(0.01)
        runner.configure([probe])  # unchanged: the task keeps running
        assert runner.probes == [probe]
        await runner.close()
        assert runner.probes == []

    run(main())
    assert [(e.old, e.new) for e in events] == [
        (HealthState.UNKNOWN, HealthState.UP),
        (HealthState.UP, HealthState.DOWN),
    ]
    assert events[1].reason == "connection refused"


def test_runner_survives_a_checker_bug_and_restarts_changed_probes() -> None:
    calls: list[tuple[str, int]] = []
    results: list[CheckResult] = []

    async def checker(check: HealthCheck, address: str) -> CheckResult:
        calls.append((address, check.port))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return OK

    async def main() -> None:
        runner = HealthRunner(lambda pool, server, result, now: results.append(result), checker=checker)
        check = HealthCheck(HealthCheckType.TCP, 80, interval=0.02, timeout=0.01)
        runner.configure([Probe("web", "s1", "192.0.2.1", check)])
        while len(results) < 2:
            await asyncio.sleep(0.01)
        runner.configure([Probe("web", "s1", "192.0.2.9", check)])  # a new address: restarted
        while ("192.0.2.9", 80) not in calls:
            await asyncio.sleep(0.01)
        runner.configure([])
        assert runner.probes == []
        await runner.close()

    run(main())
    assert results[0] == CheckResult(False, None, "check error: boom") and results[1] == OK
