"""Health checkers on asyncio: TCP connect, HTTP GET, UDP request/response.

Each returns a CheckResult (ok, response_time_s, reason) and never raises for what a network can
do (refusal, reset, timeout, garbage): a check's job is to report it. The HTTP client is a few
lines of HTTP/1.0 on asyncio streams, because a status line is all a health check reads and no
HTTP library is worth a dependency for that. Response times are measured with a monotonic
clock: TCP until connected, HTTP until the status line, UDP until the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import re
import time
from collections.abc import Sequence

from orchestrator import __version__
from orchestrator.config.model import HealthCheck, HealthCheckType
from orchestrator.core.health import CheckResult

__all__ = ["check_tcp", "check_http", "check_udp", "run_check", "http_request"]

_STATUS_RE = re.compile(rb"^HTTP/\d\.\d (\d{3})(?:[ \r\n]|$)")
_CLOSE_GRACE = 0.5  # seconds to let a closed connection finish; not part of the response time


def _failed(exc: BaseException, timeout: float) -> CheckResult:
    if isinstance(exc, TimeoutError):
        return CheckResult(False, None, f"timeout after {timeout:g}s")
    if isinstance(exc, ConnectionRefusedError):
        return CheckResult(False, None, "connection refused")
    if isinstance(exc, ConnectionResetError):
        return CheckResult(False, None, "connection reset")
    if isinstance(exc, OSError):
        return CheckResult(False, None, f"error: {exc.strerror or exc}")
    return CheckResult(False, None, f"error: {exc}")


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(_CLOSE_GRACE):
            await writer.wait_closed()


async def check_tcp(host: str, port: int, timeout: float) -> CheckResult:
    """Healthy when a TCP connection is accepted within `timeout`."""
    start = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            _reader, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        return _failed(exc, timeout)
    elapsed = time.monotonic() - start
    await _close(writer)
    return CheckResult(True, elapsed, "connected")


def http_request(path: str, host_header: str) -> bytes:
    """The request a check sends: HTTP/1.0, so the server closes after one answer."""
    return (
        f"GET {path} HTTP/1.0\r\nHost: {host_header}\r\nUser-Agent: mplsorch-health/{__version__}\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("ascii")


def _default_host(host: str, port: int) -> str:
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    return host if port == 80 else f"{host}:{port}"


async def check_http(
    host: str,
    port: int,
    timeout: float,
    path: str = "/",
    expect_status: Sequence[int] = (200,),
    host_header: str | None = None,
) -> CheckResult:
    """Healthy when GET `path` answers within `timeout` with a status in `expect_status`. Only
    the status line is read; the Host header defaults to the address (and port unless 80)."""
    start = time.monotonic()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(http_request(path, host_header or _default_host(host, port)))
            await writer.drain()
            line = await reader.readline()
        elapsed = time.monotonic() - start
    except (OSError, TimeoutError, ValueError) as exc:  # ValueError: a status line over the limit
        if writer is not None:
            await _close(writer)
        return _failed(exc, timeout)
    await _close(writer)
    if not line:
        return CheckResult(False, None, "closed before answering")
    match = _STATUS_RE.match(line)
    if not match:
        return CheckResult(False, elapsed, "not an HTTP answer")
    status = int(match.group(1))
    if status not in expect_status:
        wanted = ", ".join(map(str, expect_status))
        return CheckResult(False, elapsed, f"status {status}, expected {wanted}")
    return CheckResult(True, elapsed, f"status {status}")


class _Answer(asyncio.DatagramProtocol):
    def __init__(self, future: asyncio.Future[bytes]) -> None:
        self.future = future

    def datagram_received(self, data: bytes, addr: object) -> None:
        if not self.future.done():
            self.future.set_result(data)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable on a connected socket
        if not self.future.done():
            self.future.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.future.done():
            self.future.set_exception(exc or ConnectionResetError("socket closed"))


async def check_udp(host: str, port: int, timeout: float, send: bytes, expect: bytes | None = None) -> CheckResult:
    """Healthy when `send` is answered within `timeout` by a datagram that contains `expect` (any
    datagram when `expect` is None). The first answer decides."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[bytes] = loop.create_future()
    start = time.monotonic()
    transport: asyncio.DatagramTransport | None = None
    try:
        async with asyncio.timeout(timeout):
            transport, _ = await loop.create_datagram_endpoint(lambda: _Answer(future), remote_addr=(host, port))
            transport.sendto(send)
            data = await future
        elapsed = time.monotonic() - start
    except ConnectionRefusedError:
        return CheckResult(False, None, "port unreachable")
    except (OSError, TimeoutError) as exc:
        return _failed(exc, timeout)
    finally:
        if transport is not None:
            transport.close()
        if not future.done():
            future.cancel()  # so that a late error or the close cannot leave an unretrieved exception
    if expect is not None and expect not in data:
        return CheckResult(False, elapsed, f"unexpected answer ({len(data)} bytes)")
    return CheckResult(True, elapsed, f"answer ({len(data)} bytes)")


async def run_check(check: HealthCheck, address: str) -> CheckResult:
    """One check of `address` as the pool's `health_check` describes it."""
    if check.type is HealthCheckType.TCP:
        return await check_tcp(address, check.port, check.timeout)
    if check.type is HealthCheckType.HTTP:
        return await check_http(address, check.port, check.timeout, check.path, check.expect_status, check.host)
    return await check_udp(address, check.port, check.timeout, check.send, check.expect)
