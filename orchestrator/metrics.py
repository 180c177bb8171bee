"""Prometheus metrics: one custom collector that reads an immutable snapshot.

Nothing here is mutated per packet: the daemon keeps its counters where it already does (the
core's `counters`, `op_results`) and hands the collector a callable that returns a
`MetricsSnapshot`. The HTTP endpoint serves from its own thread, so the daemon should build the
snapshot on its loop (on each tick) and publish it through `LatestSnapshot`, whose read is a
single reference load: the scrape never walks the daemon's live dicts.

Conventions (prometheus.io/docs/practices/naming): the `mplsorch_` prefix, `_total` on counters,
base units (seconds), and bounded label values only: states, verdicts, results and reasons from
fixed vocabularies, pool and server names from the configuration. Never a session, a label or a
client address. Families:

    mplsorch_build_info{version}                       1
    mplsorch_sessions{state}                           sessions by state (opening, serving, draining, closing)
    mplsorch_sessions_started_total                    new sessions
    mplsorch_sessions_refused_total{reason}            refusals by admission control
    mplsorch_packets_userspace_total{verdict}          first packets queued to the daemon, by verdict
    mplsorch_fast_path_flows_total                     new flows of a session the kernel admitted (fast path)
    mplsorch_fast_path_unmatched_total{key_kind}       first packets of a session's new client address:
                                                       its key matched what the kernel cannot match
    mplsorch_dataplane_operations_total{result}        kernel operations, ok or error
    mplsorch_dataplane_batch_duration_seconds          histogram of one netlink batch's duration
    mplsorch_label_pairs{state}                        label pairs: free, in_use, held_down
    mplsorch_server_health{pool,server,state}          1 for the server's health state, 0 for the others
    mplsorch_offload_objects{state}                    our filters and routes by what the kernel says of their offload
    mplsorch_offload_refused_total                     filters with offload `required` the kernel would not put in hardware
    mplsorch_malformed_packets_total{reason}           queued packets the analyser refused (both roles)
    mplsorch_errors_total{error}                       failures the daemon survived, by kind (both roles)

The server agent's endpoint serves the families both roles share (build info, sessions by state,
dataplane operations and batches, malformed packets, errors) and its own:

    mplsorch_sessions_learned_total                    sessions learned in-band
    mplsorch_c2s_labels{state}                         C2S labels of labels.block: in_use, free
"""

from __future__ import annotations

import bisect
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from orchestrator import __version__
from orchestrator.analyze.packet import REASONS as MALFORMED_REASONS
from orchestrator.config.model import MetricsConfig
from orchestrator.dataplane.ops import OFFLOAD_STATES  # OffloadState.state's words

__all__ = [
    "BATCH_BUCKETS",
    "DurationHistogram",
    "HistogramSnapshot",
    "LatestSnapshot",
    "MetricsEndpoint",
    "MetricsSnapshot",
    "MplsorchCollector",
    "make_registry",
    "server_snapshot_from",
    "snapshot_from",
    "start_metrics_server",
]

SESSION_STATES = ("opening", "serving", "draining", "closing")  # core.sessions.State
VERDICTS = ("accept", "drop", "refuse")  # core.events.Action
OP_RESULTS = ("ok", "error")
LABEL_STATES = ("free", "in_use", "held_down")
HEALTH_STATES = ("unknown", "up", "down")  # core.health.HealthState
KEY_KINDS = ("client-ip", "five-tuple", "mip6-home-address", "ipv6-iid", "esp-spi")  # analyze.keys.SessionKeyKind
REFUSAL_REASONS = ("service-full", "no-server", "label-headroom", "labels-exhausted")  # core.balancer
SERVER_SESSION_STATES = ("serving", "draining")  # core.agent.State, core.client_agent.State
AGENT_ROLES = ("server", "client")  # the agents: sessions learned in-band
C2S_LABEL_STATES = ("in_use", "free")
# The counters (status --json) of failures a daemon goes on after, one vocabulary for both roles.
ERRORS = (
    "batch_errors",
    "conntrack_errors",
    "queue_overruns",
    "queue_errors",
    "reloads_rejected",
    "reload_errors",
    "route_errors",
    "sessions_failed",
    "rekeys_failed",
    "tick_errors",
)
# A netlink batch takes tens of microseconds to a few hundred milliseconds (a large reconcile).
BATCH_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
MAX_REASONS = 32  # distinct refusal reasons exposed; the rest add up under "other"
_TOKEN_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")  # a word: never an address, a number or a key


