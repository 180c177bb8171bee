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
import logging
import time
from typing import Any

from orchestrator.capture import nftables
from orchestrator.capture.nfqueue import QueuedPacket
from orchestrator.config.load import load_server_config
from orchestrator.config.server import ServerConfig
from orchestrator.core.agent import RULE_PRIORITY, ReturnSession, ServerAgent
from orchestrator.daemon.agent import AgentDaemon, node_key
from orchestrator.daemon.loop import Capture, nf_verdict, start_step
from orchestrator.dataplane import ops
from orchestrator.dataplane.provider import Provider
from orchestrator.metrics import MetricsSnapshot, server_snapshot_from

log = logging.getLogger("mplsorch")


def _describe(s: ReturnSession) -> str:
    return f"{s.client} -> {s.vip} c2s {s.c2s} s2c {s.s2c}"


class ServerDaemon(AgentDaemon):
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

    def setup(self) -> None:
        """The agent's start (AgentDaemon.setup), after asking the kernel whether it has nexthop
        objects: without, return routes are plain encap routes (said once in the log)."""
        with start_step("nexthop objects"):
            supported = self.provider.supports_nexthops()
        if not supported:
            self.core.nexthops = False
            self._nexthops_off("the kernel has no nexthop objects (RTM_GETNEXTHOP: EOPNOTSUPP)")
        super().setup()

    def _nexthops_off(self, why: str) -> None:
        log.warning(
            "%s: S2C return routes are plain encap routes (the kernel's insert of those slows with "
            "their number: docs/design.md, The server agent)",
            why,
        )

    def load_config(self, path: str) -> ServerConfig:
        return load_server_config(path)

    def render_ruleset(self, config: ServerConfig) -> str:
        return nftables.render_server(config)

    def node_key(self, obj: ops.DataplaneObject) -> tuple[Any, ...] | None:
        """An agent's node objects, and the server's VIP rules."""
        if isinstance(obj, ops.Rule) and obj.priority == RULE_PRIORITY:
            return ("rule", obj.src, obj.table)
        return node_key(obj)

    def running_message(self) -> str:
        first, last = self.config.block
        metrics = f", metrics {self.config.metrics.listen}" if self.config.metrics else ""
        return (
            f"server agent running: VIPs {', '.join(str(v.address) for v in self.config.vips)}, "
            f"labels {first}-{last}, queue {self.config.nfqueue.queue}, control {self.control_socket}{metrics}"
        )

    def metrics_snapshot(self, now: float) -> MetricsSnapshot:
        """Sessions by state, C2S labels in use (one per session) and free, and the counters."""
        by_state = collections.Counter(str(s.state) for s in self.core.sessions.values())
        in_use = len(self.core.sessions)
        labels = {"in_use": in_use, "free": max(len(self.config.c2s_labels()) - in_use, 0)}
        return server_snapshot_from(
            self.core.counters, by_state, labels, self.op_results, self.batch_duration.snapshot()
        )

    # -- the loop's hooks ---------------------------------------------------------------------------
    def decide(self, batch: list[QueuedPacket], now: float | None = None) -> None:
        """Learn from a batch of first packets; the verdicts go only after the return routes are
        in the kernel. A queued packet without our mark (the ruleset queues none) is let go."""
        assert self.queue is not None
        packets, unmarked = self.labelled(batch)
        before = self.sessions_before()
        plan = self.core.on_packets(packets, time.monotonic() if now is None else now)
        nexthops = self.core.nexthops
        verdicts = self.core.commit(plan, self.program(plan.ops, "return route"))
        if nexthops and not self.core.nexthops:
            self._nexthops_off("a nexthop object was refused as not supported (EOPNOTSUPP)")
            self.core.commit(plan, self.program(self.core.retry_ops(), "return route"))
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

    def shutdown(self) -> None:
        """By default the return routes and the ruleset stay: sessions keep answering labelled,
        and new flows pass the queue (bypass) and are answered as plain IP."""
        if not self.keep_on_exit:
            dumped = [i.obj for i in self.provider.dump()]
            routes: list[ops.Operation] = [
                ops.Delete(o) for o in dumped if isinstance(o, (ops.EncapRoute, ops.NexthopRoute))
            ]
            nexthops: list[ops.Operation] = [ops.Delete(o) for o in dumped if isinstance(o, ops.EncapNexthop)]
            self.program(routes + nexthops, "shutdown")
            nftables.remove()
        log.info(
            "server agent stopped; %d sessions' return routes %s",
            len(self.core.sessions),
            "left in place" if self.keep_on_exit else "removed",
        )

    # -- control socket -------------------------------------------------------------------------------
    def status_details(self, now: float) -> dict[str, Any]:
        return {
            "vips": [str(v.address) for v in self.config.vips],
            "block": list(self.config.block),
            "queue": self.config.nfqueue.queue,
            "sessions": len(self.core.sessions),
        }
