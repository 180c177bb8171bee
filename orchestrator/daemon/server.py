"""`mplsorch run` for the server role: the agent around the pure core in core/agent.py.

Sessions are learned in-band: the ingress filters on the fabric links copy each packet's session
label into its mark, the label is popped and the packet re-enters on lo, and the ruleset queues
only the first packet of a new flow to a VIP. Per batch: learn (core) -> program the S2C return
routes (one netlink batch) -> verdicts (one sendmsg), so even the first answer leaves labelled.
Conntrack destroy events end flows; a timer ends sessions. Signals only set flags: SIGHUP
reloads, SIGTERM/SIGINT stop and leave the return routes and the ruleset in place.
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
from orchestrator.config.load import ConfigError, load_server_config
from orchestrator.config.server import ServerConfig
from orchestrator.core.agent import PREF_LEARN, RULE_PRIORITY, ReturnSession, ServerAgent, label_of
from orchestrator.core.events import LabelledPacket
from orchestrator.daemon import node_setup
from orchestrator.daemon.loop import Capture, Daemon, nf_verdict, start_step
from orchestrator.dataplane import ops
from orchestrator.dataplane.provider import Provider
from orchestrator.metrics import MetricsSnapshot, server_snapshot_from

log = logging.getLogger("mplsorch")


def _node_key(obj: ops.DataplaneObject) -> tuple[Any, ...] | None:
    """The identity of one of the agent's node objects (termination route, label-marking filter,
    VIP rule), None for anything else: only these are the agent's to replace or remove."""
    if isinstance(obj, ops.MplsRoute) and obj.dev == "lo" and not obj.via and not obj.out_labels:
        return ("route", obj.label)
    if isinstance(obj, ops.FlowerFilter) and obj.direction == ops.Direction.INGRESS and obj.pref == PREF_LEARN:
        return ("filter", obj.dev, obj.handle)
    if isinstance(obj, ops.Rule) and obj.priority == RULE_PRIORITY:
        return ("rule", obj.src, obj.table)
    return None


def _describe(s: ReturnSession) -> str:
    return f"{s.client} -> {s.vip} c2s {s.c2s} s2c {s.s2c}"


