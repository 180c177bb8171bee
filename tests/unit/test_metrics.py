"""Prometheus exposition: the exact families, names, units and bounded labels, from a snapshot."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from orchestrator import __version__
from orchestrator.config.model import MetricsConfig
from orchestrator.metrics import (
    BATCH_BUCKETS,
    ERRORS,
    MAX_REASONS,
    DurationHistogram,
    HistogramSnapshot,
    LatestSnapshot,
    MetricsSnapshot,
    MplsorchCollector,
    make_registry,
    server_snapshot_from,
    snapshot_from,
    start_metrics_server,
)

FAMILIES = {
    "mplsorch_build_info": "gauge",
    "mplsorch_sessions": "gauge",
    "mplsorch_sessions_started": "counter",
    "mplsorch_sessions_refused": "counter",
    "mplsorch_packets_userspace": "counter",
    "mplsorch_fast_path_flows": "counter",
    "mplsorch_fast_path_unmatched": "counter",
    "mplsorch_dataplane_operations": "counter",
    "mplsorch_dataplane_batch_duration_seconds": "histogram",
    "mplsorch_label_pairs": "gauge",
    "mplsorch_server_health": "gauge",
    "mplsorch_offload_objects": "gauge",
    "mplsorch_offload_refused": "counter",
    "mplsorch_malformed_packets": "counter",
    "mplsorch_errors": "counter",
}
# The server agent's endpoint: the families both roles share, and its own.
SERVER_FAMILIES = {
    "mplsorch_build_info": "gauge",
    "mplsorch_sessions": "gauge",
    "mplsorch_dataplane_operations": "counter",
    "mplsorch_dataplane_batch_duration_seconds": "histogram",
    "mplsorch_malformed_packets": "counter",
    "mplsorch_errors": "counter",
    "mplsorch_sessions_learned": "counter",
    "mplsorch_c2s_labels": "gauge",
}


def sample_snapshot() -> MetricsSnapshot:
    h = DurationHistogram()
    for seconds in (0.0002, 0.0005, 0.004, 3.0):
        h.observe(seconds)
    counters = {
        "packets_userspace": 12,
        "sessions_started": 9,
        "refused:no-server": 2,
        "refused:label-headroom": 1,
        "verdict:accept": 9,
        "verdict:drop": 1,
        "verdict:refuse": 3,
        "malformed:truncated": 1,
        "sessions_ended": 4,
        "offload_refused": 2,
    }
    return snapshot_from(
        counters,
        {"serving": 4, "draining": 1},
        {"free": 490, "in_use": 5, "held_down": 4},
        {"ok": 40, "error": 2},
        h.snapshot(),
        [("web", "s1", "up"), ("web", "s2", "down"), ("dns", "s1", "unknown")],
        {"in_hw": 3, "not_in_hw": 7, "trap": 0, "offload_failed": 1},
    )


def exposition(snapshot: MetricsSnapshot) -> str:
    return generate_latest(make_registry(lambda: snapshot)).decode()


def test_exposition_text() -> None:
    text = exposition(sample_snapshot())
    lines = set(text.splitlines())
    for line in [
        f'mplsorch_build_info{{version="{__version__}"}} 1.0',
        "# TYPE mplsorch_sessions gauge",
        'mplsorch_sessions{state="opening"} 0.0',
        'mplsorch_sessions{state="serving"} 4.0',
        'mplsorch_sessions{state="draining"} 1.0',
        'mplsorch_sessions{state="closing"} 0.0',
        "# TYPE mplsorch_sessions_started_total counter",
        "mplsorch_sessions_started_total 9.0",
        'mplsorch_sessions_refused_total{reason="no-server"} 2.0',
        'mplsorch_sessions_refused_total{reason="label-headroom"} 1.0',
        'mplsorch_sessions_refused_total{reason="service-full"} 0.0',
        'mplsorch_sessions_refused_total{reason="labels-exhausted"} 0.0',
        'mplsorch_packets_userspace_total{verdict="accept"} 9.0',
        'mplsorch_packets_userspace_total{verdict="drop"} 1.0',
        'mplsorch_packets_userspace_total{verdict="refuse"} 3.0',
        'mplsorch_dataplane_operations_total{result="ok"} 40.0',
        'mplsorch_dataplane_operations_total{result="error"} 2.0',
        "# TYPE mplsorch_dataplane_batch_duration_seconds histogram",
        'mplsorch_dataplane_batch_duration_seconds_bucket{le="0.0001"} 0.0',
        'mplsorch_dataplane_batch_duration_seconds_bucket{le="0.00025"} 1.0',
        'mplsorch_dataplane_batch_duration_seconds_bucket{le="0.0005"} 2.0',  # le is inclusive
        'mplsorch_dataplane_batch_duration_seconds_bucket{le="0.005"} 3.0',
        'mplsorch_dataplane_batch_duration_seconds_bucket{le="2.5"} 3.0',
        'mplsorch_dataplane_batch_duration_seconds_bucket{le="+Inf"} 4.0',
        "mplsorch_dataplane_batch_duration_seconds_count 4.0",
        'mplsorch_label_pairs{state="free"} 490.0',
        'mplsorch_label_pairs{state="in_use"} 5.0',
        'mplsorch_label_pairs{state="held_down"} 4.0',
        'mplsorch_server_health{pool="web",server="s1",state="up"} 1.0',
        'mplsorch_server_health{pool="web",server="s1",state="down"} 0.0',
        'mplsorch_server_health{pool="web",server="s2",state="down"} 1.0',
        'mplsorch_server_health{pool="dns",server="s1",state="unknown"} 1.0',
        "# TYPE mplsorch_offload_objects gauge",
        'mplsorch_offload_objects{state="in_hw"} 3.0',
        'mplsorch_offload_objects{state="not_in_hw"} 7.0',
        'mplsorch_offload_objects{state="trap"} 0.0',
        'mplsorch_offload_objects{state="offload_failed"} 1.0',
        "# TYPE mplsorch_offload_refused_total counter",
        "mplsorch_offload_refused_total 2.0",
    ]:
        assert line in lines, f"{line!r} missing from:\n{text}"
    sum_line = next(x for x in lines if x.startswith("mplsorch_dataplane_batch_duration_seconds_sum "))
    assert float(sum_line.split()[1]) == pytest.approx(3.0047)


def test_exactly_the_listed_families_with_prefix_total_and_base_units() -> None:
    families = list(text_string_to_metric_families(exposition(sample_snapshot())))
    assert {f.name: f.type for f in families} == FAMILIES
    for f in families:
        for s in f.samples:
            assert s.name.startswith("mplsorch_")
            if f.type == "counter":
                assert s.name.endswith("_total"), s.name
            assert "milliseconds" not in s.name and "_ms" not in s.name


def test_snapshot_from_the_label_allocator_stats() -> None:
    """`labels.stats(now).to_dict()` goes in as it is: its total and blocks are not label states."""
    from orchestrator.core.labels import LabelStats

    stats = LabelStats(10, 3, 2, 5).to_dict()
    snap = snapshot_from({}, {}, stats, {})
    assert dict(snap.label_pairs) == {"free": 5, "in_use": 3, "held_down": 2}
    assert 'mplsorch_label_pairs{state="other"}' not in exposition(snap)


def test_label_values_are_bounded() -> None:
    """No address, label number or session can become a label value, and free-form reasons are
    capped: unknown values add up under "other"."""
    reasons = {f"reason{i:03d}": 1 for i in range(MAX_REASONS * 3)}
    reasons.update({"10.0.0.7": 5, "fd00::1": 5, "1001": 5, "Session 42": 5})
    snap = MetricsSnapshot(
        refused=reasons,
        packets={"accept": 1, "weird:verdict": 2},
        sessions={"serving": 1, "bogus": 3},
        dataplane_ops={"ok": 1, "EEXIST": 1},
    )
    families = {f.name: f for f in text_string_to_metric_families(exposition(snap))}
    refused = {s.labels["reason"]: s.value for s in families["mplsorch_sessions_refused"].samples}
    assert len(refused) <= MAX_REASONS + 1
    assert sum(refused.values()) == sum(reasons.values())
    assert refused["other"] >= 20
    values = [v for f in families.values() for s in f.samples for v in s.labels.values()]
    for bad in ("10.0.0.7", "fd00::1", "1001", "Session 42", "weird:verdict", "bogus", "EEXIST"):
        assert bad not in values
    packets = {s.labels["verdict"]: s.value for s in families["mplsorch_packets_userspace"].samples}
    assert packets == {"accept": 1, "drop": 0, "refuse": 0, "other": 2}


def test_empty_snapshot_has_every_series_at_zero() -> None:
    families = {f.name: f for f in text_string_to_metric_families(exposition(MetricsSnapshot()))}
    assert set(families) == set(FAMILIES)
    assert len(families["mplsorch_sessions"].samples) == 4
    assert len(families["mplsorch_dataplane_batch_duration_seconds"].samples) == len(BATCH_BUCKETS) + 3
    assert families["mplsorch_server_health"].samples == []
    assert [(x.labels["state"], x.value) for x in families["mplsorch_offload_objects"].samples] == [
        ("in_hw", 0),
        ("not_in_hw", 0),
        ("trap", 0),
        ("offload_failed", 0),
    ]


def test_histogram_accumulates_without_a_global_registry() -> None:
    h = DurationHistogram((0.1, 1.0))
    assert h.snapshot() == HistogramSnapshot((0.1, 1.0), (0, 0), 0, 0.0)
    for s in (0.05, 0.1, 0.5, 7.0):
        h.observe(s)
    assert h.snapshot() == HistogramSnapshot((0.1, 1.0), (2, 3), 4, pytest.approx(7.65))
    with pytest.raises(ValueError):
        DurationHistogram((1.0, 0.1))


def test_registering_does_not_call_the_snapshot() -> None:
    calls = []

    def snapshot() -> MetricsSnapshot:
        calls.append(1)
        return MetricsSnapshot()

    registry = make_registry(snapshot)
    assert calls == []
    generate_latest(registry)
    assert calls == [1]
    assert list(MplsorchCollector(snapshot, "9.9").describe()) == []


def test_endpoint_serves_the_latest_snapshot() -> None:
    latest = LatestSnapshot()
    endpoint = start_metrics_server(MetricsConfig("127.0.0.1", 0), make_registry(latest))
    try:
        url = f"http://127.0.0.1:{endpoint.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as answer:
            assert answer.status == 200 and "mplsorch_sessions_started_total 0.0" in answer.read().decode()
        latest.update(sample_snapshot())
        with urllib.request.urlopen(url, timeout=5) as answer:
            body = answer.read().decode()
        assert "mplsorch_sessions_started_total 9.0" in body
        assert 'mplsorch_server_health{pool="web",server="s2",state="down"} 1.0' in body
    finally:
        endpoint.close()


def test_the_server_agents_endpoint_serves_its_families_only() -> None:
    counters = {"sessions_learned": 4, "malformed:truncated-tcp": 2, "route_errors": 1, "queue_overruns": 3}
    snap = server_snapshot_from(counters, {"serving": 2, "draining": 1}, {"in_use": 3, "free": 496}, {"ok": 7})
    families = list(text_string_to_metric_families(exposition(snap)))
    assert {f.name: f.type for f in families} == SERVER_FAMILIES
    by_name = {f.name: {tuple(s.labels.values()): s.value for s in f.samples} for f in families}
    assert by_name["mplsorch_sessions"] == {("serving",): 2, ("draining",): 1}
    assert by_name["mplsorch_sessions_learned"] == {(): 4}
    assert by_name["mplsorch_c2s_labels"] == {("in_use",): 3, ("free",): 496}
    assert by_name["mplsorch_malformed_packets"][("truncated-tcp",)] == 2
    assert by_name["mplsorch_malformed_packets"][("empty",)] == 0  # every known reason, from the start
    assert by_name["mplsorch_errors"][("route_errors",)] == 1 and by_name["mplsorch_errors"][("queue_overruns",)] == 3
    assert by_name["mplsorch_dataplane_operations"] == {("ok",): 7, ("error",): 0}


def test_malformed_reasons_and_errors_are_bounded_on_the_balancer_too() -> None:
    counters = {f"malformed:{i}.{i}.0.1": 1 for i in range(40)} | {"malformed:bad-ihl": 2, "batch_errors": 1}
    snap = snapshot_from(counters, {}, {}, {})
    families = {f.name: f for f in text_string_to_metric_families(exposition(snap))}
    malformed = {s.labels["reason"]: s.value for s in families["mplsorch_malformed_packets"].samples}
    assert malformed["bad-ihl"] == 2 and malformed["other"] == 40 and not any("." in k for k in malformed)
    errors = {s.labels["error"]: s.value for s in families["mplsorch_errors"].samples}
    assert errors["batch_errors"] == 1 and set(errors) == set(ERRORS)
