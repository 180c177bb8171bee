"""What the daemons of every role share: one asyncio loop that reads the queue and conntrack
sockets, serves the control socket and acts on flags that signals set (signals only set flags,
as ExaBGP does), the program step that applies a core's operations and logs failures, the
fail-safe around each batch of queued packets, the control requests every role answers
(`status`, `sessions`, `routes`), and the service manager's notifications (sd_notify: READY once
the control socket is up, WATCHDOG from the loop, RELOADING around a reload, STOPPING).

A daemon is given its dataplane provider and how to open its queue and conntrack sockets
(`Capture`): `mplsorch run` passes the kernel's, unit tests a fake provider and scripted ones."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Protocol

from orchestrator import systemd
from orchestrator.capture import nftables
from orchestrator.capture.nfqueue import NF_ACCEPT, NF_DROP, NF_REPEAT, QueuedPacket, Verdict, accept_all
from orchestrator.config.client_model import ClientConfig
from orchestrator.config.model import BalancerConfig, Setup
from orchestrator.config.server_model import ServerConfig
from orchestrator.core.events import Action, FlowKey, FlowsEnded, FlowsStarted, FlowTableResync, PacketVerdict
from orchestrator.core.servers import BadCommand
from orchestrator.daemon import logs, node_setup
from orchestrator.daemon.background import Background
from orchestrator.daemon.control import ControlServer
from orchestrator.daemon.logs import fields
from orchestrator.daemon.stalls import LoopStalls
from orchestrator.dataplane import offload, ops
from orchestrator.dataplane.provider import Provider
from orchestrator.metrics import (
    DurationHistogram,
    LatestSnapshot,
    MetricsEndpoint,
    MetricsSnapshot,
    make_registry,
    start_metrics_server,
)

log = logging.getLogger("mplsorch")
TICK = 0.25
SWEEP = 10.0  # seconds between conntrack sweeps: how late at most a flow's end is noticed
# Most sweeps only make the kernel end its expired entries (ConntrackListener.expire: a dump that
# reports no flow; their destroy events end the flows). The first time, and every FULL_SWEEP
# seconds while a live flow may end without a destroy event (`full_sweeps_needed`: entries made
# before the listener existed), a full sweep reads our live flows back and resyncs the core with
# them; a lost event is an ENOBUFS (a resync at once), a failed read a full sweep soon.
# At 40,000 flows a full sweep's decoding took the lab VM's one CPU for a few hundred ms; the
# balancer reads its dump on the loop a slice at a time (BalancerDaemon.sweep).
FULL_SWEEP = 60.0
# A sweep dumps every live flow of ours (500,000 at issue 15's scale: seconds of decoding on the
# loop): the next one waits at least this many times as long as the last took, so sweeps never
# take more than a tenth of the loop; the bound on a flow's end grows with the table instead.
SWEEP_SPACING = 10.0
RETRY_SWEEP = 1.0  # after a failed conntrack read: the sweep that recovers what it lost
# How long a thread that holds the GIL (a background dump's decoding: the conntrack sweep, the
# offload sampler, the metrics endpoint) keeps the loop's thread waiting for it, at most, each
# time the loop comes back from a system call (a first-packet batch makes several). Python's
# default is 5 ms; on the 2-core host, a batch of 8 system calls beside a CPU-bound thread took
# p99 100-145 ms at 5 ms, 20-38 ms at 1 ms and 0.4-26 ms at 0.5 ms (docs/lab.md).
SWITCH_INTERVAL = 0.0005
# After a batch's verdicts, the balancer leaves the CPU for at most this long (ms) before its
# bookkeeping of the batch, unless more first packets come (Daemon.step_aside). The verdicts
# release packets that wake processes on this host (in the lab's one-CPU guest the clients and
# servers themselves; the agents' verdicts end their batches, so they need no step aside). The kernel
# forwards those packets inside the verdict's system call, but the processes they wake got
# the CPU only once the daemon blocked again, and the scheduler preferred the daemon (it slept
# longer): half of the lab's new-session connects waited for the batch's bookkeeping and the
# loop's return, 0.8-0.9 ms after their SYN-ACK against 0.13-0.16 ms for the rest; 0.1 ms was
# too short for them (docs/lab.md, "The step aside").
STEP_ASIDE_MS = 1
# Conntrack events are read on the loop's tick (TICK), never when their socket turns readable:
# the new-flow event of a flow the kernel's fast path admits comes while that flow's first packet
# is on its way (an existing session's connect), and a daemon woken by it took the one CPU of a
# small machine from that connect (0.59-0.68 ms against 0.38-0.41 with the daemon stopped,
# IPVS's 0.37-0.40 either way; a read put off by 5 ms after the wake-up did no better: docs/lab.md).
# The socket's buffer (capture.conntrack, EVENTS_RCVBUF) holds many ticks of a flood's events.


class FlowCore(Protocol):
    """What the shared loop needs of either role's core."""

    counters: Any  # read for status

    def on_flow_events(self, events: list[FlowsStarted | FlowsEnded | FlowTableResync], now: float) -> None: ...

    def count(self, event: str, n: int = 1) -> None: ...