def _frozen(m: Mapping[str, int] | None = None) -> Mapping[str, int]:
    return MappingProxyType(dict(m or {}))


@dataclass(frozen=True)
class HistogramSnapshot:
    """Cumulative bucket counts (upper bounds without +Inf), the total count and the sum."""

    bounds: tuple[float, ...] = BATCH_BUCKETS
    cumulative: tuple[int, ...] = (0,) * len(BATCH_BUCKETS)
    count: int = 0
    sum: float = 0.0


class DurationHistogram:
    """A histogram the daemon owns (no global registry): `observe` once per netlink batch."""

    def __init__(self, bounds: Sequence[float] = BATCH_BUCKETS) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("bounds must be distinct and ascending")
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self._sum += seconds

    def snapshot(self) -> HistogramSnapshot:
        cumulative, running = [], 0
        for c in self._counts[:-1]:
            running += c
            cumulative.append(running)
        return HistogramSnapshot(self.bounds, tuple(cumulative), running + self._counts[-1], self._sum)


@dataclass(frozen=True)
class MetricsSnapshot:
    """Everything one scrape shows, taken at one moment on the daemon's loop."""

    sessions: Mapping[str, int] = field(default_factory=_frozen)  # state -> sessions
    sessions_started: int = 0
    refused: Mapping[str, int] = field(default_factory=_frozen)  # reason -> refusals
    packets: Mapping[str, int] = field(default_factory=_frozen)  # verdict -> packets
    dataplane_ops: Mapping[str, int] = field(default_factory=_frozen)  # ok | error -> operations
    batch_duration: HistogramSnapshot = field(default_factory=HistogramSnapshot)
    label_pairs: Mapping[str, int] = field(default_factory=_frozen)  # free | in_use | held_down
    health: tuple[tuple[str, str, str], ...] = ()  # (pool, server, state)
    offload: Mapping[str, int] = field(default_factory=_frozen)  # offload state -> objects
    offload_refused: int = 0
    fast_path_flows: int = 0
    fast_path_unmatched: Mapping[str, int] = field(default_factory=_frozen)  # key kind -> first packets
    malformed: Mapping[str, int] = field(default_factory=_frozen)  # analyser reason -> packets
    errors: Mapping[str, int] = field(default_factory=_frozen)  # one of ERRORS -> count
    role: str = "balancer"  # which families the endpoint serves: the balancer's or the agent's
    sessions_learned: int = 0  # server
    c2s_labels: Mapping[str, int] = field(default_factory=_frozen)  # server: in_use | free


def snapshot_from(
    counters: Mapping[str, int],
    sessions_by_state: Mapping[str, int],
    label_pairs: Mapping[str, Any],
    dataplane_ops: Mapping[str, int],
    batch_duration: HistogramSnapshot | None = None,
    health: Iterable[tuple[str, str, str]] = (),
    offload: Mapping[str, int] | None = None,
) -> MetricsSnapshot:
    """A snapshot from what the balancer daemon already keeps: the core's counters
    (`sessions_started`, `refused:<reason>`, `verdict:<action>`), its sessions counted by state,
    `labels.stats(now).to_dict()` (only free, in_use and held_down are taken: they add up to the
    total), `op_results`, the health table as (pool, server, state) rows and our kernel objects
    counted by offload state (dataplane.offload.counts)."""
    pairs = {k: int(label_pairs[k]) for k in LABEL_STATES if k in label_pairs}
    refused = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("refused:")}
    packets = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("verdict:")}
    unmatched = {k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("fastpath_unmatched:")}
    return MetricsSnapshot(
        _frozen(sessions_by_state),
        int(counters.get("sessions_started", 0)),
        _frozen(refused),
        _frozen(packets),
        _frozen(dataplane_ops),
        batch_duration or HistogramSnapshot(),
        _frozen(pairs),
        tuple(health),
        _frozen(offload),
        int(counters.get("offload_refused", 0)),
        int(counters.get("flows_fast_path", 0)),
        _frozen(unmatched),
        _malformed(counters),
        _errors(counters),
    )


