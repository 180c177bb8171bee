"""`mplsorch run` for the client role: the client agent around the pure core in
core/client_agent.py, on a label-aware client host or client-side edge router.

Sessions are learned in-band: the ingress filters on the balancer links copy each labelled answer's
S2C label into its mark, the label is popped and the packet re-enters on lo, and the ruleset queues
only the first labelled answer of each flow. Per batch: learn (core) -> program the C2S filters
(one netlink batch) -> verdicts (one sendmsg), so the client's next packet already leaves
labelled. Conntrack destroy events end flows; a timer ends sessions. Signals only set flags:
SIGHUP reloads, SIGTERM/SIGINT stop and leave the filters and the ruleset in place.
"""

from __future__ import annotations

import collections
import errno
import itertools
import logging
import time
from typing import Any, Iterable

from orchestrator.capture import nftables
from orchestrator.capture.nfqueue import NF_ACCEPT, QueuedPacket, Verdict
from orchestrator.config.client_model import ClientConfig
from orchestrator.config.load import ConfigError, load_client_config
from orchestrator.core.agent import PREF_LEARN, label_of
from orchestrator.core.client_agent import ClientAgent, ClientSession, imposition_of
from orchestrator.core.events import LabelledPacket
from orchestrator.daemon import node_setup
from orchestrator.daemon.loop import Capture, Daemon, nf_verdict, start_step
from orchestrator.dataplane import ops
from orchestrator.dataplane.provider import Provider
from orchestrator.metrics import MetricsSnapshot, server_snapshot_from

log = logging.getLogger("mplsorch")


def _node_key(obj: ops.DataplaneObject) -> tuple[Any, ...] | None:
    """The identity of one of the agent's node objects (termination route, label-marking filter),
    None for anything else: only these are the agent's to replace or remove."""
    if isinstance(obj, ops.MplsRoute) and obj.dev == "lo" and not obj.via and not obj.out_labels:
        return ("route", obj.label)
    if isinstance(obj, ops.FlowerFilter) and obj.direction == ops.Direction.INGRESS and obj.pref == PREF_LEARN:
        return ("filter", obj.dev, obj.handle)
    return None


def _describe(s: ClientSession) -> str:
    ports = ", ".join(s.view()["ports"])
    return f"{', '.join(s.view()['clients'])} -> {s.vip} ({ports}) c2s {s.c2s} s2c {s.s2c}"


