"""`mplsorch run` for the balancer role: one asyncio loop around the pure decision core.

capture (NFQUEUE batch) -> analyse + decide (core) -> program (one netlink batch) -> verdicts
(one sendmsg). Conntrack destroy events end flows; a timer ends sessions. Signals only set flags
and wake the loop, which acts on them: SIGHUP reloads, SIGTERM/SIGINT stop.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import Any, Iterable

from orchestrator.analyze.packet import source_address
from orchestrator.capture import nftables
from orchestrator.capture.conntrack import ConntrackListener
from orchestrator.capture.nfqueue import NfQueue, QueuedPacket
from orchestrator.config.load import ConfigError, load_balancer_config
from orchestrator.config.model import BalancerConfig
from orchestrator.core.balancer import Balancer
from orchestrator.core.events import Action, FirstPacket
from orchestrator.daemon import node_setup
from orchestrator.daemon.loop import Daemon, Request, nf_verdict, serve
from orchestrator.dataplane import ops

log = logging.getLogger("mplsorch")


class BalancerDaemon(Daemon):
    role = "balancer"

    def __init__(self, config_path: str, config: BalancerConfig | None = None, keep_on_exit: bool = True) -> None:
        super().__init__(config_path)
        self.config: BalancerConfig = config or load_balancer_config(config_path)
        self.control_socket = self.config.node.control_socket
        self.keep_on_exit = keep_on_exit
        self.core: Balancer = Balancer(self.config, time.monotonic())
        self.batches = 0

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Node check, node objects, reconcile with the kernel, ruleset, queue: in this order, so
        that nothing is touched on a node that is not ready and no first packet is queued before
        the table knows the sessions that survived a restart."""
        self.make_ready(self.config)
        for dev in self.config.interfaces.fabric:
            result = self.provider.apply([ops.Add(ops.ClsactQdisc(dev))])[0]
            if not result.ok and result.errno != errno.EEXIST:
                raise RuntimeError(str(result))
        self.conntrack = ConntrackListener()
        stale = self.core.restore(self.provider.dump(), self.conntrack.dump(), time.monotonic())
        self.program(stale, "reconcile")
        if len(self.core.table):
            log.info("restored %d sessions from the kernel", len(self.core.table))
        nftables.load(nftables.render(self.config))
        first, last = self.config.nfqueue.queues
        self.queue = NfQueue(first, last)

    def running_message(self) -> str:
        return (f"balancer running: {len(self.config.services)} services, queues "
                f"{'-'.join(map(str, self.config.nfqueue.queues))}, control {self.control_socket}")

    # -- the loop's hooks ---------------------------------------------------------------------------
    def tick(self) -> None:
        self.end_sessions()

    def end_sessions(self) -> None:
        """Sessions past their persistence timeout: delete their objects and say so in the log."""
        before = {s.id: s for s in self.core.table}
        self.program(self.core.tick(time.monotonic()), "session end")
        for session_id in before.keys() - {s.id for s in self.core.table}:
            s = before[session_id]
            log.info("session %d end: %s %s -> %s c2s %d s2c %d (persistence timeout)", s.id, s.service,
                     s.key.value, s.server, s.c2s, s.s2c)

    def decide(self, batch: list[QueuedPacket]) -> None:
        assert self.queue is not None
        now = time.monotonic()
        names = self.provider.ifname
        # The routes to the batch's clients, all asked in one sendmsg: each S2C route goes to
        # the balancer's next hop towards its client, which the pure core cannot look up.
        sources = [source_address(p.payload) for p in batch]
        hops = self.provider.routes_to(s for s in sources if s is not None)
        packets = [FirstPacket(p.queue, p.packet_id, p.payload, names(p.indev) if p.indev else None,
                               hops.get(src) if src is not None else None)
                   for p, src in zip(batch, sources)]
        plan = self.core.on_packets(packets, now)
        results = self.program(plan.ops, "new session")
        commit = self.core.commit(plan, results, now)
        self.program(list(commit.cleanup), "rollback")
        self.queue.send_verdicts(nf_verdict(v) for v in commit.verdicts)
        self.batches += 1
        for session_id in plan.groups:
            session = self.core.table.by_id(session_id)
            if session is None:
                continue
            if session_id in plan.rekeyed:
                log.info("session %d rekeyed: %s %s -> %s c2s %d s2c %d client %s", session.id, session.service,
                         session.key.value, session.server, session.c2s, session.s2c, session.clients[-1])
            else:
                log.info("session %d start: %s %s -> %s c2s %d s2c %d", session.id, session.service,
                         session.key.value, session.server, session.c2s, session.s2c)
        for v in commit.verdicts:
            if v.action != Action.ACCEPT:
                log.warning("packet %d %s: %s", v.packet_id, v.action, v.reason)

    def reload(self) -> None:
        """SIGHUP: a new configuration without dropping sessions; an invalid one changes nothing."""
        try:
            config = load_balancer_config(self.config_path)
            self.make_ready(config)
            nftables.load(nftables.render(config))
        except (ConfigError, OSError, RuntimeError, node_setup.NodeNotReady) as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc)
            return
        self.core.configure(config, time.monotonic())
        self.config = config
        log.info("configuration reloaded from %s", self.config_path)

    def shutdown(self) -> None:
        """The queue is closed (the ruleset's fail policy applies from now on); by default every
        installed session keeps forwarding."""
        if not self.keep_on_exit:
            deletes = [op for s in list(self.core.table) for op in self.core.end(s, time.monotonic(), "shutdown")]
            self.program(deletes, "shutdown")
            nftables.remove()
        log.info("balancer stopped; %d sessions %s", len(self.core.table),
                 "left forwarding" if self.keep_on_exit else "removed")

    # -- control socket -------------------------------------------------------------------------------
    def requests(self) -> dict[str, Request]:
        return {**super().requests(), "labels": lambda now: {"labels": self.core.labels.stats(now).to_dict()}}

    def session_views(self) -> Iterable[dict[str, Any]]:
        return (s.view() for s in self.core.table)

    def status_details(self, now: float) -> dict[str, Any]:
        servers = {s.name: self.core.table.count(server=s.name) for p in self.config.pools for s in p.servers}
        return {"services": [s.name for s in self.config.services], "sessions": len(self.core.table),
                "servers": servers, "labels": self.core.labels.stats(now).to_dict()}


def run(config_path: str, config: BalancerConfig | None = None) -> int:
    return serve(BalancerDaemon(config_path, config))