def server_snapshot_from(
    counters: Mapping[str, int],
    sessions_by_state: Mapping[str, int],
    c2s_labels: Mapping[str, int],
    dataplane_ops: Mapping[str, int],
    batch_duration: HistogramSnapshot | None = None,
    role: str = "server",
) -> MetricsSnapshot:
    """The server agent's snapshot (and the client agent's, `role` client, the same families: its
    C2S labels are the pairs of the balancer's range): its counters (`sessions_learned`, `malformed:<reason>`, the
    ERRORS), its sessions by state, its C2S labels in use and free, `op_results`."""
    return MetricsSnapshot(
        sessions=_frozen(sessions_by_state),
        dataplane_ops=_frozen(dataplane_ops),
        batch_duration=batch_duration or HistogramSnapshot(),
        malformed=_malformed(counters),
        errors=_errors(counters),
        role=role,
        sessions_learned=int(counters.get("sessions_learned", 0)),
        c2s_labels=_frozen(c2s_labels),
    )


def _malformed(counters: Mapping[str, int]) -> Mapping[str, int]:
    return _frozen({k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("malformed:")})


def _errors(counters: Mapping[str, int]) -> Mapping[str, int]:
    return _frozen({k: int(counters.get(k, 0)) for k in ERRORS})


class LatestSnapshot:
    """The hand-over between the daemon's loop (`update`) and the endpoint's thread (`__call__`)."""

    def __init__(self, snapshot: MetricsSnapshot | None = None) -> None:
        self._snapshot = snapshot or MetricsSnapshot()

    def update(self, snapshot: MetricsSnapshot) -> None:
        self._snapshot = snapshot

    def __call__(self) -> MetricsSnapshot:
        return self._snapshot


def _known(values: Mapping[str, int], known: Sequence[str]) -> list[tuple[str, int]]:
    """Every known value (0 when absent, so series exist from the start); anything else adds up
    under "other", so a label value can never be unbounded."""
    out = {k: 0 for k in known}
    for k, v in values.items():
        key = k if k in out else "other"
        out[key] = out.get(key, 0) + v
    return list(out.items())


def _tokens(values: Mapping[str, int], known: Sequence[str] = (), cap: int = MAX_REASONS) -> list[tuple[str, int]]:
    """Free-form words (refusal reasons): the known ones always, others only if they look like a
    word, at most `cap` in all; the rest add up under "other"."""
    out: dict[str, int] = {k: 0 for k in known}
    for k in sorted(values):
        key = k if _TOKEN_RE.match(k) and (k in out or len(out) < cap) else "other"
        out[key] = out.get(key, 0) + values[k]
    return list(out.items())


