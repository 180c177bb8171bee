"""`nfqueue.workers: N` (N > 1): the balancer as a supervisor and N worker processes.

The supervisor checks the node, loads the ruleset (whose rules pick each client's worker by a
hash of its source address, capture.nftables.queue_statement), starts the workers (`mplsorch run
--worker I`, each a BalancerDaemon with its share: core.shards) and then only supervises:

- signals: SIGTERM/SIGINT stop the workers (SIGTERM each, then wait) and then itself; SIGHUP
  reloads: a configuration that loads and whose ruleset the kernel takes is loaded, then every
  worker gets SIGHUP and fills its fast-path sets again; a bad one changes nothing.
- a worker that dies is started again after a second; it restores its share from the kernel
  (restart counted in `status --json`'s `workers`). A worker that fails before it ever answered
  stops the balancer with its exit code (its one-line error is on the shared stderr).
- the control socket (`node.control_socket`) answers for the union: it asks every worker on its
  own socket (`<control_socket>.workerI`) and adds the answers up (sessions listed together,
  counts summed, health and routes from worker 0, which sees the same servers and kernel).
- the metrics endpoint serves the union, refreshed each tick from the workers' answers.
- systemd: READY once every worker answers, WATCHDOG from the supervisor's loop, STOPPING.

Every worker runs its own health checks (each server is probed N times per interval) and reads
every conntrack event (each ignores the flows of sessions it does not own)."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any

from orchestrator import systemd
from orchestrator.capture import nftables
from orchestrator.capture.nfqueue import queue_stats
from orchestrator.config.load import ConfigError, load_balancer_config
from orchestrator.config.model import BalancerConfig, Setup
from orchestrator.core.servers import BadCommand
from orchestrator.core.shards import worker_socket
from orchestrator.daemon import logs, node_setup, views
from orchestrator.daemon.control import ControlServer
from orchestrator.daemon.loop import TICK, StartupError, page, start_step
from orchestrator.dataplane.provider import Provider
from orchestrator.metrics import (
    HistogramSnapshot,
    LatestSnapshot,
    MetricsEndpoint,
    make_registry,
    snapshot_from,
    start_metrics_server,
)

log = logging.getLogger("mplsorch")
START_TIMEOUT = 120.0  # seconds for every worker to answer on its control socket
RESTART_DELAY = 1.0
STOP_TIMEOUT = 20.0
ASK_TIMEOUT = 10.0
PUBLISH_EVERY = 1.0  # seconds between two refreshes of the metrics from the workers


class Worker:
    def __init__(self, index: int, socket_path: str) -> None:
        self.index = index
        self.socket = socket_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.answered = False  # has answered on its control socket since it was last started
        self.restart_at: float | None = None


class Supervisor:
    def __init__(self, config_path: str, config: BalancerConfig, provider: Provider, log_format: str = "text") -> None:
        self.config_path = config_path
        self.config = config
        self.provider = provider
        self.log_format = log_format
        self.count = config.nfqueue.workers
        self.workers = [Worker(i, worker_socket(config.node.control_socket, i)) for i in range(self.count)]
        self.flags: set[str] = set()
        self.wake = asyncio.Event()
        self.started = time.time()
        self.notify = systemd.notifier()
        self.next_watchdog = 0.0
        self.snapshot = LatestSnapshot()
        self.metrics: MetricsEndpoint | None = None
        self.failed: int | None = None  # a worker's exit code before it ever answered
        self.reloads_rejected = 0
        self.next_publish = 0.0

    # -- workers ------------------------------------------------------------------------------------
    def spawn(self, worker: Worker) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        worker.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator",
                "run",
                "--config",
                self.config_path,
                "--log-format",
                self.log_format,
                "--worker",
                str(worker.index),
            ],
            env=env,
        )
        worker.answered = False
        worker.restart_at = None
        log.info("worker %d started (pid %d)", worker.index, worker.proc.pid)

    def check_workers(self) -> None:
        """A worker gone: started again after RESTART_DELAY, or the end of the balancer when it
        never came up."""
        now = time.monotonic()
        for w in self.workers:
            if w.proc is None:
                continue
            code = w.proc.poll()
            if code is None:
                continue
            if not w.answered and w.restarts == 0:
                log.error("worker %d failed at start (exit %d)", w.index, code)
                self.failed = code or 1
                self.flag("stop")
                return
            if w.restart_at is None:
                log.error(
                    "worker %d exited (%d); starting it again",
                    w.index,
                    code,
                    extra=logs.fields(event="worker_exited", worker=w.index, code=code),
                )
                w.restart_at = now + RESTART_DELAY
            elif now >= w.restart_at:
                w.restarts += 1
                self.spawn(w)

    def signal_workers(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(sig)

    async def stop_workers(self) -> None:
        self.signal_workers(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for w in self.workers:
            while w.proc is not None and w.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if w.proc is not None and w.proc.poll() is None:
                log.error("worker %d did not stop in %.0f s: killed", w.index, STOP_TIMEOUT)
                w.proc.kill()
                w.proc.wait()

    async def ask(self, worker: Worker, request: dict[str, Any]) -> dict[str, Any] | None:
        """One worker's answer, or None when it does not answer (down, restarting)."""
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(worker.socket), ASK_TIMEOUT)
        except (OSError, TimeoutError):
            return None
        try:
            writer.write(json.dumps(request).encode() + b"\n")
            await writer.drain()
            line = await asyncio.wait_for(reader.readline(), ASK_TIMEOUT)
            answer: dict[str, Any] = json.loads(line)
        except (OSError, TimeoutError, ValueError):
            return None
        finally:
            writer.close()
        worker.answered = True
        return answer

    async def ask_all(self, request: dict[str, Any]) -> list[dict[str, Any] | None]:
        return list(await asyncio.gather(*(self.ask(w, request) for w in self.workers)))

    # -- the control socket: the union of the workers' answers ---------------------------------------
    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        if cmd == "status":
            answers = await self.ask_all({"cmd": "worker_status"})
            return {**self.merge_status(answers), "nft_counters": nftables.read_counters()}
        wanted: tuple[int, int | None] = (0, None)
        if cmd == "sessions":
            # A page of the union: each worker's first offset + limit rows, merged by id, then cut.
            try:
                wanted = page(request)
            except BadCommand as exc:
                return {"error": str(exc), "bad_input": True}
            offset, limit = wanted
            request = {"cmd": "sessions", "offset": 0, **({} if limit is None else {"limit": offset + limit})}
        answers = await self.ask_all(request)
        missing = [w.index for w, a in zip(self.workers, answers) if a is None]
        present = [a for a in answers if a is not None]
        if not present:
            return {"error": "no worker answers"}
        errors = [a for a in present if "error" in a]
        if errors:
            return errors[0]
        if missing and cmd not in ("routes", "servers"):
            # A command some workers could not take (or a list missing their share) is no answer.
            return {"error": f"workers {', '.join(map(str, missing))} do not answer; try again"}
        return merge_answers(str(cmd), present, wanted)

    def merge_status(self, answers: list[dict[str, Any] | None]) -> dict[str, Any]:
        present = [a for a in answers if a is not None]
        base = dict(present[0]) if present else {"role": "balancer"}
        base.pop("batch_duration", None)
        out: dict[str, Any] = {
            **base,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "queue": views.queue_summary(queue_stats(), self.config.nfqueue.queues),
        }
        for key in (
            "sessions",
            "sessions_by_state",
            "servers",
            "labels",
            "counters",
            "dataplane_ops",
            "offload",
            "loop_steps",
            "loop_stalls",
        ):
            values = [a[key] for a in present if key in a]
            if values:
                out[key] = add_up(values)
        ages = [a.get("offload_age_s") for a in present]
        if ages:  # the oldest of the workers' counts (None while one has none yet)
            out["offload_age_s"] = None if None in ages else max(float(age) for age in ages if age is not None)
        out.setdefault("counters", {})
        out["counters"] = {**out["counters"], "worker_restarts": sum(w.restarts for w in self.workers)}
        if self.reloads_rejected:
            out["counters"]["reloads_rejected"] = out["counters"].get("reloads_rejected", 0) + self.reloads_rejected
        out["workers"] = [
            {
                "worker": w.index,
                "pid": None if w.proc is None else w.proc.pid,
                "alive": a is not None,
                "sessions": None if a is None else a.get("sessions"),
                "restarts": w.restarts,
            }
            for w, a in zip(self.workers, answers)
        ]
        return out

    # -- metrics --------------------------------------------------------------------------------------
    async def publish(self) -> None:
        """The metrics' snapshot, at most once a second."""
        if self.config.metrics is None or time.monotonic() < self.next_publish:
            return
        self.next_publish = time.monotonic() + PUBLISH_EVERY
        answers = await self.ask_all({"cmd": "worker_status"})
        servers = await self.ask(self.workers[0], {"cmd": "servers"})
        status = self.merge_status(answers)
        histograms = [a["batch_duration"] for a in answers if a is not None and "batch_duration" in a]
        batch = HistogramSnapshot()
        if histograms:
            batch = HistogramSnapshot(
                tuple(histograms[0]["bounds"]),
                tuple(add_up([h["cumulative"] for h in histograms])),
                sum(h["count"] for h in histograms),
                sum(h["sum"] for h in histograms),
            )
        rows = (servers or {}).get("servers", [])
        self.snapshot.update(
            snapshot_from(
                status.get("counters", {}),
                status.get("sessions_by_state", {}),
                status.get("labels", {}),
                status.get("dataplane_ops", {}),
                batch,
                [(r["pool"], r["name"], r["state"]) for r in rows],
                status.get("offload"),
            )
        )

    def start_metrics(self) -> None:
        if self.config.metrics is not None:
            try:
                self.metrics = start_metrics_server(self.config.metrics, make_registry(self.snapshot))
            except OSError as exc:
                log.error("metrics endpoint %s not started: %s", self.config.metrics.listen, exc)

    # -- the loop -------------------------------------------------------------------------------------
    async def workers_answer(self) -> bool:
        """Wait until every worker answers on its control socket (True), or the stop (False; a
        worker that failed at start sets it). StartupError after START_TIMEOUT."""
        deadline = time.monotonic() + START_TIMEOUT
        while "stop" not in self.flags:
            self.check_workers()
            await self.ask_all({"cmd": "labels"})
            if all(w.answered for w in self.workers):
                return True
            if time.monotonic() > deadline:
                raise StartupError("workers", RuntimeError(f"not all answered in {START_TIMEOUT:.0f} s"))
            await asyncio.sleep(0.2)
        return False

    def flag(self, flag: str) -> None:
        self.flags.add(flag)
        self.wake.set()

    def reload(self) -> None:
        """SIGHUP: the new configuration and its ruleset, then each worker's own reload."""
        try:
            config = load_balancer_config(self.config_path)
            if config.nfqueue.workers != self.count or config.node.control_socket != self.config.node.control_socket:
                raise RuntimeError("nfqueue.workers and node.control_socket change only at a restart")
            node_setup.make_ready(config, node_setup.HostSystem(self.provider), fix=config.node.setup is Setup.APPLY)
            nftables.load(nftables.render(config))
        except (ConfigError, OSError, RuntimeError, node_setup.NodeNotReady) as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc)
            self.reloads_rejected += 1
            return
        self.config = config
        self.signal_workers(signal.SIGHUP)
        log.info("configuration reloaded from %s; workers reloading", self.config_path)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        with start_step("node check"):
            for line in node_setup.make_ready(
                self.config, node_setup.HostSystem(self.provider), fix=self.config.node.setup is Setup.APPLY
            ):
                log.info("node setup: %s", line)
        with start_step("nftables ruleset"):
            nftables.load(nftables.render(self.config))
        for sig, flag in ((signal.SIGHUP, "reload"), (signal.SIGTERM, "stop"), (signal.SIGINT, "stop")):
            loop.add_signal_handler(sig, self.flag, flag)
        for w in self.workers:
            self.spawn(w)
        control = ControlServer(self.config.node.control_socket, self.answer, self.config.node.control_group)
        try:
            if await self.workers_answer():
                # The control socket only once every worker answers: its presence means ready.
                with start_step(f"control socket {self.config.node.control_socket}"):
                    await control.start()
                message = f"balancer running: {self.count} workers, control {self.config.node.control_socket}"
                log.info("%s", message)
                self.start_metrics()
                self.notify.ready(message)
            while "stop" not in self.flags:
                try:
                    await asyncio.wait_for(self.wake.wait(), TICK)
                except TimeoutError:
                    pass
                self.wake.clear()
                self.check_workers()
                if "reload" in self.flags:
                    self.flags.discard("reload")
                    self.notify.reloading()
                    self.reload()
                    self.notify.ready("reloaded")
                await self.publish()
                interval = self.notify.watchdog_interval()
                if interval is not None and time.monotonic() >= self.next_watchdog:
                    self.notify.watchdog()
                    self.next_watchdog = time.monotonic() + interval
        finally:
            self.notify.stopping()
            await self.stop_workers()
            await control.stop()
            if self.metrics is not None:
                self.metrics.close()
            self.provider.close()
        log.info("balancer stopped (%d workers)", self.count)
        return self.failed or 0