class PacketQueue(Protocol):
    """The NFQUEUE socket as the daemon uses it (capture.nfqueue.NfQueue)."""

    overruns: int  # times the kernel could not hand us packets (ENOBUFS: our socket buffer was full)

    def fileno(self) -> int: ...

    def read_batch(self, limit: int) -> list[QueuedPacket]: ...

    def send_verdicts(self, verdicts: Iterable[Verdict]) -> None: ...

    def close(self) -> None: ...


class FlowDumpReader(Protocol):
    """A dump of our flows read a slice at a time (capture.conntrack.FlowDump)."""

    @property
    def live(self) -> frozenset[FlowKey]: ...

    def fileno(self) -> int: ...

    def step(self) -> str: ...  # "done", "more" or "wait" (until fileno is readable)

    def close(self) -> None: ...


class FlowSource(Protocol):
    """The conntrack socket as the daemon uses it (capture.conntrack.ConntrackListener)."""

    def fileno(self) -> int: ...

    def read(self) -> list[FlowsStarted | FlowsEnded | FlowTableResync]: ...

    def sweep(self) -> FlowTableResync: ...

    def expire(self) -> None: ...

    def dump(self) -> frozenset[FlowKey]: ...

    def start_dump(self) -> FlowDumpReader: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Capture:
    """How a daemon opens its sockets. Openers, not open sockets: setup opens conntrack before it
    reconciles and the queue last, so no first packet waits before the core knows the sessions."""

    queue: Callable[[int, int], PacketQueue]  # (first, last queue number) -> the queue
    conntrack: Callable[[], FlowSource]


class StartupError(Exception):
    """A start-up step the kernel refused (a netlink request, the ruleset, a socket): `mplsorch
    run` prints it as one line and exits START_FAILED. The node check has NodeNotReady instead."""

    def __init__(self, step: str, cause: BaseException) -> None:
        super().__init__(f"{step}: {cause}")
        self.step = step


@contextlib.contextmanager
def start_step(step: str) -> Iterator[None]:
    """Name the start-up step a failure comes from, so the one line says what went wrong where.
    PermissionError passes unchanged: not being root is the environment's problem (exit 3)."""
    try:
        yield
    except PermissionError:
        raise
    except (OSError, RuntimeError) as exc:
        raise StartupError(step, exc) from exc


Request = Callable[[float], dict[str, Any]]
Command = Callable[[dict[str, Any], float], dict[str, Any]]  # a request with arguments


