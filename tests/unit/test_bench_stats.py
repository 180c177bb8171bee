"""The pure arithmetic and parsing of `lab bench setup`: percentiles, ratios, the flood's
addresses and bursts, and the kernel texts it reads."""

from __future__ import annotations

import pytest

from orchestrator.lab.bench.stats import (
    FLOOD_SPAN,
    alias_addresses,
    chunks,
    cpu_seconds,
    cpu_times,
    flood_sources,
    idle_share,
    ipvs_connections,
    percentile,
    pktgen_result,
    ratio,
    round_order,
    softnet_drops,
    tx_packets,
)


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


def test_pktgen_result_gives_its_own_time_and_count() -> None:
    text = (
        "Params: count 2000  min_pkt_size: 60  max_pkt_size: 60\n"
        "Current:\n     pkts-sofar: 2000  errors: 0\n"
        "Result: OK: 155090(c136647+d18442) usec, 2000 (60byte,0frags)\n"
        "  12895pps 6Mb/sec (6189600bps) errors: 0\n"
    )
    assert pktgen_result(text) == (155090, 2000)
    with pytest.raises(RuntimeError, match="Result: Idle"):
        pktgen_result("Params: count 0\nResult: Idle\n")


def test_softnet_drops_sums_the_second_column_of_every_cpu() -> None:
    text = (
        "0000178a 00000000 00000005 00000000 00000000 00000000 00000000 00000000 00000000 00000000\n"
        "00000155 0000002f 00000003 00000000 00000000 00000000 00000000 00000000 00000000 00000000\n"
    )
    assert softnet_drops(text) == 0x2F


def test_ipvs_connections_counts_connections_of_the_sources_not_templates() -> None:
    text = (
        "Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData\n"
        "UDP 0AC90001 14E9 0A000064 0035 0A01010A 0035 UDP         299\n"
        "UDP 0AC90001 0000 0A000064 0035 0A01010A 0035 NONE        299\n"  # the template
        "UDP 0AC90002 14E9 0A000064 0035 0A01020A 0035 UDP         299\n"
        "TCP 0A00100A 9C40 0A000064 0050 0A01010B 0050 ESTABLISHED 899\n"
    )
    assert ipvs_connections(text, {"10.201.0.1", "10.201.0.2"}) == 2
    assert ipvs_connections(text, {"10.0.16.10"}) == 1
    assert ipvs_connections(text, set()) == 0


def test_tx_packets_reads_the_device_row() -> None:
    text = (
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
        "    lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n"
        "  fab0:    1234      10    0    0    0     0          0         0    99999     321    0    0    0     0       0          0\n"
    )
    assert tx_packets(text, "fab0") == 321 and tx_packets(text, "lo") == 0
    with pytest.raises(KeyError):
        tx_packets(text, "lan0")


def test_alias_addresses_refuse_a_network_too_small() -> None:
    with pytest.raises(ValueError):
        alias_addresses("10.0.16.0/30", 3)  # two hosts


def test_flood_sources_go_on_into_the_next_octets_up_to_the_label_space() -> None:
    assert flood_sources(201, 65534)[-1] == "10.201.255.254"
    assert flood_sources(64, 2, offset=65535) == ["10.65.0.0", "10.65.0.1"]  # pktgen walks them all
    assert flood_sources(64, 1, offset=FLOOD_SPAN - 1) == ["10.79.255.254"]
    with pytest.raises(ValueError):
        flood_sources(64, 1, offset=FLOOD_SPAN)
    with pytest.raises(ValueError):
        flood_sources(64, 1, offset=-1)


def test_no_packets_no_bursts() -> None:
    assert chunks(0, 2000) == []


def test_pktgen_result_without_any_text() -> None:
    with pytest.raises(RuntimeError, match="pktgen: no result"):
        pktgen_result("")


def test_softnet_drops_ignores_blank_lines() -> None:
    assert softnet_drops("\n00000001 00000010 00000000\n\n") == 16


def test_ipvs_connections_skips_what_is_not_a_connection_row() -> None:
    text = (
        "Pro FromIP   FPrt ToIP     TPrt DestIP   DPrt State       Expires PEName PEData\n"
        "\n"
        "UDP 0AC9\n"  # too short
        "UDP ZZZZZZZZ 14E9 0A000064 0035 0A01010A 0035 UDP         299\n"  # not hex
        "UDP 0AC90001 14E9 0A000064 0035 0A01010A 0035 UDP         299\n"
    )
    assert ipvs_connections(text, {"10.201.0.1"}) == 1


def test_tx_packets_matches_the_whole_device_name() -> None:
    text = "  fab01:    0 0 0 0 0 0 0 0    0    7 0 0 0 0 0 0\n   fab0:    0 0 0 0 0 0 0 0    0    5 0 0 0 0 0 0\n"
    assert tx_packets(text, "fab0") == 5 and tx_packets(text, "fab01") == 7


def test_cpu_seconds_of_a_process_from_its_proc_stat() -> None:
    # utime 250 and stime 50 ticks; the command name holds a space and a parenthesis
    text = "4242 (python (x) y) S 1 4242 4242 0 -1 4194560 1000 0 0 0 250 50 0 0 20 0 3 0 100 0 0"
    assert cpu_seconds(text, 100) == 3.0


def test_rate_rounds_interleave_the_systems_and_alternate_the_first() -> None:
    from orchestrator.lab.bench.balancer import RATE_ROUNDS

    order = round_order(RATE_ROUNDS)
    assert order == [("existing", 0), ("ipvs", 0), ("ipvs", 1), ("existing", 1), ("existing", 2), ("ipvs", 2)]
    for system in ("existing", "ipvs"):  # every round of each system, in its order
        assert [r for s, r in order if s == system] == list(range(RATE_ROUNDS))
    # round by round: both floods of a round come before either of the next, so a drift in
    # the host's load meets both systems alike, and neither floods first in every round
    assert [r for _, r in order] == sorted(r for _, r in order)
    firsts = [order[2 * r][0] for r in range(RATE_ROUNDS)]
    assert set(firsts) == {"existing", "ipvs"}
    assert round_order(1) == [("existing", 0), ("ipvs", 0)]


def test_idle_share_is_the_idle_ticks_over_all_between_two_readings() -> None:
    first = cpu_times("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 100 0 50 800 50 0 0 0 0 0\n")
    assert first == (850, 1000)
    busy = cpu_times("cpu  180 0 60 805 50 0 5 0 0 0\n")  # 100 ticks, 5 of them idle
    assert idle_share(first, busy) == pytest.approx(0.05)
    quiet = cpu_times("cpu  181 0 61 903 50 0 5 0 0 0\n")  # 100 more, 98 idle
    assert idle_share(busy, quiet) == pytest.approx(0.98)
    assert idle_share(quiet, quiet) == 1.0  # no tick passed: nothing ran