class ServerDaemon(Daemon):
    role = "server"

    def __init__(
        self,
        config_path: str,
        provider: Provider,
        capture: Capture,
        config: ServerConfig | None = None,
        keep_on_exit: bool = True,
    ) -> None:
        super().__init__(config_path, provider, capture)
        self.config: ServerConfig = config or load_server_config(config_path)
        self.control_socket = self.config.node.control_socket
        self.keep_on_exit = keep_on_exit
        self.core: ServerAgent = ServerAgent(self.config)

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Node check, node objects, reconcile with the kernel, ruleset, queue: in this order, so
        that nothing is touched on a node that is not ready and no first packet is queued before
        the core knows the sessions that survived a restart."""
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
            nftables.load(nftables.render_server(self.config))
        queue = self.config.nfqueue.queue
        with start_step(f"nfqueue {queue}"):
            self.queue = self.capture.queue(queue, queue)

    def install_node_objects(self) -> None:
        """Bring the node objects to the core's, the kernel being the source of truth: remove
        ours that are no longer wanted, install the wanted ones the kernel does not hold exactly
        (Replace; Add tolerating EEXIST for the qdisc and the rules, which cannot be replaced) and
        leave the others untouched, so a restart sends the kernel no change for a node whose
        objects are all there (`ip monitor`, `tc monitor` stay silent; no filter is swapped under
        live traffic)."""
        wanted = self.core.node_objects()
        keys = {_node_key(o) for o in wanted}
        dumped = [i.obj for i in self.provider.dump()]
        installed = set(dumped)
        stale = [ops.Delete(o) for o in dumped if _node_key(o) is not None and _node_key(o) not in keys]
        installs = [
            ops.Add(o) if isinstance(o, (ops.ClsactQdisc, ops.Rule)) else ops.Replace(o)
            for o in wanted
            if o not in installed
        ]
        results = self.provider.apply([*stale, *installs])
        failed = [r for r in results if not r.ok and not (isinstance(r.op, ops.Add) and r.errno == errno.EEXIST)]
        self.op_results["ok"] += len(results) - len(failed)
        self.op_results["error"] += len(failed)
        if failed:
            raise RuntimeError(f"node objects: {len(failed)} of {len(results)} failed, the first: {failed[0]}")

    def running_message(self) -> str:
        first, last = self.config.block
        metrics = f", metrics {self.config.metrics.listen}" if self.config.metrics else ""
        return (
            f"server agent running: VIPs {', '.join(str(v.address) for v in self.config.vips)}, "
            f"labels {first}-{last}, queue {self.config.nfqueue.queue}, control {self.control_socket}{metrics}"
        )

    async def start_tasks(self) -> None:
        """The metrics endpoint, before READY."""
        self.start_metrics()

    async def stop_tasks(self) -> None:
        self.stop_metrics()

    def metrics_snapshot(self, now: float) -> MetricsSnapshot:
        """Sessions by state, C2S labels in use (one per session) and free, and the counters."""
        by_state = collections.Counter(str(s.state) for s in self.core.sessions.values())
        in_use = len(self.core.sessions)
        labels = {"in_use": in_use, "free": max(len(self.config.c2s_labels()) - in_use, 0)}
        return server_snapshot_from(
            self.core.counters, by_state, labels, self.op_results, self.batch_duration.snapshot()
        )

    # -- the loop's hooks ---------------------------------------------------------------------------
    def decide(self, batch: list[QueuedPacket]) -> None:
        """Learn from a batch of first packets; the verdicts go only after the return routes are
        in the kernel. A queued packet without our mark (the ruleset queues none) is let go."""
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
        before = dict(self.core.sessions)
        plan = self.core.on_packets(packets, time.monotonic())
        verdicts = self.core.commit(plan, self.program(plan.ops, "return route"))
        self.queue.send_verdicts([*unmarked, *(nf_verdict(v) for v in verdicts)])
        self.log_changes(before, "label reused")

    def log_changes(self, before: dict[int, ReturnSession], why: str) -> None:
        """Log the sessions that ended (`why`) and those learned since `before`."""
        now = self.core.sessions
        for c2s, session in before.items():
            if now.get(c2s) is not session:
                log.info("session end: %s (%s)", _describe(session), why)
        for c2s, session in now.items():
            if before.get(c2s) is not session:
                log.info("session learned: %s", _describe(session))

    def tick(self) -> None:
        before = dict(self.core.sessions)
        self.program(self.core.tick(time.monotonic()), "session end")
        self.log_changes(before, "persistence timeout")
        self.publish()

    def reload(self) -> None:
        """SIGHUP: a new configuration without dropping sessions; an invalid one, or one this node
        is not ready for, changes nothing."""
        try:
            config = load_server_config(self.config_path)
            if config.node.control_socket != self.config.node.control_socket:
                raise ConfigError(self.config_path, None, "node.control_socket", "changes only at a restart")
            if config.nfqueue.queue != self.config.nfqueue.queue:
                raise ConfigError(self.config_path, None, "nfqueue.queue", "changes only at a restart")
            self.make_ready(config)
            # The ruleset first: nft takes all of it or nothing, so a refused one leaves the
            # running configuration whole (the reload is synchronous: no packet is decided between).
            nftables.load(nftables.render_server(config))
        except (ConfigError, OSError, RuntimeError, node_setup.NodeNotReady) as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc)
            self.core.count("reloads_rejected")
            return
        before = dict(self.core.sessions)
        self.program(self.core.reconfigure(config), "reload")
        self.log_changes(before, "its VIP left the configuration")
        metrics_changed = config.metrics != self.config.metrics
        self.config = config
        if metrics_changed:  # the endpoint moves (or starts, or stops) with the file
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
        """By default the return routes and the ruleset stay: sessions keep answering labelled,
        and new flows pass the queue (bypass) and are answered as plain IP."""
        if not self.keep_on_exit:
            self.program(
                [ops.Delete(i.obj) for i in self.provider.dump() if isinstance(i.obj, ops.EncapRoute)], "shutdown"
            )
            nftables.remove()
        log.info(
            "server agent stopped; %d sessions' return routes %s",
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
            "vips": [str(v.address) for v in self.config.vips],
            "block": list(self.config.block),
            "queue": self.config.nfqueue.queue,
            "sessions": len(self.core.sessions),
        }
