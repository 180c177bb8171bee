"""`mplsorch run` for the balancer role: one asyncio loop around the pure decision core.

capture (NFQUEUE batch) -> analyse + decide (core) -> program (one netlink batch) -> verdicts
(one sendmsg). Conntrack destroy events end flows; a timer ends sessions. Health checks run as
tasks on the same loop: each result goes through the pure rise/fall table, and the core learns
the new health view (and the servers that went down, whose sessions it moves or ends). Operator
commands arrive on the control socket. Signals only set flags and wake the loop, which acts on
them: SIGHUP reloads, SIGTERM/SIGINT stop. With `metrics.listen` the tick publishes a snapshot
that the Prometheus endpoint's thread serves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import gc
import logging
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

from orchestrator.analyze.packet import source_address
from orchestrator.capture import conntrack, nftables
from orchestrator.capture.conntrack import DUMP_WAIT
from orchestrator.capture.nfqueue import QueuedPacket, queue_stats
from orchestrator.config.load import ConfigError, load_balancer_config
from orchestrator.config.model import BalancerConfig
from orchestrator.core import commands, shards
from orchestrator.core.balancer import Balancer, qdiscs
from orchestrator.core.events import Action, FirstPacket, FlowKey, PacketVerdict
from orchestrator.core.servers import AdminState
from orchestrator.core.sessions import Session, SessionTable
from orchestrator.daemon import ethtool, node_setup, views
from orchestrator.daemon.logs import Throttle, fields
from orchestrator.daemon.loop import (
    SWEEP,
    Capture,
    Command,
    Daemon,
    Request,
    nf_verdict,
    start_step,
)
from orchestrator.daemon.offload_sampler import OffloadSampler
from orchestrator.daemon.stalls import Laps
from orchestrator.dataplane import ops
from orchestrator.dataplane.provider import Provider
from orchestrator.health import CheckResult, HealthRunner, HealthTable, HealthView, probes_of, run_check, targets_of
from orchestrator.health.runner import Checker
from orchestrator.metrics import MetricsSnapshot

log = logging.getLogger("mplsorch")
Filter = ops.FlowerFilter | ops.U32Filter
# The garbage collector and a large table (issue 15: 500,000 sessions, a dozen tracked objects
# each). The table's objects live long and hold no reference cycles, yet every full collection
# walks them all: at 100,000 sessions and more the loop stalled for seconds in collections
# while first packets waited. So the daemon (not the core) collects young objects less often
# (GC_THRESHOLDS: first packets allocate in bursts; the defaults are 700, 10, 10), and freezes
# what is alive (gc.freeze: later collections skip it) after the restore and each time the table
# has grown by a quarter since the last freeze, right after a full collection, so no garbage is
# frozen. The work stays proportional to the table's growth; only cycles made garbage later
# among frozen objects would stay (the table makes none).
GC_THRESHOLDS = (20_000, 20, 20)
FREEZE_GROWTH = 1.25
FREEZE_MIN = 10_000  # sessions: below, the defaults' collections cost nothing worth avoiding


async def readable(fd: int, timeout: float) -> None:
    """Wait until `fd` is readable, at most `timeout` seconds (then TimeoutError)."""
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await asyncio.wait_for(ready, timeout)
    finally:
        loop.remove_reader(fd)


def _timed_call(fn: Callable[[], object]) -> float:
    """`fn()`'s wall time in seconds (in the thread that runs it)."""
    began = time.monotonic()
    fn()
    return time.monotonic() - began