class Daemon:
    """A role's daemon: subclasses give setup, the batch decision, reload, tick, shutdown and
    their sessions and status; this class runs them in order, owns the sockets' lifetime and
    answers the control socket."""

    role: str
    config: BalancerConfig | ServerConfig | ClientConfig
    core: FlowCore
    control_socket: str

    def __init__(self, config_path: str, provider: Provider, capture: Capture) -> None:
        self.config_path = config_path
        self.provider = provider
        self.capture = capture
        self.queue: PacketQueue | None = None
        self.conntrack: FlowSource | None = None
        self.flags: set[str] = set()
        self.wake = asyncio.Event()
        self.started = time.time()
        self.op_results: dict[str, int] = {"ok": 0, "error": 0}
        self.batch_duration = DurationHistogram()
        self.next_sweep = time.monotonic() + SWEEP
        self.next_full_sweep = self.next_sweep  # the first sweep is a full one
        self.full_sweep_forced = False  # a failure asked for a full sweep (retry_sweep)
        self.periodic_full_sweeps = True  # as full_sweeps_needed said after the latest full sweep
        self.notify = systemd.notifier()
        self.next_watchdog = 0.0
        self.seen_overruns = 0
        self.control: ControlServer | None = None
        self.snapshot = LatestSnapshot()
        self.metrics: MetricsEndpoint | None = None
        self.stalls = LoopStalls(self.background)  # the loop's long steps and lateness (daemon.stalls)
        self.background_work = Background()  # the dumps' threads, at the lowest CPU priority
        self.waiting: select.poll | None = None  # the queue's readiness, polled between tick parts

    def program(self, operations: list[ops.Operation], why: str) -> list[ops.OpResult]:
        """Apply one batch; its duration feeds the metrics, each failure is logged with its reason."""
        if not operations:
            return []
        started = time.perf_counter()
        results = self.provider.apply(operations)
        return self.programmed(results, why, time.perf_counter() - started)

    def programmed(self, results: list[ops.OpResult], why: str, took: float) -> list[ops.OpResult]:
        """A batch the caller applied and timed itself (`program`'s second half): its duration
        feeds the metrics, each failure is logged with its reason."""
        self.batch_duration.observe(took)
        for r in results:
            self.op_results["ok" if r.ok else "error"] += 1
            if offload.refused(r):
                # The policy says hardware or nothing: say which device refused, in the kernel's words.
                self.core.count("offload_refused")
                log.error(
                    "%s: %s",
                    why,
                    r,
                    extra=logs.fields(
                        event="offload_refused", dev=getattr(r.op.obj, "dev", None), errno=r.errno, error=r.error
                    ),
                )
            elif not r.ok:
                log.error("%s: %s", why, r)
        return results

    def make_ready(self, config: BalancerConfig | ServerConfig | ClientConfig) -> None:
        """Raise NodeNotReady naming every problem of this node for the role; with
        `node.setup: apply` fix them first."""
        system = node_setup.HostSystem(self.provider)
        for line in node_setup.make_ready(config, system, fix=config.node.setup is Setup.APPLY):
            log.info("node setup: %s", line)

    def serve_waiting(self) -> None:
        """First packets that came while the loop was busy with its tick go before the tick's
        next part (issue 15: one that came as a tick began waited for all of it, conntrack
        events and filter counts and all, about 1.8 ms in the lab VM four times a second). One
        poll of the queue's socket; nothing outside the running loop."""
        if self.waiting is not None and self.waiting.poll(0):
            self.on_packets()

    def step_aside(self) -> None:
        """Block on the queue's socket for at most STEP_ASIDE_MS: what the verdicts woke runs
        first, and more first packets end the wait at once. Outside the running loop (tests) it
        returns at once."""
        if self.waiting is not None:
            self.waiting.poll(STEP_ASIDE_MS)

    def on_packets(self) -> None:
        """The queue is readable: decide one batch. A bug must not strand queued packets: they
        are let go unlabelled, loudly."""
        with self.stalls.step("first-packet batch") as began:
            self._on_packets(began)

    def _on_packets(self, began: float) -> None:
        assert self.queue is not None
        try:
            batch = self.queue.read_batch(self.config.nfqueue.batch)
        except OSError as exc:
            log.error("nfqueue read failed: %s", exc)
            self.core.count("queue_errors")
            return
        self._queue_overruns()
        if not batch:
            return
        try:
            self.decide(batch, began)
        except Exception:
            log.exception("first-packet batch failed; accepting its %d packets unlabelled", len(batch))
            self.core.count("batch_errors")
            self.queue.send_verdicts(accept_all(batch))

    def _queue_overruns(self) -> None:
        """A full socket buffer loses queued packets (the kernel reports ENOBUFS, the queue goes on
        reading): logged and counted once per read that saw it."""
        assert self.queue is not None
        lost = self.queue.overruns - self.seen_overruns
        if lost > 0:
            self.seen_overruns = self.queue.overruns
            self.core.count("queue_overruns", lost)
            log.warning("nfqueue: the daemon's socket buffer was full (ENOBUFS): queued packets were lost")

    def guarded_tick(self) -> None:
        """The role's tick; a failure (a netlink socket error while ending sessions) is one logged
        line and a count, and the next tick tries again: the loop, and the sessions, go on."""
        try:
            with self.stalls.step("tick"):
                self.tick()
        except Exception as exc:
            log.error("tick failed: %s: %s", type(exc).__name__, exc)
            log.debug("tick failure", exc_info=True)
            self.core.count("tick_errors")

    def do_reload(self) -> None:
        """SIGHUP, around the role's reload: whatever it raises is one logged line and a counted
        rejection, never the end of the daemon (the role keeps its running configuration)."""
        try:
            with self.stalls.step("reload"):
                self.reload()
            if self.control is not None and self.control.group != self.config.node.control_group:
                self.control.set_group(self.config.node.control_group)
        except Exception as exc:
            log.error("reload failed, keeping the running configuration: %s: %s", type(exc).__name__, exc)
            log.debug("reload failure", exc_info=True)
            self.core.count("reloads_rejected")

    # -- metrics (metrics.listen, both roles) ---------------------------------------------------------
    def metrics_snapshot(self, now: float) -> MetricsSnapshot:
        """What the role's endpoint serves: the same counts `status --json` shows."""
        raise NotImplementedError

    def publish(self) -> None:
        """The metrics endpoint serves this snapshot until the next tick."""
        if self.config.metrics is not None:
            self.snapshot.update(self.metrics_snapshot(time.monotonic()))

    def start_metrics(self) -> None:
        """A port that cannot be bound is logged, not fatal: the role's work matters more than its
        metrics."""
        self.publish()
        if self.config.metrics is not None:
            try:
                self.metrics = start_metrics_server(self.config.metrics, make_registry(self.snapshot))
            except OSError as exc:
                log.error(
                    "metrics endpoint %s not started: %s",
                    self.config.metrics.listen,
                    exc,
                    extra=fields(event="metrics_failed", reason=str(exc)),
                )

    def stop_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None

    # -- hooks ----------------------------------------------------------------------------------------
    async def prepare(self) -> None:
        """On the running loop, before `setup`: what a role must await first (a balancer of a
        cluster joins it and reads the shared table)."""

    def setup(self) -> None:
        raise NotImplementedError

    def decide(self, batch: list[QueuedPacket], now: float | None = None) -> None:
        """`now`: the batch's time, read as its step began (None: read it here)."""
        raise NotImplementedError

    def reload(self) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        """After the queue and conntrack sockets are closed, before the provider is."""
        raise NotImplementedError

    def session_views(self, offset: int = 0, limit: int | None = None) -> Iterable[dict[str, Any]]:
        """The documented rows of `mplsorch sessions --json`, times still monotonic: `offset`
        sessions skipped (without building their rows), at most `limit` (all without one)."""
        raise NotImplementedError

    def session_count(self) -> int:
        raise NotImplementedError

    def status_details(self, now: float) -> dict[str, Any]:
        """The role's own keys of `mplsorch status --json`."""
        raise NotImplementedError

    def running_message(self) -> str:
        return "running"

    async def start_tasks(self) -> None:
        """On the running loop, after setup and before READY: a role's own tasks."""

    def background(self) -> list[str]:
        """The background work under way now (a dump in a thread), named in a stall's log line."""
        return []

    async def stop_tasks(self) -> None:
        """At the stop, before the sockets close."""

    # -- control socket -------------------------------------------------------------------------------
    def requests(self) -> dict[str, Request]:
        """The control socket's queries (each gets the monotonic time); a role adds its own."""
        return {"status": self.status, "routes": self.routes}

    def commands(self) -> dict[str, Command]:
        """The control socket's commands that take arguments (the request itself) and may change
        state; a BadCommand they raise has changed nothing. `sessions` takes its page's."""
        return {"sessions": self.sessions}

    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """The control socket's handler. `status` also reports nftables' counters, read by one
        netlink dump of our table's counter objects (a few of them at any number of sessions);
        everything else is answered from memory at once."""
        if request.get("cmd") != "status":
            return self.handle_request(request)
        return {**self.handle_request(request), "nft_counters": nftables.read_counters()}

    def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        known = isinstance(cmd, str) and (cmd in self.requests() or cmd in self.commands())
        with self.stalls.step(f"request {cmd if known else '(unknown)'}"):
            return self._handle_request(request)

    def _handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        now = time.monotonic()
        query = self.requests().get(cmd) if isinstance(cmd, str) else None
        if query is not None:
            return query(now)
        command = self.commands().get(cmd) if isinstance(cmd, str) else None
        if command is None:
            return {"error": f"unknown command {cmd!r}"}
        try:
            return command(request, now)
        except BadCommand as exc:
            log.warning("command %s refused: %s", cmd, exc, extra=logs.fields(event="command_refused", cmd=cmd))
            return {"error": str(exc), "bad_input": True}

    def status(self, now: float) -> dict[str, Any]:
        """`mplsorch status --json` but for nftables' counters, which `answer` adds."""
        return {
            "role": self.role,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            **self.status_details(now),
            "counters": dict(self.core.counters),
            "dataplane_ops": dict(self.op_results),
            "offload": self.offload_states(now),
            "loop_steps": self.stalls.spent(),
            "loop_stalls": {cause: n for cause, n in self.stalls.stalls.items()},
        }

    def offload_states(self, now: float) -> dict[str, int]:
        """`status`'s offload counts: of a dump of the kernel now."""
        return offload.counts(self.provider.dump())

    def sessions(self, request: dict[str, Any], now: float) -> dict[str, Any]:
        """A page of the session table (all of it without `limit`), in the table's order, and
        the table's size: at 500,000 sessions a whole answer is hundreds of MB of JSON."""
        offset, limit = page(request)
        rows = [session_json(view, now) for view in self.session_views(offset, limit)]
        return {"role": self.role, "sessions": rows, "offset": offset, "total": self.session_count()}

    def routes(self, now: float) -> dict[str, Any]:
        """Every object of ours as the kernel reports it now, with its offload state."""
        return {"routes": [offload.row(i) for i in self.provider.dump()]}

    # -- the loop -----------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        await self.prepare()
        self.setup()
        assert self.queue is not None and self.conntrack is not None
        for sig, flag in ((signal.SIGHUP, "reload"), (signal.SIGTERM, "stop"), (signal.SIGINT, "stop")):
            loop.add_signal_handler(sig, self.flag, flag)
        loop.add_reader(self.queue.fileno(), self.on_packets)
        self.waiting = select.poll()
        self.waiting.register(self.queue.fileno(), select.POLLIN)
        control = ControlServer(self.control_socket, self.answer, self.config.node.control_group)
        self.control = control
        with start_step(f"control socket {self.control_socket}"):
            await control.start()
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL)
        try:
            self.stalls.start()
            await self.start_tasks()
            log.info("%s", self.running_message())
            self.notify.ready(self.running_message())
            while "stop" not in self.flags:
                try:
                    await asyncio.wait_for(self.wake.wait(), TICK)
                except TimeoutError:
                    pass
                self.wake.clear()
                if "reload" in self.flags:
                    self.flags.discard("reload")
                    self.notify.reloading()
                    self.do_reload()
                    self.notify.ready(self.running_message())
                self._on_conntrack()  # the tick's events first: no session ends on an unread flow
                self.serve_waiting()
                if time.monotonic() >= self.next_sweep:
                    with self.stalls.step("conntrack sweep"):
                        self.sweep()
                self.guarded_tick()
                self._watchdog()
        finally:
            self.notify.stopping()
            sys.setswitchinterval(switch_interval)
            await self.stalls.stop()
            await self.stop_tasks()
            self.background_work.close()
            loop.remove_reader(self.queue.fileno())
            self.waiting = None
            await control.stop()
            self.queue.close()
            self.conntrack.close()
            self.shutdown()
            self.provider.close()
        return 0

    def _watchdog(self) -> None:
        """WATCHDOG=1 at the interval systemd asks for (half WatchdogSec), from the loop itself:
        a loop that is stuck stops sending, and systemd restarts the daemon."""
        interval = self.notify.watchdog_interval()
        now = time.monotonic()
        if interval is not None and now >= self.next_watchdog:
            self.notify.watchdog()
            self.next_watchdog = now + interval

    def flag(self, flag: str) -> None:
        """What a signal does: set `flag` (reload, stop) and wake the loop, which acts on it."""
        self.flags.add(flag)
        self.wake.set()

    def _on_conntrack(self) -> None:
        assert self.conntrack is not None
        with self.stalls.step("conntrack events"):
            self._flow_events(self.conntrack.read)

    def sweep(self) -> None:
        """Expired flows end now rather than when conntrack's garbage collector gets to them.
        Pending destroy events are read first, so the dump is never older than what the core
        knows. A full sweep when one is due (`full_sweep_due`), else the kernel's expiry only."""
        assert self.conntrack is not None
        began = time.monotonic()
        full = self.full_sweep_due()
        planned = self.next_sweep = began + SWEEP
        self._on_conntrack()
        if full:
            self._flow_events(lambda: [self.conntrack.sweep()] if self.conntrack else [])
        else:
            try:
                self.conntrack.expire()
                self.core.count("conntrack_expiries")
            except Exception as exc:
                self.expiry_failed(exc)
        self.swept(began, planned, full)

    def full_sweep_due(self) -> bool:
        """Whether the sweep that starts now reads the live flows back: the one planned
        (`next_sweep`) is at or past the full sweep's time (FULL_SWEEP, or a retry's), and
        either a failure asked for it or the role still needs periodic ones
        (`full_sweeps_needed`)."""
        return self.next_sweep >= self.next_full_sweep and (self.full_sweep_forced or self.full_sweeps_needed())

    def full_sweeps_needed(self) -> bool:
        """Whether live flows may end without a destroy event, so that only a full sweep sees
        them go (the balancer's core knows: Balancer.full_sweeps_needed); always, by default."""
        return True

    def swept(self, began: float, planned: float, full: bool) -> None:
        """A sweep that began at `began` is done: the next waits SWEEP (FULL_SWEEP for a full
        one), or SWEEP_SPACING times as long as this one took, whichever is longer; unless a
        failure asked for an early retry (`retry_sweep`)."""
        ended = time.monotonic()
        if self.next_sweep < planned:
            return
        spaced = ended + SWEEP_SPACING * (ended - began)
        self.next_sweep = max(planned, spaced)
        if full:
            self.next_full_sweep = max(began + FULL_SWEEP, spaced)
            self.full_sweep_forced = False
            needed = self.full_sweeps_needed()
            if needed != self.periodic_full_sweeps:
                self.periodic_full_sweeps = needed
                if needed:
                    log.info("conntrack: flows no event reported are live: full sweeps every %d s", FULL_SWEEP)
                else:
                    log.info(
                        "conntrack: every live flow of ours came with its new-flow event: no periodic "
                        "full sweep (the kernel's expiry passes only; a full one after a failed read)"
                    )

    def retry_sweep(self) -> None:
        """A conntrack read or dump failed: what it would have told is in the table, so a full
        sweep soon reads it back and no flow's end is lost with the failure."""
        soon = time.monotonic() + RETRY_SWEEP
        self.next_sweep = min(self.next_sweep, soon)
        self.next_full_sweep = min(self.next_full_sweep, soon)
        self.full_sweep_forced = True

    def expiry_failed(self, exc: Exception) -> None:
        """The kernel's expiry pass failed: logged, counted, and a full sweep soon."""
        log.error("conntrack expiry dump failed: %s: %s", type(exc).__name__, exc)
        self.core.count("conntrack_errors")
        self.retry_sweep()

    def _flow_events(self, read: Callable[[], list[FlowsStarted | FlowsEnded | FlowTableResync]]) -> None:
        try:
            events = read()
            if events:
                self.core.on_flow_events(events, time.monotonic())
        except Exception as exc:
            log.error("conntrack events failed: %s: %s", type(exc).__name__, exc)
            log.debug("conntrack failure", exc_info=True)
            self.core.count("conntrack_errors")
            self.retry_sweep()
            return
        for event in events:
            if isinstance(event, FlowTableResync) and not event.sweep:
                log.warning("conntrack: events lost (ENOBUFS); resynced from a dump of %d live flows", len(event.live))


