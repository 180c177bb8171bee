"""What the daemons of every role share: one asyncio loop that reads the queue and conntrack
sockets, serves the control socket and acts on flags that signals set (signals only set flags,
as ExaBGP does), and the program step that applies a core's operations and logs failures."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any, Protocol

from orchestrator.capture.conntrack import ConntrackListener
from orchestrator.capture.nfqueue import NfQueue
from orchestrator.core.events import FlowsEnded, FlowTableResync
from orchestrator.daemon.control import ControlServer
from orchestrator.dataplane import ops
from orchestrator.dataplane.netlink.provider import NetlinkProvider

log = logging.getLogger("mplsorch")
TICK = 0.25


class FlowCore(Protocol):
    counters: Any

    def on_flow_events(self, events: list[FlowsEnded | FlowTableResync], now: float) -> None: ...


class Daemon:
    """A role's daemon: subclasses give setup, the packet handler, reload, tick, shutdown and the
    control requests; this class runs them in order and owns the sockets' lifetime."""

    core: FlowCore
    control_socket: str

    def __init__(self, config_path: str) -> None:
        self.config_path = config_path
        self.provider = NetlinkProvider()
        self.queue: NfQueue | None = None
        self.conntrack: ConntrackListener | None = None
        self.flags: set[str] = set()
        self.wake = asyncio.Event()
        self.started = time.time()
        self.op_results: dict[str, int] = {"ok": 0, "error": 0}

    def program(self, operations: list[ops.Operation], why: str) -> list[ops.OpResult]:
        if not operations:
            return []
        results = self.provider.apply(operations)
        for r in results:
            self.op_results["ok" if r.ok else "error"] += 1
            if not r.ok:
                log.error("%s: %s", why, r)
        return results

    # -- hooks ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        raise NotImplementedError

    def on_packets(self) -> None:
        raise NotImplementedError

    def reload(self) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError

    def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def running_message(self) -> str:
        return "running"

    # -- the loop -----------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.setup()
        assert self.queue is not None and self.conntrack is not None
        for sig, flag in ((signal.SIGHUP, "reload"), (signal.SIGTERM, "stop"), (signal.SIGINT, "stop")):
            loop.add_signal_handler(sig, self._flag, flag)
        loop.add_reader(self.queue.fileno(), self.on_packets)
        loop.add_reader(self.conntrack.fileno(), self._on_conntrack)
        control = ControlServer(self.control_socket, self.handle_request)
        await control.start()
        log.info("%s", self.running_message())
        try:
            while "stop" not in self.flags:
                try:
                    await asyncio.wait_for(self.wake.wait(), TICK)
                except asyncio.TimeoutError:
                    pass
                self.wake.clear()
                if "reload" in self.flags:
                    self.flags.discard("reload")
                    self.reload()
                self.tick()
        finally:
            loop.remove_reader(self.queue.fileno())
            loop.remove_reader(self.conntrack.fileno())
            await control.stop()
            self.shutdown()
        return 0

    def _flag(self, flag: str) -> None:
        self.flags.add(flag)
        self.wake.set()

    def _on_conntrack(self) -> None:
        assert self.conntrack is not None
        try:
            events = self.conntrack.read()
            if events:
                self.core.on_flow_events(events, time.monotonic())
        except Exception:
            log.exception("conntrack events failed")
            self.core.counters["conntrack_errors"] += 1