class BalancerDaemon(Daemon):
    role = "balancer"

    def __init__(
        self,
        config_path: str,
        provider: Provider,
        capture: Capture,
        config: BalancerConfig | None = None,
        keep_on_exit: bool = True,
        shard: shards.Shard | None = None,
    ) -> None:
        """`shard`: this daemon is one of `nfqueue.workers` (daemon.workers starts them): it runs
        with its share of `config` (core.shards), owns the kernel's objects of its share only and
        leaves the ruleset to the supervisor."""
        super().__init__(config_path, provider, capture)
        self.shard = shard
        self.config: BalancerConfig = self._share(config or load_balancer_config(config_path))
        self.control_socket = self.config.node.control_socket
        self.keep_on_exit = keep_on_exit
        self.core: Balancer = Balancer(self.config, time.monotonic())
        if shard is not None:  # ids of its own, so the workers' sessions never share one
            self.core.table = SessionTable(shard.index + 1, shard.count)
        self.batches = 0
        self.health = HealthTable()
        self.health.configure(targets_of(self.config))
        self.runner: HealthRunner | None = None
        self.checker: Checker = run_check
        # Our objects' offload states: a dump walks every filter and route of ours, far too much
        # for a request or a tick on a large table; a background task takes it (start_tasks).
        self.offload_provider: Provider = provider
        self.offload = OffloadSampler(lambda: self.offload_provider.offload_counts(self.is_mine))
        self.refusal_lines = Throttle()  # refused packets logged one by one up to 10 a second per reason
        self.frozen_at = 0  # table size at the last gc.freeze
        self.sweeping: asyncio.Task[None] | None = None  # a conntrack sweep's dump under way
        self.member: Any = None  # cluster mode: orchestrator.cluster.member.Member
        if self.config.cluster is not None:
            from orchestrator.cluster.member import Member  # etcd's client only in cluster mode

            self.member = Member(self.config.cluster, self)

    def routes_to(self, addresses: list[str]) -> dict[str, ops.NextHop | None]:
        return self.provider.routes_to(addresses)

    async def prepare(self) -> None:
        """Cluster mode: join, claim a label block and read the shared table before anything else
        (the daemon takes no packet before it knows every member's sessions)."""
        if self.member is not None:
            with start_step("cluster (etcd)"):
                await self.member.start()

    def _share(self, config: BalancerConfig) -> BalancerConfig:
        """The configuration this daemon runs with: all of it, or a worker's share."""
        if self.shard is None:
            return config
        self.owner = shards.owner_of_label(config, self.shard.count)
        return shards.worker_config(config, self.shard)

    def mine(self, installed: list[ops.Installed]) -> list[ops.Installed]:
        """Of a dump of the kernel, what is this daemon's: everything, or a worker's share."""
        if self.shard is None:
            return installed
        return shards.share_of(installed, self.owner, self.shard.index)

    @property
    def is_mine(self) -> Callable[[ops.Installed], bool] | None:
        """Of a dump without fast-path elements, which objects are this daemon's (None: all)."""
        shard = self.shard
        if shard is None:
            return None
        owner = self.owner
        return lambda item: shards.is_mine(item, owner, shard.index)

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Node check, node objects, reconcile with the kernel, ruleset, queue: in this order, so
        that nothing is touched on a node that is not ready and no first packet is queued before
        the table knows the sessions that survived a restart."""
        with start_step("node check"):
            self.make_ready(self.config)
        with start_step("node objects"):
            self.add_qdiscs(self.config)
        with start_step("conntrack socket"):
            self.conntrack = self.capture.conntrack()
        began = time.monotonic()
        # The restore allocates an object graph the size of the table, all of it kept: the cyclic
        # collector would walk it again and again (half the time of a restore of 100,000
        # sessions); afterwards it is frozen, so that later collections skip it too.
        gc.disable()
        try:
            with start_step("restore from the kernel"):
                installed = self.mine(self.provider.dump(elements=False))
                live = self.conntrack.dump()
                dumped = time.monotonic()
                stale = self.core.restore(installed, live, dumped)
                self.program(stale, "reconcile")
                # A deleted filter's session may have left elements in the fast-path sets: then
                # they are emptied (the ruleset loaded) and filled again from the table.
                kept = not any(isinstance(op.obj, (ops.FlowerFilter, ops.U32Filter)) for op in stale)
                del installed, live, stale  # the dump's objects the table does not keep, freed now
            restored = time.monotonic()
            if len(self.core.table):
                log.info(
                    "restored %d sessions from the kernel in %.2f s (dumps %.2f s, table and stale objects %.2f s)",
                    len(self.core.table),
                    restored - began,
                    dumped - began,
                    restored - dumped,
                )
            if self.member is not None:
                with start_step("cluster table"):
                    self.member.sync(time.monotonic())
            if self.shard is None:  # a worker's supervisor loaded it
                with start_step("nftables ruleset"):
                    ruleset = nftables.render(self.config)
                    # The kernel holds this very ruleset (a restart): its sets keep their elements.
                    kept = kept and nftables.loaded(ruleset)
                    if not kept:
                        nftables.load(ruleset)
                    log.info("nftables ruleset %s", "kept: the kernel holds it" if kept else "loaded")
            with start_step("fast-path sets"):
                self.fill_fast_path(kept=kept and self.shard is None)
        finally:
            gc.set_threshold(*GC_THRESHOLDS)
            gc.enable()
            gc.freeze()
            self.frozen_at = len(self.core.table)
        log.info(
            "reconciled with the kernel in %.2f s (restore %.2f s, ruleset and fast-path sets %.2f s)",
            time.monotonic() - began,
            restored - began,
            time.monotonic() - restored,
        )
        first, last = self.config.nfqueue.queues
        with start_step(f"nfqueue {first}-{last}"):
            self.queue = self.capture.queue(first, last)

    def add_qdiscs(self, config: BalancerConfig) -> None:
        """The clsact qdiscs of the fabric devices (C2S filters) and of the label-aware client
        interfaces (liveness filters); one already there is no error."""
        for result in self.provider.apply([ops.Add(q) for q in qdiscs(config)]):
            if not result.ok and result.errno != errno.EEXIST:
                raise RuntimeError(str(result))

    def fill_fast_path(self, kept: bool = False) -> None:
        """Loading the ruleset empties the fast-path sets: the table's sessions get their
        elements back (and any element of no session goes), or their clients' new flows would
        all come to the daemon. A worker tells its elements by their clients' filters. `kept`:
        the sets were not emptied (a restart that found its ruleset loaded): the table's
        elements are put in again over what they hold, not read back (Balancer.fast_path_sync)."""
        if kept:
            self.program(self.core.fast_path_sync(None), "fast path")
            return
        present = self.provider.dump_elements() if self.shard is None else self.mine(self.provider.dump())
        self.program(self.core.fast_path_sync(present), "fast path")

    def running_message(self) -> str:
        metrics = f", metrics {self.config.metrics.listen}" if self.config.metrics else ""
        # A worker's own line must not read as the balancer's (its supervisor says that).
        who = "balancer running" if self.shard is None else f"balancer worker {self.shard.index} serving"
        return (
            f"{who}: {len(self.config.services)} services, queues "
            f"{'-'.join(map(str, self.config.nfqueue.queues))}, control {self.control_socket}, "
            f"{len(self.health)} servers checked{metrics}"
        )

    async def start_tasks(self) -> None:
        """The health checks' tasks and the metrics endpoint, before READY."""
        twin = self.provider.twin()
        self.offload_provider = twin
        self.offload = OffloadSampler(
            lambda: twin.offload_counts(self.is_mine),
            twin.close if twin is not self.provider else lambda: None,
            self.background_work,
            self.can_offload,
        )
        self.offload.start()
        self.runner = HealthRunner(self.on_health_result, self.checker)
        self.runner.configure(probes_of(self.config))
        self.start_metrics()
        if self.member is not None:
            self.member.run()
            self.member.flush()

    async def stop_tasks(self) -> None:
        if self.sweeping is not None:
            self.sweeping.cancel()
        await self.offload.stop()
        if self.runner is not None:
            await self.runner.close()
        self.stop_metrics()
        if self.member is not None:
            await self.member.stop(leave=True)

    # -- the loop's hooks ---------------------------------------------------------------------------
    def tick(self) -> None:
        step = self.stalls.step
        with step("tick: persistence ends"):
            self.end_sessions()
        with step("tick: liveness"):
            self.check_liveness()
        self.serve_waiting()  # the filter counts' round trips are the tick's longest part
        with step("tick: embryonic"):
            self.end_embryonic()
        self.serve_waiting()
        with step("tick: gc freeze"):
            self.freeze_grown()
        with step("tick: metrics"):
            self.publish()
        if self.member is not None:
            with step("tick: cluster flush"):
                self.member.flush()

    def background(self) -> list[str]:
        sweeping = [] if self.sweeping is None else [self.sweeping.get_name()]
        return sweeping + (["offload dump"] if self.offload.busy else [])

    def sweep(self) -> None:
        """The conntrack sweep (Daemon.sweep), never a whole dump in one go on the loop: at
        260,000 flows a full dump's decoding took the loop for tens of seconds, first packets
        waiting. Pending events are read first. Most sweeps are the kernel's expiry pass only,
        which gives back no flow: its one system call in a background thread (daemon.background:
        the lowest CPU priority). A full one reads its dump on the loop a slice at a time
        (`_dump`; not in a thread, which held the GIL at idle priority while the loop waited for
        it: docs/design.md), and flows that start or end meanwhile are noted by the core
        (`sweep_begins`), so the older dump neither ends nor revives them; the resync then runs a
        slice of flows at a time too (core.SweepResync). First packets are served between slices.
        Outside a running loop (tests), the dump is taken at once as before."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return super().sweep()
        assert self.conntrack is not None
        if self.sweeping is not None:
            return  # one at a time
        began = time.monotonic()
        full = self.full_sweep_due()
        self.next_sweep = began + SWEEP
        self._on_conntrack()
        if full:
            self.core.sweep_begins()
            self.sweeping = loop.create_task(self._sweep(began), name="conntrack sweep")
        else:
            self.sweeping = loop.create_task(self._expire(began), name="conntrack expiry")

    async def _expire(self, began: float) -> None:
        try:
            conntrack = self.conntrack
            assert conntrack is not None
            planned = self.next_sweep
            try:
                took = await self.background_work.run(lambda: _timed_call(conntrack.expire))
            except Exception as exc:
                self.expiry_failed(exc)
                return
            self.stalls.noted("background: conntrack expiry", took)
            self.core.count("conntrack_expiries")
            self.swept(began, planned, full=False)
        finally:
            self.sweeping = None

    async def _dump(self) -> tuple[frozenset[FlowKey], int, float]:
        """A full sweep's dump, read on the loop a slice at a time (conntrack.DUMP_SLICE
        datagrams), what is ready served between slices: our live flows, the slices and the
        seconds the loop spent in them."""
        assert self.conntrack is not None
        dump = self.conntrack.start_dump()
        slices, spent = 0, 0.0
        try:
            while True:
                started = time.perf_counter()
                with self.stalls.step("conntrack sweep: dump"):
                    state = dump.step()
                spent += time.perf_counter() - started
                slices += 1
                if state == "done":
                    return dump.live, slices, spent
                if state == "wait":
                    await readable(dump.fileno(), DUMP_WAIT)
                else:
                    await asyncio.sleep(0)
        finally:
            dump.close()

    async def _sweep(self, began: float) -> None:
        try:
            assert self.conntrack is not None
            planned = self.next_sweep
            try:
                live, slices, spent = await self._dump()
            except Exception as exc:
                log.error("conntrack sweep failed: %s: %s", type(exc).__name__, exc)
                self.core.count("conntrack_errors")
                self.retry_sweep()
                return
            dumped = time.monotonic()
            steps = self.core.sweep_resync(live)
            while True:
                try:
                    with self.stalls.step("conntrack sweep: resync"):
                        done = steps.step(time.monotonic())
                except Exception as exc:  # a bug: the next sweep, soon, tries again
                    log.error("conntrack sweep failed: %s: %s", type(exc).__name__, exc)
                    self.core.count("conntrack_errors")
                    self.retry_sweep()
                    return
                if done:
                    break
                await asyncio.sleep(0)  # what is ready (first packets) runs between slices
            log.info(
                "conntrack sweep: %d live flows of ours; dump %.3f s (%d slices on the loop, %.3f s), resync %.3f s",
                len(live),
                dumped - began,
                slices,
                spent,
                time.monotonic() - dumped,
                extra=fields(event="conntrack_sweep", flows=len(live)),
            )
            self.swept(began, planned, full=True)
        finally:
            self.core.sweep_done()
            self.sweeping = None

    def full_sweeps_needed(self) -> bool:
        """The core's answer, and always while the kernel sends no conntrack events
        (`nf_conntrack_events` 0: no flow's end is ever reported)."""
        return not conntrack.events_enabled() or self.core.full_sweeps_needed()

    def freeze_grown(self) -> None:
        """The table grew by a quarter since the last freeze: collect, then freeze (GC_THRESHOLDS)."""
        size = len(self.core.table)
        if size >= FREEZE_MIN and size >= FREEZE_GROWTH * self.frozen_at:
            gc.collect()
            gc.freeze()
            self.frozen_at = size

    def can_offload(self) -> bool:
        """Whether a device our filters are on takes tc filters into hardware now (hw-tc-offload
        on; label routes are never offloaded): without one, no object of ours is in hardware."""
        for qdisc in qdiscs(self.config):
            feature = ethtool.feature(qdisc.dev, node_setup.TC_OFFLOAD)
            if feature is not None and feature.active:
                return True
        return False

    def offload_states(self, now: float) -> dict[str, int]:
        """The counts of the latest background dump (daemon.offload_sampler), never a dump on
        the request path; `status_details` says their age."""
        return self.offload.counts()

    def worker_status(self, now: float) -> dict[str, Any]:
        """What a worker's supervisor adds up, asked each second for the metrics: the status
        without nftables' counters (the supervisor reads them once) and the batch durations."""
        return {
            **self.status(now),
            "batch_duration": dataclasses.asdict(self.batch_duration.snapshot()),
        }

    def metrics_snapshot(self, now: float) -> MetricsSnapshot:
        return views.metrics_snapshot(
            self.core, now, self.op_results, self.batch_duration.snapshot(), self.offload.counts()
        )

    def end_sessions(self) -> None:
        """Sessions past their persistence timeout: delete their objects and say so in the log."""
        operations, ended = self.core.expire(time.monotonic())
        self.program(operations, "session end")
        for session in ended:
            views.log_end(session, "persistence timeout")

    def check_liveness(self) -> None:
        """Label-aware sessions whose liveness check is due: a session whose liveness filter's
        count stood still a whole persistence timeout ends, the others live on."""
        self._judge_counts(
            self.core.liveness_due(time.monotonic()),
            self.core.on_liveness,
            "label-aware sessions: the liveness filters'",
            "liveness_check_errors",
            "persistence timeout",
        )

    def end_embryonic(self) -> None:
        """TCP sessions past `sessions.embryonic_timeout`: those whose client sent nothing past
        its first packet (a spoofed SYN) end, the others are answered."""
        self._judge_counts(
            self.core.embryonic_due(time.monotonic()),
            self.core.on_embryonic,
            "embryonic sessions: the filters'",
            "embryonic_check_errors",
            "embryonic timeout",
        )

    def _judge_counts(
        self,
        due: Mapping[int, Sequence[Filter]],
        judge: Callable[[Any, list[int | None], float], tuple[list[ops.Operation], list[Session]]],
        what: str,
        errors: str,
        reason: str,
    ) -> None:
        """The kernel says how many packets went through the due sessions' filters (one
        RTM_GETTFILTER each, in one sendmsg); the core judges them and the sessions it ends go.
        A failed query gives no count, so the core keeps them all (counted `errors`)."""
        if not due:
            return
        filters = [f for fs in due.values() for f in fs]
        try:
            counts = self.provider.filter_packets(filters)
        except OSError as exc:
            log.error("%s counts could not be read: %s", what, exc)
            self.core.count(errors)
            counts = [None] * len(filters)
        now = time.monotonic()
        operations, ended = judge(due, counts, now)
        self.program(operations, f"{reason} end")
        for session in ended:
            views.log_end(session, reason)

    def on_health_result(self, pool: str, server: str, result: CheckResult, now: float) -> None:
        """A check's result (from its task): the rise/fall table judges it; the core gets the new
        view, and the servers that went down take their sessions along their policy."""
        event = self.health.observe(pool, server, result, now)
        if event is None:  # no change of state: only the response time is news
            self.core.on_health(HealthView.of(self.health), [], now)
            return
        log.info(
            "server %s %s: %s (pool %s, was %s)",
            server,
            event.new,
            event.reason,
            pool,
            event.old,
            extra=fields(
                event="server_health",
                server=server,
                pool=pool,
                state=str(event.new),
                previous=str(event.old),
                reason=event.reason,
            ),
        )
        before = {s.id: s for s in self.core.table.on_server(server)}  # the sessions on_health may end
        plan = self.core.on_health(HealthView.of(self.health), [event], now)
        if not plan.outcomes:
            return
        results = self.program(plan.ops, f"server {server} down")
        self.program(self.core.commit_failover(plan, results, now), "failed move")
        for outcome in plan.outcomes:
            session = self.core.table.by_id(outcome.session)
            if outcome.action == "reassign" and session is not None:
                views.log_moved(outcome, session)
            else:
                views.log_end(
                    before[outcome.session], outcome.reason if outcome.action == "reset" else "reassign failed"
                )

    def decide(self, batch: list[QueuedPacket], now: float | None = None) -> None:
        """A batch's first packets wait for their sessions' objects only: the verdicts go as soon
        as the kernel took them all, the core's bookkeeping (`commit`) and the fast-path elements
        after the loop stepped aside for what the verdicts woke (`step_aside`); when some
        failed, `commit` judges first. Before the verdicts the clock is read
        twice (issue 15: in the lab's UML guest a reading is a system call)."""
        assert self.queue is not None
        if now is None:
            now = time.monotonic()
        names = self.provider.ifname
        # The batch's parts, named when one of them stalls the loop: each ends where the next
        # begins, one clock reading apiece (the stall witness's clock is time.monotonic too);
        # `now` was read where the batch's step began, before the queue's read.
        laps = self.stalls.laps(now)
        # The routes to the batch's clients, all asked in one sendmsg: each S2C route goes to
        # the balancer's next hop towards its client, which the pure core cannot look up.
        sources = [source_address(p.payload) for p in batch]
        hops = self.provider.routes_to(s for s in sources if s is not None)
        packets = [
            FirstPacket(
                p.queue,
                p.packet_id,
                p.payload,
                names(p.indev) if p.indev else None,
                hops.get(src) if src is not None else None,
            )
            for p, src in zip(batch, sources)
        ]
        plan = self.core.on_packets(packets, now)
        laps.lap("batch: decide")
        applied = self.provider.apply(plan.ops) if plan.ops else []
        took = laps.lap("batch: rtnetlink")
        settled = plan.settled(applied)
        if settled is not None:
            self._send_verdicts(settled, laps)
            self.step_aside()  # what the verdicts woke goes before the bookkeeping below
            laps.lap("batch: step aside")
        results = self.programmed(applied, "new session", took) if plan.ops else []
        commit = self.core.commit(plan, results, now)
        self.program(list(commit.cleanup), "rollback")
        laps.lap("batch: commit")
        if settled is None:
            self._send_verdicts(commit.verdicts, laps)
        # The fast-path elements after the verdicts (design.md, "The kernel fast path"): the
        # first packets waited for their filters and routes only. `admit` holds the sessions
        # whose objects the kernel acknowledged, so no element admits flows to a failed one; an
        # element the kernel refuses is counted, and its session's later flows are queued.
        admit = list(commit.admit)
        failure: OSError | None = None
        try:
            applied = self.provider.apply(admit) if admit else []
        except OSError as exc:  # the packets went: not a failed batch to verdict again
            applied, failure = [], exc
        took = laps.lap("batch: nf_tables")
        if failure is not None:
            log.error("fast path: %d set elements not added: %s", len(admit), failure)
            refused = len(admit)
        else:
            refused = sum(not r.ok for r in self.programmed(applied, "fast path", took)) if admit else 0
        if refused:
            self.core.count("fastpath_errors", refused)
        self.batches += 1
        if self.member is not None:
            self.member.flush()  # the batch's sessions, in one transaction
        for session_id in plan.groups:
            session = self.core.table.by_id(session_id)
            if session is None:
                continue
            if session_id in plan.rekeyed:
                views.log_rekeyed(session)
            else:
                views.log_start(session)
        now = laps.last
        for v, src in zip(commit.verdicts, sources):
            if v.action != Action.ACCEPT:
                allowed, suppressed = self.refusal_lines.allow(v.reason, now)
                if suppressed:
                    log.warning("%d more packets %s: %s (not logged one by one)", suppressed, v.action, v.reason)
                if allowed:
                    log.warning(
                        "packet from %s %s: %s",
                        src,
                        v.action,
                        v.reason,
                        extra=fields(event=f"packet_{v.action}", client=src, reason=v.reason),
                    )

    def _send_verdicts(self, verdicts: Sequence[PacketVerdict], laps: Laps) -> None:
        """The batch's verdicts in one sendmsg, timed as its part `batch: verdicts`."""
        assert self.queue is not None
        self.queue.send_verdicts(nf_verdict(v) for v in verdicts)
        laps.lap("batch: verdicts")

    def reload(self) -> None:
        """SIGHUP: a new configuration without dropping sessions; an invalid one changes nothing."""
        try:
            config = self._share(load_balancer_config(self.config_path))
            self.make_ready(config)
            self.add_qdiscs(config)  # a label-aware interface the reload added
            if self.shard is None:  # a worker's supervisor loaded it before the worker's SIGHUP
                nftables.load(nftables.render(config))
        except (ConfigError, OSError, RuntimeError, node_setup.NodeNotReady) as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc)
            self.core.count("reloads_rejected")
            return
        now = time.monotonic()
        self.core.configure(config, now)
        self.fill_fast_path()
        metrics_changed = config.metrics != self.config.metrics
        self.config = config
        self.health.configure(targets_of(config))
        if self.runner is not None:
            self.runner.configure(probes_of(config))
        self.core.on_health(HealthView.of(self.health), [], now)
        if metrics_changed:
            self.stop_metrics()
            self.start_metrics()
        log.info("configuration reloaded from %s", self.config_path)

    def shutdown(self) -> None:
        """The queue is closed (the ruleset's fail policy applies from now on); by default every
        installed session keeps forwarding."""
        if not self.keep_on_exit:
            ended = [op for s in list(self.core.table) for op in self.core.end(s, time.monotonic(), "shutdown")]
            # Nothing of ours stays: the hold markers of the pairs just released go as well.
            deletes: list[ops.Operation] = [op for op in ended if not isinstance(op, ops.Replace)]
            deletes += self.core.drop_markers()
            self.program(deletes, "shutdown")
            if self.shard is None:
                nftables.remove()
        log.info(
            "balancer stopped; %d sessions %s",
            len(self.core.table),
            "left forwarding" if self.keep_on_exit else "removed",
        )

    # -- control socket -------------------------------------------------------------------------------
    def requests(self) -> dict[str, Request]:
        return {
            **super().requests(),
            "labels": lambda now: {"labels": self.core.labels.stats(now).to_dict()},
            "servers": lambda now: {"servers": views.server_rows(self.core, self.health)},
            "worker_status": self.worker_status,
        }

    def commands(self) -> dict[str, Command]:
        return {
            **super().commands(),
            "drain": lambda req, now: self.set_admin(req, AdminState.DRAINING),
            "enable": lambda req, now: self.set_admin(req, AdminState.ENABLED),
            "weight": self.set_weight,
            "flush": self.flush,
        }

    async def answer(self, request: dict[str, Any]) -> dict[str, Any]:
        """`leave` awaits etcd (the hand-over); the rest as every role's."""
        if request.get("cmd") == "leave":
            return await self.leave_cluster()
        return await super().answer(request)

    async def leave_cluster(self) -> dict[str, Any]:
        """`mplsorch cluster leave`: the member's graceful leave, then the daemon stops (exit 0;
        the kernel's objects stay, as at every stop). Refused, changing nothing, without a
        cluster, while etcd is away, or with nobody to take the sessions."""
        if self.member is None:
            return {
                "error": "this balancer is not a member of a cluster (no cluster: in its configuration)",
                "bad_input": True,
            }
        from orchestrator.cluster.member import LeaveRefused
        from orchestrator.cluster.store import StoreError

        try:
            done = await self.member.leave()
        except LeaveRefused as exc:
            log.warning("cluster leave refused: %s", exc, extra=fields(event="command_refused", cmd="leave"))
            return {"error": f"cluster leave refused: {exc}", "bad_input": True}
        except StoreError as exc:
            # Past the point of no return: what was not handed over goes with the lease, and the
            # members that stay adopt it as after a death.
            log.error("cluster leave failed: %s; stopping: the lease's expiry hands the rest over", exc)
            done = {"error": f"cluster leave failed: {exc}; the daemon stops, its lease's expiry hands the rest over"}
        asyncio.get_running_loop().call_later(0.2, self.flag, "stop")  # after the answer is sent
        return done

    def set_admin(self, request: dict[str, Any], state: AdminState) -> dict[str, Any]:
        answer = commands.set_admin(self.core, request.get("server"), state)
        log.info(
            "server %s %s by the operator (was %s; %d sessions)",
            answer["server"],
            state,
            answer["previous"],
            answer["sessions"],
            extra=fields(event="server_admin", server=answer["server"], admin=str(state)),
        )
        return answer

    def set_weight(self, request: dict[str, Any], now: float) -> dict[str, Any]:
        change = commands.set_weight(self.core, request.get("server"), request.get("weight"), now)
        moved = ", ".join(f"{svc} {share:.1%}" for svc, share in change.moved.items()) or "no maglev service"
        log.info(
            "server %s weight %d (was %d) by the operator; keys moved: %s",
            change.server,
            change.weight,
            change.previous,
            moved,
            extra=fields(event="server_weight", **change.to_dict()),
        )
        return change.to_dict()

    def flush(self, request: dict[str, Any], now: float) -> dict[str, Any]:
        done = commands.flush(self.core, now, request.get("server"), request.get("client"))
        results = self.program(done.ops, "flush")
        for session in done.ended:
            views.log_end(session, "flushed")
        return {
            "flushed": len(done.ended),
            "sessions": [s.id for s in done.ended],
            "errors": sum(not r.ok for r in results),
        }

    def session_views(self, offset: int = 0, limit: int | None = None) -> Iterable[dict[str, Any]]:
        return self.core.table.page_views(offset, limit)

    def session_count(self) -> int:
        return len(self.core.table)

    def status_details(self, now: float) -> dict[str, Any]:
        servers = {s.name: self.core.table.count(server=s.name) for p in self.config.pools for s in p.servers}
        return {
            "services": [s.name for s in self.config.services],
            "sessions": len(self.core.table),
            "sessions_by_state": self.core.sessions_by_state(),
            "sessions_embryonic": self.core.embryonic_count(),
            "servers": servers,
            **views.server_summary(views.server_rows(self.core, self.health)),
            "labels": self.core.labels.stats(now).to_dict(),
            "offload_age_s": self.offload.age(now),
            "queue": views.queue_summary(queue_stats(), self.config.nfqueue.queues),
            **({} if self.member is None else {"cluster": self.member.status()}),
        }