class ClientDaemon(Daemon):
    role = "client"

    def __init__(
        self,
        config_path: str,
        provider: Provider,
        capture: Capture,
        config: ClientConfig | None = None,
        keep_on_exit: bool = True,
    ) -> None:
        super().__init__(config_path, provider, capture)
        self.config: ClientConfig = config or load_client_config(config_path)
        self.control_socket = self.config.node.control_socket
        self.keep_on_exit = keep_on_exit
        self.core: ClientAgent = ClientAgent(self.config)
        self.next_counters = 0.0  # when the filters' counters are sampled next (answer_timeout)

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Node check, node objects, reconcile with the kernel, ruleset, queue: in this order, as
        the server agent's."""
        with start_step("node check"):
            self.make_ready(self.config)
        with start_step("node objects"):
            self.install_node_objects()
        with start_step("conntrack socket"):
            self.conntrack = self.capture.conntrack()
        with start_step("restore from the kernel"):
            now = time.monotonic()
            self.program(self.core.restore(self.provider.dump(), self.conntrack.dump(), now), "reconcile")
        if self.core.sessions:
            log.info("restored %d sessions from the kernel", len(self.core.sessions))
        with start_step("nftables ruleset"):
            nftables.load(nftables.render_client(self.config))
        queue = self.config.nfqueue.queue
        with start_step(f"nfqueue {queue}"):
            self.queue = self.capture.queue(queue, queue)

    def install_node_objects(self) -> None:
        """Bring the node objects to the core's (as the server agent does)."""
        wanted = self.core.node_objects()
        keys = {_node_key(o) for o in wanted}
        stale = [
            ops.Delete(i.obj)
            for i in self.provider.dump()
            if _node_key(i.obj) is not None and _node_key(i.obj) not in keys
        ]
        installs = [ops.Add(o) if isinstance(o, ops.ClsactQdisc) else ops.Replace(o) for o in wanted]
        results = self.provider.apply([*stale, *installs])
        failed = [r for r in results if not r.ok and not (isinstance(r.op, ops.Add) and r.errno == errno.EEXIST)]
        self.op_results["ok"] += len(results) - len(failed)
        self.op_results["error"] += len(failed)
        if failed:
            raise RuntimeError(f"node objects: {len(failed)} of {len(results)} failed, the first: {failed[0]}")

    def running_message(self) -> str:
        first, last = self.config.label_range
        metrics = f", metrics {self.config.metrics.listen}" if self.config.metrics else ""
        return (
            f"client agent running: VIPs {', '.join(str(v) for v in self.config.vips)}, labels {first}-{last}, "
            f"balancer link {', '.join(self.config.balancer)}, queue {self.config.nfqueue.queue}, "
            f"control {self.control_socket}{metrics}"
        )

    async def start_tasks(self) -> None:
        self.start_metrics()

    async def stop_tasks(self) -> None:
        self.stop_metrics()

    def metrics_snapshot(self, now: float) -> MetricsSnapshot:
        """Sessions by state, label pairs of the range in use (one per session) and free, counters."""
        by_state = collections.Counter(str(s.state) for s in self.core.sessions.values())
        in_use = len(self.core.sessions)
        labels = {"in_use": in_use, "free": max(len(self.config.s2c_labels()) - in_use, 0)}
        return server_snapshot_from(
            self.core.counters, by_state, labels, self.op_results, self.batch_duration.snapshot(), role="client"
        )

    # -- the loop's hooks ---------------------------------------------------------------------------
    def decide(self, batch: list[QueuedPacket]) -> None:
        """Learn from a batch of first labelled answers; the verdicts go only after the C2S filters
        are in the kernel."""
        assert self.queue is not None
        packets, unmarked = [], []
        for p in batch:
            label = label_of(p.mark)
            if label is None:
                unmarked.append(Verdict(p.queue, p.packet_id, NF_ACCEPT))
            else:
                packets.append(LabelledPacket(p.queue, p.packet_id, label, p.payload))
        if unmarked:
            self.core.count("unmarked", len(unmarked))
        before = {k: (s, dict(s.filters)) for k, s in self.core.sessions.items()}
        plan = self.core.on_packets(packets, time.monotonic())
        verdicts = self.core.commit(plan, self.program(plan.ops, "C2S filter"))
        self.queue.send_verdicts([*unmarked, *(nf_verdict(v) for v in verdicts)])
        self.log_changes(before, "label changed")

    def log_changes(self, before: dict[int, tuple[ClientSession, dict[Any, ops.FlowerFilter]]], why: str) -> None:
        """Log the sessions that ended (`why`), those learned since `before`, and new filters."""
        now = self.core.sessions
        for s2c, (session, _) in before.items():
            if now.get(s2c) is not session:
                log.info("session end: %s (%s)", _describe(session), why)
        for s2c, session in now.items():
            old = before.get(s2c)
            if old is None or old[0] is not session:
                log.info("session learned: %s", _describe(session))
            elif session.filters.keys() != old[1].keys():
                log.info("session extended: %s", _describe(session))

    def tick(self) -> None:
        now = time.monotonic()
        before = {k: (s, dict(s.filters)) for k, s in self.core.sessions.items()}
        self.program(self.core.tick(now), "session end")
        self.log_changes(before, "persistence timeout")
        if self.config.answer_timeout and now >= self.next_counters:
            # One dump per answer_timeout: the filters' packet counters tell whether answers stopped.
            self.next_counters = now + self.config.answer_timeout
            before = {k: (s, dict(s.filters)) for k, s in self.core.sessions.items()}
            self.program(self.core.on_counters(self.provider.dump()), "session end")
            self.log_changes(before, "answers stopped")
        self.publish()

    def reload(self) -> None:
        """SIGHUP: a new configuration without dropping sessions; an invalid one, or one this node
        is not ready for, changes nothing."""
        try:
            config = load_client_config(self.config_path)
            if config.node.control_socket != self.config.node.control_socket:
                raise ConfigError(self.config_path, None, "node.control_socket", "changes only at a restart")
            if config.nfqueue.queue != self.config.nfqueue.queue:
                raise ConfigError(self.config_path, None, "nfqueue.queue", "changes only at a restart")
            self.make_ready(config)
            nftables.load(nftables.render_client(config))
        except (ConfigError, OSError, RuntimeError, node_setup.NodeNotReady) as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc)
            self.core.count("reloads_rejected")
            return
        before = {k: (s, dict(s.filters)) for k, s in self.core.sessions.items()}
        self.program(self.core.reconfigure(config), "reload")
        self.log_changes(before, "left the configuration")
        metrics_changed = config.metrics != self.config.metrics
        self.config = config
        if metrics_changed:
            self.stop_metrics()
            self.start_metrics()
        try:
            self.install_node_objects()
        except (OSError, RuntimeError) as exc:
            log.error("reload: %s", exc)
            self.core.count("reload_errors")
            return
        log.info("configuration reloaded from %s", self.config_path)

    def shutdown(self) -> None:
        """By default the C2S filters and the ruleset stay: sessions keep crossing the balancer on
        their labels, and new flows' answers pass the queue (bypass)."""
        if not self.keep_on_exit:
            self.program(
                [
                    ops.Delete(i.obj)
                    for i in self.provider.dump()
                    if isinstance(i.obj, ops.FlowerFilter) and imposition_of(i.obj) is not None
                ],
                "shutdown",
            )
            nftables.remove()
        log.info(
            "client agent stopped; %d sessions' C2S filters %s",
            len(self.core.sessions),
            "left in place" if self.keep_on_exit else "removed",
        )

    # -- control socket -------------------------------------------------------------------------------
    def session_views(self, offset: int = 0, limit: int | None = None) -> Iterable[dict[str, Any]]:
        stop = None if limit is None else offset + limit
        return (s.view() for s in itertools.islice(self.core.sessions.values(), offset, stop))

    def session_count(self) -> int:
        return len(self.core.sessions)

    def status_details(self, now: float) -> dict[str, Any]:
        return {
            "vips": [str(v) for v in self.config.vips],
            "range": list(self.config.label_range),
            "balancer_interfaces": list(self.config.balancer),
            "queue": self.config.nfqueue.queue,
            "sessions": len(self.core.sessions),
        }
