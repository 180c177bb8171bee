"""The pure parts of `lab bench setup`: percentiles, ratios, addresses, the flood's pktgen
commands, the parsers of /proc texts, the result and its table."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from orchestrator.lab.bench_setup import (Latency, RateRun, alias_addresses, build_result, chunks,
                                          flood_sources, format_table, ipvs_connections, percentile,
                                          pktgen_chunk, pktgen_result, pktgen_setup, ratio,
                                          softnet_drops, tx_packets)


def test_percentile_interpolates_between_closest_ranks_like_numpy() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1 and percentile(values, 100) == 100
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0  # unsorted input
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_ratio_is_undefined_without_a_positive_reference() -> None:
    assert ratio(10, 4) == 2.5
    assert ratio(1, 0) is None and ratio(1, -0.2) is None


def test_flood_sources_are_consecutive_like_pktgens_walk() -> None:
    sources = flood_sources(200, 1000)
    assert len(set(sources)) == 1000
    assert sources[:2] == ["10.200.0.1", "10.200.0.2"] and sources[255] == "10.200.1.0"
    assert sources[-1] == "10.200.3.232"
    with pytest.raises(ValueError):
        flood_sources(200, 0)


def test_alias_addresses_are_the_first_hosts() -> None:
    assert alias_addresses("10.0.16.0/20", 3) == ["10.0.16.1", "10.0.16.2", "10.0.16.3"]
    assert alias_addresses("10.0.16.0/20", 300)[-1] == "10.0.17.44"


def test_bursts_cover_every_packet_once() -> None:
    assert chunks(5000, 2000) == [(0, 2000), (2000, 2000), (4000, 1000)]
    assert chunks(2000, 2000) == [(0, 2000)] and chunks(1, 2000) == [(0, 1)]


def test_pktgen_commands() -> None:
    setup = dict(pktgen_setup("eth0", "02:00:00:00:00:02", "10.0.0.100"))
    assert setup["kpktgend_0"] == "add_device eth0"  # the later of its two commands
    commands = [c for name, c in pktgen_setup("eth0", "02:00:00:00:00:02", "10.0.0.100") if name == "eth0"]
    assert {"clone_skb 0", "dst 10.0.0.100", "dst_mac 02:00:00:00:00:02", "udp_dst_min 53",
            "udp_dst_max 53"} <= set(commands)
    sources = flood_sources(201, 4000)[2000:]
    assert pktgen_chunk("eth0", sources) == [("eth0", "count 2000"), ("eth0", "src_min 10.201.7.209"),
                                             ("eth0", "src_max 10.201.15.160")]


def test_pktgen_result_gives_its_own_time_and_count() -> None:
    text = ("Params: count 2000  min_pkt_size: 60  max_pkt_size: 60\n"
            "Current:\n     pkts-sofar: 2000  errors: 0\n"
            "Result: OK: 155090(c136647+d18442) usec, 2000 (60byte,0frags)\n"
            "  12895pps 6Mb/sec (6189600bps) errors: 0\n")
    assert pktgen_result(text) == (155090, 2000)
    with pytest.raises(RuntimeError, match="Result: Idle"):
        pktgen_result("Params: count 0\nResult: Idle\n")


def test_softnet_drops_sums_the_second_column_of_every_cpu() -> None:
    text = ("0000178a 00000000 00000005 00000000 00000000 00000000 00000000 00000000 00000000 00000000\n"
            "00000155 0000002f 00000003 00000000 00000000 00000000 00000000 00000000 00000000 00000000\n")
    assert softnet_drops(text) == 0x2F


def test_ipvs_connections_counts_connections_of_the_sources_not_templates() -> None:
    text = ("Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData\n"
            "UDP 0AC90001 14E9 0A000064 0035 0A01010A 0035 UDP         299\n"
            "UDP 0AC90001 0000 0A000064 0035 0A01010A 0035 NONE        299\n"      # the template
            "UDP 0AC90002 14E9 0A000064 0035 0A01020A 0035 UDP         299\n"
            "TCP 0A00100A 9C40 0A000064 0050 0A01010B 0050 ESTABLISHED 899\n")
    assert ipvs_connections(text, {"10.201.0.1", "10.201.0.2"}) == 2
    assert ipvs_connections(text, {"10.0.16.10"}) == 1
    assert ipvs_connections(text, set()) == 0


def test_tx_packets_reads_the_device_row() -> None:
    text = ("Inter-|   Receive                                                |  Transmit\n"
            " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
            "    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n"
            "  fab0:    1234      10    0    0    0     0          0         0    99999     321    0    0    0     0       0          0\n")
    assert tx_packets(text, "fab0") == 321 and tx_packets(text, "lo") == 0
    with pytest.raises(KeyError):
        tx_packets(text, "lan0")


def _result() -> object:
    ours, theirs = RateRun(2000, 4.0, 1.0), RateRun(2000, 0.5, 0.5)
    our_lat = Latency([(0.030, 0.010)] * 98 + [(0.110, 0.010)] * 2)
    their_lat = Latency([(0.0105, 0.010)] * 98 + [(0.015, 0.010)] * 2)
    return build_result(ours, theirs, our_lat, their_lat)


def test_result_rates_latencies_and_ratios() -> None:
    r = _result()
    d = asdict(r)  # type: ignore[call-overload]
    assert d["sessions_per_s"] == 500 and d["ipvs_connections_per_s"] == 4000
    assert d["setup_ratio"] == 0.125
    assert d["added_latency_p50_ms"] == 20 and d["ipvs_added_latency_p50_ms"] == 0.5
    assert d["latency_p50_ratio"] == 40
    assert d["added_latency_p99_ms"] == 100 and d["ipvs_added_latency_p99_ms"] == 5
    assert d["latency_p99_ratio"] == 20
    assert d["connect_new_p50_ms"] == 30 and d["connect_existing_p50_ms"] == 10
    assert d["offered_per_s"] == 2000 and d["ipvs_offered_per_s"] == 4000
    assert d["sessions"] == 2000 and d["samples"] == 100
    json.dumps(d)  # one JSON object, as --json prints it


def test_a_reference_without_added_latency_gives_no_ratio() -> None:
    ours, theirs = RateRun(10, 1.0, 1.0), RateRun(10, 1.0, 1.0)
    r = build_result(ours, theirs, Latency([(0.02, 0.01)]), Latency([(0.01, 0.011)]))
    assert r.latency_p50_ratio is None and r.ipvs_added_latency_p50_ms == -1.0
    assert "-" in format_table(r).splitlines()[4].split()[-1]


def test_table_shows_both_systems_and_ratios_side_by_side() -> None:
    lines = format_table(_result()).splitlines()  # type: ignore[arg-type]
    assert lines[1].split() == ["balancer", "IPVS", "ratio"]
    assert lines[2].split()[-3:] == ["500", "4000", "0.12"]
    assert lines[4].split()[-3:] == ["20.00", "0.50", "40.00"]
    assert lines[5].split()[-3:] == ["100.00", "5.00", "20.00"]
