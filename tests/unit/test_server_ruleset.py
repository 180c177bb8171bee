"""The server agent's nftables ruleset: only new flows that came under one of our session labels
(the mark the ingress filter sets) to a VIP are queued, fail-open; established labelled packets
are counted, never queued."""

from __future__ import annotations

import re
from pathlib import Path

from orchestrator.capture import nftables
from orchestrator.config import load_server_config, parse_config
from orchestrator.config.examples import DELETE, example
from orchestrator.core.agent import MARK_MASK, MARK_TAG, label_of

EXAMPLE = Path(__file__).resolve().parents[2] / "templates" / "server.example.yaml"
MATCH = 'iif "lo" meta mark & 0xfff00000 == 0x6d600000'
TAG = "ct mark set ct mark and 0x000fffff or 0x6d600000"  # conntrack dumps ask for these flows only


def rules(ruleset: str) -> list[str]:
    return [line.strip() for line in ruleset.splitlines() if line.strip().startswith("iif ")]


def test_new_labelled_flows_to_each_family_of_vips_are_queued_with_bypass() -> None:
    ruleset = nftables.render_server(load_server_config(EXAMPLE))
    assert rules(ruleset) == [
        f"{MATCH} ct state new ip daddr {{ 10.0.0.100 }} {TAG} counter name queued queue flags bypass to 8",
        f"{MATCH} ct state new ip6 daddr {{ fd00:100::100 }} {TAG} counter name queued queue flags bypass to 8",
        f"{MATCH} ct state established counter name labelled_established",
    ]
    assert "counter queued {}" in ruleset and "counter labelled_established {}" in ruleset
    assert "type filter hook input priority 0; policy accept;" in ruleset
    # The table is replaced atomically (declared, deleted, declared again in one `nft -f`).
    assert ruleset.index("table inet mplsorch\ndelete table inet mplsorch\ntable inet mplsorch {") > 0


def test_the_matched_mark_is_the_one_the_agent_reads() -> None:
    mask, tag = (int(x, 16) for x in re.findall(r"0x[0-9a-f]+", MATCH))
    assert (mask, tag) == (MARK_MASK, MARK_TAG)
    assert label_of(MARK_TAG | 1001) == 1001 and label_of(1001) is None


def test_only_the_families_the_server_has_vips_of() -> None:
    text = example(
        "server", {("vips", "fd00:100::100"): DELETE, ("vips", "10.0.0.101"): {"table": 101}, "nfqueue.queue": 12}
    )
    ruleset = nftables.render_server(parse_config(text))  # type: ignore[arg-type]
    assert rules(ruleset) == [
        f"{MATCH} ct state new ip daddr {{ 10.0.0.100, 10.0.0.101 }} {TAG} counter name queued queue flags bypass to 12",
        f"{MATCH} ct state established counter name labelled_established",
    ]