def page(request: dict[str, Any]) -> tuple[int, int | None]:
    """The `offset` (default 0) and `limit` (default none) of a `sessions` request."""
    offset, limit = request.get("offset", 0), request.get("limit")
    if type(offset) is not int or offset < 0:
        raise BadCommand(f"offset must be an integer >= 0, not {offset!r}")
    if limit is not None and (type(limit) is not int or limit < 1):
        raise BadCommand(f"limit must be an integer >= 1, not {limit!r}")
    return offset, limit


def session_json(view: dict[str, Any], now: float) -> dict[str, Any]:
    """Times as Unix seconds (the cores keep monotonic time)."""
    shift = time.time() - now
    out = dict(view)
    for key in ("created", "last_seen", "ends_at", "label_check_at"):
        if out.get(key) is not None:
            out[key] = round(out[key] + shift, 3)
    return out


def nf_verdict(v: PacketVerdict) -> Verdict:
    """A core's verdict as nfqueue's. A refused packet goes back through the ruleset with the
    mark of its refusal, where the kernel rejects it (TCP RST or ICMP)."""
    if v.action == Action.ACCEPT:
        return Verdict(v.queue, v.packet_id, NF_ACCEPT)
    if v.action == Action.REFUSE:
        mark = nftables.MARK_RST if v.refuse_with == "rst" else nftables.MARK_ICMP
        return Verdict(v.queue, v.packet_id, NF_REPEAT, mark)
    return Verdict(v.queue, v.packet_id, NF_DROP)


def serve(daemon: Daemon, log_format: str = "text") -> int:
    """`mplsorch run`: log to stderr (text or JSON lines) and run the daemon until SIGTERM/SIGINT."""
    logs.configure(log_format)
    return asyncio.run(daemon.run())