class MplsorchCollector(Collector):
    def __init__(self, snapshot: Callable[[], MetricsSnapshot], version: str = __version__) -> None:
        self.snapshot, self.version = snapshot, version

    def describe(self) -> Iterable[Any]:
        """Nothing: registering must not call `snapshot` (the daemon may not have one yet)."""
        return []

    def collect(self) -> Iterator[Any]:
        s = self.snapshot()
        info = GaugeMetricFamily("mplsorch_build_info", "mplsorch build; the value is always 1", labels=["version"])
        info.add_metric([self.version], 1)
        yield info

        sessions = GaugeMetricFamily("mplsorch_sessions", "Sessions in the table, by state", labels=["state"])
        states = SERVER_SESSION_STATES if s.role in AGENT_ROLES else SESSION_STATES
        for state, n in _known(s.sessions, states):
            sessions.add_metric([state], n)
        yield sessions
        yield from self._shared(s)
        if s.role in AGENT_ROLES:
            yield from self._server(s)
        else:
            yield from self._balancer(s)

    def _shared(self, s: MetricsSnapshot) -> Iterator[Any]:
        """The families of both roles beyond sessions: kernel operations, malformed packets, errors."""
        ops = CounterMetricFamily(
            "mplsorch_dataplane_operations", "Kernel (netlink) operations, by result", labels=["result"]
        )
        for result, n in _known(s.dataplane_ops, OP_RESULTS):
            ops.add_metric([result], n)
        yield ops

        h = s.batch_duration
        buckets = [(_le(b), c) for b, c in zip(h.bounds, h.cumulative)] + [("+Inf", h.count)]
        batch = HistogramMetricFamily(
            "mplsorch_dataplane_batch_duration_seconds", "Duration of one netlink batch of operations", unit="seconds"
        )
        batch.add_metric([], buckets, h.sum)
        yield batch

        malformed = CounterMetricFamily(
            "mplsorch_malformed_packets", "Queued packets the analyser refused, by reason", labels=["reason"]
        )
        for reason, n in _tokens(s.malformed, sorted(MALFORMED_REASONS)):
            malformed.add_metric([reason], n)
        yield malformed

        errors = CounterMetricFamily(
            "mplsorch_errors", "Failures the daemon logged and went on after, by kind", labels=["error"]
        )
        for kind, n in _known(s.errors, ERRORS):
            errors.add_metric([kind], n)
        yield errors

    def _server(self, s: MetricsSnapshot) -> Iterator[Any]:
        yield CounterMetricFamily(
            "mplsorch_sessions_learned", "Sessions learned in-band from their first packet", value=s.sessions_learned
        )
        labels = GaugeMetricFamily(
            "mplsorch_c2s_labels", "C2S labels of labels.block, by state (in use: a session's)", labels=["state"]
        )
        for state, n in _known(s.c2s_labels, C2S_LABEL_STATES):
            labels.add_metric([state], n)
        yield labels

    def _balancer(self, s: MetricsSnapshot) -> Iterator[Any]:
        yield CounterMetricFamily("mplsorch_sessions_started", "New sessions started", value=s.sessions_started)

        refused = CounterMetricFamily(
            "mplsorch_sessions_refused", "New sessions refused by admission control, by reason", labels=["reason"]
        )
        for reason, n in _tokens(s.refused, REFUSAL_REASONS):
            refused.add_metric([reason], n)
        yield refused

        packets = CounterMetricFamily(
            "mplsorch_packets_userspace", "First packets queued to the daemon, by verdict", labels=["verdict"]
        )
        for verdict, n in _known(s.packets, VERDICTS):
            packets.add_metric([verdict], n)
        yield packets

        yield CounterMetricFamily(
            "mplsorch_fast_path_flows",
            "New flows of existing sessions the kernel admitted without the daemon (fast path)",
            value=s.fast_path_flows,
        )
        unmatched = CounterMetricFamily(
            "mplsorch_fast_path_unmatched",
            "First packets of an existing session "
            "from a new client address, which the kernel cannot match, by key kind",
            labels=["key_kind"],
        )
        for kind, n in _known(s.fast_path_unmatched, KEY_KINDS):
            unmatched.add_metric([kind], n)
        yield unmatched

        labels = GaugeMetricFamily(
            "mplsorch_label_pairs",
            "Session label pairs (C2S odd, S2C = C2S + 1) of the pool, by state",
            labels=["state"],
        )
        for state, n in _known(s.label_pairs, LABEL_STATES):
            labels.add_metric([state], n)
        yield labels

        health = GaugeMetricFamily(
            "mplsorch_server_health",
            "Health check state of a server in a pool: 1 for its state, 0 for the others",
            labels=["pool", "server", "state"],
        )
        for pool, server, current in s.health:
            for state in HEALTH_STATES:
                health.add_metric([pool, server, state], 1 if state == current else 0)
        yield health

        objects = GaugeMetricFamily(
            "mplsorch_offload_objects",
            "Our tc filters and routes, by what the kernel says of their hardware offload",
            labels=["state"],
        )
        for state, n in _known(s.offload, OFFLOAD_STATES):
            objects.add_metric([state], n)
        yield objects

        yield CounterMetricFamily(
            "mplsorch_offload_refused",
            "Filters with interfaces.offload `required` that "
            "the kernel would not put in hardware (their sessions failed)",
            value=s.offload_refused,
        )


def _le(bound: float) -> str:
    return repr(float(bound))


def make_registry(snapshot: Callable[[], MetricsSnapshot], version: str = __version__) -> CollectorRegistry:
    """A registry of our own (not prometheus_client's global one) holding only our collector."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(MplsorchCollector(snapshot, version))
    return registry


@dataclass
class MetricsEndpoint:
    """The running HTTP endpoint (prometheus_client's server in a daemon thread)."""

    server: Any
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def start_metrics_server(config: MetricsConfig, registry: CollectorRegistry) -> MetricsEndpoint:
    """Serve `registry` on `config.host`:`config.port` (IPv6 too); port 0 picks a free port."""
    server, thread = start_http_server(config.port, addr=config.host, registry=registry)
    return MetricsEndpoint(server, thread)
