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
import logging
import time
from typing import Any

from orchestrator.capture import nftables
from orchestrator.capture.nfqueue import QueuedPacket
from orchestrator.config.client_model import ClientConfig
from orchestrator.config.load import load_client_config
from orchestrator.core.client_agent import ClientAgent, ClientSession, imposition_of
from orchestrator.daemon.agent import AgentDaemon
from orchestrator.daemon.loop import Capture, nf_verdict
from orchestrator.dataplane import ops
from orchestrator.dataplane.provider import Provider
from orchestrator.metrics import MetricsSnapshot, server_snapshot_from

log = logging.getLogger("mplsorch")


def _describe(s: ClientSession) -> str:
    ports = ", ".join(s.view()["ports"])
    return f"{', '.join(s.view()['clients'])} -> {s.vip} ({ports}) c2s {s.c2s} s2c {s.s2c}"


class ClientDaemon(AgentDaemon):
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

    def load_config(self, path: str) -> ClientConfig:
        return load_client_config(path)

    def render_ruleset(self, config: ClientConfig) -> str:
        return nftables.render_client(config)

    def running_message(self) -> str:
        first, last = self.config.label_range
        metrics = f", metrics {self.config.metrics.listen}" if self.config.metrics else ""
        return (
            f"client agent running: VIPs {', '.join(str(v) for v in self.config.vips)}, labels {first}-{last}, "
            f"balancer link {', '.join(self.config.balancer)}, queue {self.config.nfqueue.queue}, "
            f"control {self.control_socket}{metrics}"
        )

    def metrics_snapshot(self, now: float) -> MetricsSnapshot:
        """Sessions by state, label pairs of the range in use (one per session) and free, counters."""
        by_state = collections.Counter(str(s.state) for s in self.core.sessions.values())
        in_use = len(self.core.sessions)
        labels = {"in_use": in_use, "free": max(len(self.config.s2c_labels()) - in_use, 0)}
        return server_snapshot_from(
            self.core.counters, by_state, labels, self.op_results, self.batch_duration.snapshot(), role="client"
        )

    # -- the loop's hooks ---------------------------------------------------------------------------
    def decide(self, batch: list[QueuedPacket], now: float | None = None) -> None:
        """Learn from a batch of first labelled answers; the verdicts go only after the C2S filters
        are in the kernel."""
        assert self.queue is not None
        packets, unmarked = self.labelled(batch)
        before = self.sessions_before()
        plan = self.core.on_packets(packets, time.monotonic() if now is None else now)
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
        before = self.sessions_before()
        self.program(self.core.tick(now), "session end")
        self.log_changes(before, "persistence timeout")
        if self.config.answer_timeout and now >= self.next_counters:
            # One dump per answer_timeout: the filters' packet counters tell whether answers stopped.
            self.next_counters = now + self.config.answer_timeout
            before = self.sessions_before()
            self.program(self.core.on_counters(self.provider.dump()), "session end")
            self.log_changes(before, "answers stopped")
        self.publish()

    def sessions_before(self) -> dict[int, tuple[ClientSession, dict[Any, ops.FlowerFilter]]]:
        """With each session's filters: a session that gained a client address is logged too."""
        return {k: (s, dict(s.filters)) for k, s in self.core.sessions.items()}

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
    def status_details(self, now: float) -> dict[str, Any]:
        return {
            "vips": [str(v) for v in self.config.vips],
            "range": list(self.config.label_range),
            "balancer_interfaces": list(self.config.balancer),
            "queue": self.config.nfqueue.queue,
            "sessions": len(self.core.sessions),
        }
