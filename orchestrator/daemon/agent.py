"""What the server and client agents' daemons share. Both learn their sessions in-band: ingress
filters copy a packet's session label into its mark, a route pops it on lo, the agent's ruleset
queues the first packet of each flow, and the agent installs its half of the session (the server
its S2C return route, the client its C2S filter) before the verdict. Their node objects, start,
reload, batch split and control-socket rows are the same; `server.py` and `client.py` keep what
differs (the core, the ruleset, what a session's log line says).
"""

from __future__ import annotations

import errno
import itertools
import logging
import time
from typing import Any, Iterable

from orchestrator.capture import nftables
from orchestrator.capture.nfqueue import NF_ACCEPT, QueuedPacket, Verdict
from orchestrator.config.load import ConfigError
from orchestrator.core.agent import PREF_LEARN, label_of
from orchestrator.core.events import LabelledPacket
from orchestrator.daemon import node_setup
from orchestrator.daemon.loop import Daemon, start_step
from orchestrator.dataplane import ops

log = logging.getLogger("mplsorch")


def node_key(obj: ops.DataplaneObject) -> tuple[Any, ...] | None:
    """The identity of one of an agent's node objects (termination route, label-marking filter),
    None for anything else: only these are the agent's to replace or remove."""
    if isinstance(obj, ops.MplsRoute) and obj.dev == "lo" and not obj.via and not obj.out_labels:
        return ("route", obj.label)
    if isinstance(obj, ops.FlowerFilter) and obj.direction == ops.Direction.INGRESS and obj.pref == PREF_LEARN:
        return ("filter", obj.dev, obj.handle)
    return None


class AgentDaemon(Daemon):
    """The agents' daemon. A subclass sets `core` and `config` and gives `load_config`,
    `render_ruleset` and `log_changes`; `node_key` may know more node objects."""

    core: Any  # core.agent.ServerAgent or core.client_agent.ClientAgent
    config: Any  # their configurations

    def load_config(self, path: str) -> Any:
        """The role's configuration file, loaded (config.load)."""
        raise NotImplementedError

    def render_ruleset(self, config: Any) -> str:
        """The role's nftables ruleset (capture.nftables)."""
        raise NotImplementedError

    def node_key(self, obj: ops.DataplaneObject) -> tuple[Any, ...] | None:
        return node_key(obj)

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
            nftables.load(self.render_ruleset(self.config))
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
        keys = {self.node_key(o) for o in wanted}
        dumped = [i.obj for i in self.provider.dump()]
        installed = set(dumped)
        stale = [ops.Delete(o) for o in dumped if self.node_key(o) is not None and self.node_key(o) not in keys]
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

    async def start_tasks(self) -> None:
        """The metrics endpoint, before READY."""
        self.start_metrics()

    async def stop_tasks(self) -> None:
        self.stop_metrics()

    # -- the loop's hooks ---------------------------------------------------------------------------
    def labelled(self, batch: list[QueuedPacket]) -> tuple[list[LabelledPacket], list[Verdict]]:
        """A batch's packets with our mark in it, and the accept verdicts of those without it (the
        ruleset queues none; counted `unmarked`)."""
        packets, unmarked = [], []
        for p in batch:
            label = label_of(p.mark)
            if label is None:
                unmarked.append(Verdict(p.queue, p.packet_id, NF_ACCEPT))
            else:
                packets.append(LabelledPacket(p.queue, p.packet_id, label, p.payload))
        if unmarked:
            self.core.count("unmarked", len(unmarked))
        return packets, unmarked

    def sessions_before(self) -> Any:
        """What `log_changes` compares the sessions with after a change."""
        return dict(self.core.sessions)

    def log_changes(self, before: Any, why: str) -> None:
        raise NotImplementedError

    def reload(self) -> None:
        """SIGHUP: a new configuration without dropping sessions; an invalid one, or one this node
        is not ready for, changes nothing."""
        try:
            config = self.load_config(self.config_path)
            if config.node.control_socket != self.config.node.control_socket:
                raise ConfigError(self.config_path, None, "node.control_socket", "changes only at a restart")
            if config.nfqueue.queue != self.config.nfqueue.queue:
                raise ConfigError(self.config_path, None, "nfqueue.queue", "changes only at a restart")
            self.make_ready(config)
            # The ruleset first: nft takes all of it or nothing, so a refused one leaves the
            # running configuration whole (the reload is synchronous: no packet is decided between).
            nftables.load(self.render_ruleset(config))
        except (ConfigError, OSError, RuntimeError, node_setup.NodeNotReady) as exc:
            log.error("reload rejected, keeping the running configuration: %s", exc)
            self.core.count("reloads_rejected")
            return
        before = self.sessions_before()
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

    # -- control socket -------------------------------------------------------------------------------
    def session_views(self, offset: int = 0, limit: int | None = None) -> Iterable[dict[str, Any]]:
        stop = None if limit is None else offset + limit
        return (s.view() for s in itertools.islice(self.core.sessions.values(), offset, stop))

    def session_count(self) -> int:
        return len(self.core.sessions)
