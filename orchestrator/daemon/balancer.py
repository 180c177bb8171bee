"""`mplsorch run` for the balancer role: one asyncio loop around the pure decision core.

capture (NFQUEUE batch) -> analyse + decide (core) -> program (one netlink batch) -> verdicts
(one sendmsg). Conntrack destroy events end flows; a timer ends sessions. Signals only set flags
and wake the loop, which acts on them: SIGHUP reloads, SIGTERM/SIGINT stop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import time
from typing import Any

from orchestrator.capture import nftables
from orchestrator.capture.conntrack import ConntrackListener
from orchestrator.capture.nfqueue import NF_ACCEPT, NF_DROP, NF_REPEAT, NfQueue, Verdict
from orchestrator.config.load import ConfigError, load_balancer_config
from orchestrator.config.model import BalancerConfig
from orchestrator.core.balancer import Balancer
from orchestrator.core.events import Action, FirstPacket
from orchestrator.daemon.loop import Daemon
from orchestrator.dataplane import ops

log = logging.getLogger("mplsorch")


class BalancerDaemon(Daemon):
    def __init__(self, config_path: str, keep_on_exit: bool = True) -> None:
        super().__init__(config_path)
        self.config: BalancerConfig = load_balancer_config(config_path)
        self.control_socket = self.config.node.control_socket
        self.keep_on_exit = keep_on_exit
        self.core: Balancer = Balancer(self.config, time.monotonic())
        self.batches = 0

    # -- setup ------------------------------------------------------------------------------------
    def setup(self) -> None:
        """Node objects, reconcile with the kernel, ruleset, queue: in this order, so that no
        first packet is queued before the table knows the sessions that survived a restart."""
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

    def on_packets(self) -> None:
        assert self.queue is not None
        batch = self.queue.read_batch(self.config.nfqueue.batch)
        if not batch:
            return
        try:
            self._decide(batch)
        except Exception:  # a bug must not strand queued packets: let them go, loudly
            log.exception("first-packet batch failed; accepting its %d packets unlabelled", len(batch))
            self.core.counters["batch_errors"] += 1
            self.queue.send_verdicts(Verdict(p.queue, p.packet_id, NF_ACCEPT) for p in batch)

    def _decide(self, batch: list) -> None:  # type: ignore[type-arg]
        assert self.queue is not None
        now = time.monotonic()
        names = self.provider.ifname
        packets = [FirstPacket(p.queue, p.packet_id, p.payload, names(p.indev) if p.indev else None)
                   for p in batch]
        plan = self.core.on_packets(packets, now)
        results = self.program(plan.ops, "new session")
        commit = self.core.commit(plan, results, now)
        self.program(list(commit.cleanup), "rollback")
        self.queue.send_verdicts(_nf_verdict(v) for v in commit.verdicts)
        self.batches += 1
        for session_id in plan.groups:
            session = self.core.table.by_id(session_id)
            if session is not None:
                log.info("session %d start: %s %s -> %s c2s %d s2c %d", session.id, session.service,
                         session.key.value, session.server, session.c2s, session.s2c)
        for v in commit.verdicts:
            if v.action != Action.ACCEPT:
                log.warning("packet %d %s: %s", v.packet_id, v.action, v.reason)

    def reload(self) -> None:
        """SIGHUP: a new configuration without dropping sessions; an invalid one changes nothing."""
        try:
            config = load_balancer_config(self.config_path)
            nftables.load(nftables.render(config))
        except (ConfigError, OSError, RuntimeError) as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc)
            return
        self.core.configure(config, time.monotonic())
        self.config = config
        log.info("configuration reloaded from %s", self.config_path)

    def shutdown(self) -> None:
        """Stop taking packets (the ruleset's fail policy applies from now on); by default every
        installed session keeps forwarding."""
        if self.queue is not None:
            self.queue.close()
        if self.conntrack is not None:
            self.conntrack.close()
        if not self.keep_on_exit:
            deletes = [op for s in list(self.core.table) for op in self.core.end(s, time.monotonic(), "shutdown")]
            self.program(deletes, "shutdown")
            nftables.remove()
        self.provider.close()
        log.info("balancer stopped; %d sessions %s", len(self.core.table),
                 "left forwarding" if self.keep_on_exit else "removed")

    # -- control socket -------------------------------------------------------------------------------
    def handle_request(self, request: dict[str, Any]) -> dict[str, Any]:
        cmd = request.get("cmd")
        now = time.monotonic()
        if cmd == "sessions":
            return {"sessions": [_session_json(s.view(), now) for s in self.core.table]}
        if cmd == "labels":
            return {"labels": self.core.labels.stats(now).to_dict()}
        if cmd == "routes":
            return {"routes": [{"object": i.obj.describe(), "kind": type(i.obj).__name__,
                                "offload": i.offload.describe()} for i in self.provider.dump()]}
        if cmd == "status":
            servers = {s.name: self.core.table.count(server=s.name) for p in self.config.pools for s in p.servers}
            return {"role": "balancer", "pid": os.getpid(), "uptime_s": round(time.time() - self.started, 1),
                    "services": [s.name for s in self.config.services], "sessions": len(self.core.table),
                    "servers": servers, "labels": self.core.labels.stats(now).to_dict(),
                    "counters": dict(self.core.counters), "dataplane_ops": dict(self.op_results),
                    "nft_counters": nftables.counters()}
        return {"error": f"unknown command {cmd!r}"}


def _session_json(view: dict[str, Any], now: float) -> dict[str, Any]:
    """Times as Unix seconds (the core keeps monotonic time)."""
    shift = time.time() - now
    out = dict(view)
    for key in ("created", "last_seen", "ends_at"):
        if out.get(key) is not None:
            out[key] = round(out[key] + shift, 3)
    return out


def _nf_verdict(v) -> Verdict:  # type: ignore[no-untyped-def]
    if v.action == Action.ACCEPT:
        return Verdict(v.queue, v.packet_id, NF_ACCEPT)
    if v.action == Action.REFUSE:
        mark = nftables.MARK_RST if v.refuse_with == "rst" else nftables.MARK_ICMP
        return Verdict(v.queue, v.packet_id, NF_REPEAT, mark)
    return Verdict(v.queue, v.packet_id, NF_DROP)


def run(config_path: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s mplsorch %(levelname)s %(message)s")
    daemon = BalancerDaemon(config_path)
    return asyncio.run(daemon.run())