def add_up(values: list[Any]) -> Any:
    """Numbers summed, mappings key by key, lists element by element (histogram buckets);
    anything else: the first value."""
    first = values[0]
    if isinstance(first, bool) or not isinstance(first, (int, float, dict, list)):
        return first
    if isinstance(first, (int, float)):
        return sum(v for v in values if isinstance(v, (int, float)))
    if isinstance(first, list):
        return [add_up(list(items)) for items in zip(*values)]
    keys: dict[str, None] = {}
    for v in values:
        keys.update(dict.fromkeys(v))
    return {k: add_up([v[k] for v in values if k in v]) for k in keys}


def merge_answers(
    cmd: str, answers: list[dict[str, Any]], request_page: tuple[int, int | None] = (0, None)
) -> dict[str, Any]:
    """The union of the workers' answers to one request (every worker answered without error);
    `request_page`: the (offset, limit) the operator asked of `sessions`."""
    first = answers[0]
    if cmd == "sessions":
        rows = sorted((s for a in answers for s in a.get("sessions", [])), key=lambda s: s.get("id", 0))
        offset, limit = request_page
        rows = rows[offset:] if limit is None else rows[offset : offset + limit]
        return {**first, "sessions": rows, "offset": offset, "total": sum(a.get("total", 0) for a in answers)}
    if cmd == "labels":
        return {"labels": add_up([a["labels"] for a in answers])}
    if cmd == "servers":
        per: collections.Counter[tuple[str, str]] = collections.Counter()
        for a in answers:
            for row in a.get("servers", []):
                per[(row["pool"], row["name"])] += row["sessions"]
        return {"servers": [{**row, "sessions": per[(row["pool"], row["name"])]} for row in first["servers"]]}
    if cmd in ("drain", "enable"):
        return {**first, "sessions": sum(a.get("sessions", 0) for a in answers)}
    if cmd == "flush":
        return {
            "flushed": sum(a["flushed"] for a in answers),
            "sessions": sorted(s for a in answers for s in a["sessions"]),
            "errors": sum(a["errors"] for a in answers),
        }
    return first  # routes (the same kernel), weight (the same change everywhere)


def serve(config_path: str, config: BalancerConfig, provider: Provider, log_format: str = "text") -> int:
    logs.configure(log_format)
    return asyncio.run(Supervisor(config_path, config, provider, log_format).run())
