"""Workers (nfqueue.workers): the label pool split, the worker configurations, which kernel
objects each worker owns, the session ids, the ruleset's sharding and the supervisor's merge."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from orchestrator.capture import nftables
from orchestrator.capture.nfqueue import QueuedPacket
from orchestrator.config.examples import example
from orchestrator.config.load import ConfigError, parse_config
from orchestrator.config.model import MetricsConfig
from orchestrator.core import shards
from orchestrator.core.labels import LabelAllocator
from orchestrator.core.sessions import SessionTable
from orchestrator.core.shards import Shard, worker_socket
from orchestrator.daemon.balancer import BalancerDaemon
from orchestrator.daemon.control import ControlServer
from orchestrator.daemon.workers import Supervisor, add_up, merge_answers
from orchestrator.dataplane import handles, ops
from orchestrator.dataplane.fake import FakeProvider
from orchestrator.metrics import MetricsSnapshot
from tests.unit.conftest import BALANCER_EXAMPLE, ScriptedQueue, config, scripted_capture, syn


def two_workers(changes: dict[str, object] | None = None) -> object:
    return config({"nfqueue.workers": 2, **(changes or {})})


@pytest.mark.parametrize(("first", "last", "count"), [(1001, 1999, 2), (16, 1048575, 3), (1000, 1009, 4), (17, 20, 2)])
def test_split_labels_covers_every_pair_once(first: int, last: int, count: int) -> None:
    parts = shards.split_labels(first, last, count)
    assert len(parts) == count
    whole = LabelAllocator(first, last, 0).stats(0).total
    pairs = [LabelAllocator(lo, hi, 0).stats(0).total for lo, hi in parts]
    assert sum(pairs) == whole and max(pairs) - min(pairs) <= 1
    for (_, hi), (lo, _) in zip(parts, parts[1:]):
        assert hi < lo  # disjoint, in order
    for lo, hi in parts:
        assert lo % 2 == 1 and hi % 2 == 0 and first <= lo < hi <= last


def test_split_labels_refuses_fewer_pairs_than_workers() -> None:
    with pytest.raises(ValueError, match="fewer than 3 workers"):
        shards.split_labels(17, 20, 3)


def test_worker_configs_own_disjoint_labels_queues_and_sockets() -> None:
    cfg = config({"nfqueue.workers": 2, "services.http.admission.max_sessions": 5})
    assert cfg.nfqueue.queues == (0, 1)  # one queue given: the workers' queues follow it
    w0, w1 = (shards.worker_config(cfg, shards.Shard(i, 2)) for i in range(2))
    assert w0.nfqueue.queues == (0, 0) and w1.nfqueue.queues == (1, 1)
    assert w0.labels.range[1] < w1.labels.range[0]
    assert w0.node.control_socket != w1.node.control_socket != cfg.node.control_socket
    assert w0.metrics is None
    limits = [w.service("http").admission.max_sessions for w in (w0, w1)]
    assert limits == [3, 2]  # the limit holds in total
    owner = shards.owner_of_label(cfg, 2)
    assert owner(w0.labels.range[0]) == 0 and owner(w1.labels.range[0] + 2) == 1
    assert owner(5) == 0  # out of every share: worker 0 deletes it as stale


def test_server_blocks_are_split_per_server() -> None:
    cfg = config(
        {
            "nfqueue.workers": 2,
            "labels.allocation": "server-blocks",
            "pools.web.servers.s1.label_block": [1000, 1999],
            "pools.web.servers.s2.label_block": [2000, 2999],
            "pools.web.servers.s3.label_block": [3000, 3999],
        }
    )
    w1 = shards.worker_config(cfg, shards.Shard(1, 2))
    blocks = [s.label_block for s in w1.servers]
    assert blocks == [(1499, 1998), (2499, 2998), (3499, 3998)]
    owner = shards.owner_of_label(cfg, 2)
    assert [owner(1001), owner(1501), owner(2999 - 2), owner(3001)] == [0, 1, 1, 0]


def test_workers_need_a_queue_each() -> None:
    with pytest.raises(ConfigError, match="2 workers need 2 queues"):
        parse_config(example("balancer", {"nfqueue.workers": 2, "nfqueue.queues": [0, 2]}), "x.yaml")
    with pytest.raises(ConfigError, match="workers"):
        parse_config(example("balancer", {"nfqueue.workers": 0}), "x.yaml")
    assert config({"nfqueue.workers": 3, "nfqueue.queues": [4, 6]}).nfqueue.queues == (4, 6)


def test_the_ruleset_shards_by_source_address() -> None:
    one = nftables.render(config())
    assert "fanout" in one and "jhash" not in one
    cfg = config({"nfqueue.workers": 2, "nfqueue.queues": [8, 9]})
    rules = [line for line in nftables.render(cfg).splitlines() if " queue " in line]
    assert rules
    for rule in rules:
        family = "ip6" if "ip6 daddr" in rule else "ip"
        assert f"to jhash {family} saddr mod 2 seed 0x6d706c73 offset 8" in rule, rule
    iid = config({"nfqueue.workers": 2, "services.mobile.session_key": "ipv6-iid"})
    assert "jhash @nh,128,64 mod 2 seed 0x6d706c73 offset 0" in nftables.render(iid)


def flower(c2s: int, client: str, server_label: int = 101) -> ops.FlowerFilter:
    return ops.FlowerFilter(
        dev="fab0",
        direction=ops.Direction.EGRESS,
        handle=handles.filter_handle(c2s, 0),
        match=ops.FlowerMatch(src=f"{client}/32", dst="10.0.0.100/32", ip_proto="tcp"),
        actions=(ops.MplsPush(c2s), ops.MplsPush(server_label)),
    )


def test_each_worker_owns_its_sessions_objects() -> None:
    cfg = two_workers()
    owner = shards.owner_of_label(cfg, 2)
    lo0 = shards.worker_config(cfg, shards.Shard(0, 2)).labels.range[0]
    lo1 = shards.worker_config(cfg, shards.Shard(1, 2)).labels.range[0]
    objects = [
        flower(lo0, "10.0.1.1"),
        ops.MplsRoute(lo0 + 1, "lan0"),
        ops.FastPathElement("10.0.1.1", "10.0.0.100", "tcp", 80),
        flower(lo1, "10.0.1.2"),
        ops.MplsRoute(lo1 + 1, "lan0"),
        ops.FastPathElement("10.0.1.2", "10.0.0.100", "tcp", 80),
        ops.FastPathElement("10.0.1.9", "10.0.0.100", "tcp", 80),  # of no session: worker 0 deletes it
        ops.ClsactQdisc("fab0"),
    ]
    installed = [ops.Installed(o) for o in objects]
    mine = [[i.obj for i in shards.share_of(installed, owner, w)] for w in (0, 1)]
    assert mine[1] == objects[3:6]
    assert mine[0] == objects[:3] + objects[6:]


def test_worker_session_ids_never_collide() -> None:
    tables = [SessionTable(i + 1, 2) for i in range(2)]
    ids = [[t.new_id() for _ in range(3)] for t in tables]
    assert ids == [[1, 3, 5], [2, 4, 6]]
    one = SessionTable(2, 2)
    assert one.new_id() == 2


def test_the_supervisor_adds_the_workers_answers_up() -> None:
    assert add_up([{"a": 1, "b": {"c": 2}, "l": [1, 2]}, {"a": 2, "b": {"c": 3, "d": 1}, "l": [1, 1]}]) == {
        "a": 3,
        "b": {"c": 5, "d": 1},
        "l": [2, 3],
    }
    answers = [
        {"role": "balancer", "sessions": [{"id": 2}, {"id": 5}], "total": 2},
        {"sessions": [{"id": 1}], "total": 3},
    ]
    sessions = merge_answers("sessions", answers)
    assert sessions == {"role": "balancer", "sessions": [{"id": 1}, {"id": 2}, {"id": 5}], "offset": 0, "total": 5}
    second = merge_answers("sessions", answers, (1, 1))  # a page of the union, by id
    assert second == {"role": "balancer", "sessions": [{"id": 2}], "offset": 1, "total": 5}
    flushed = merge_answers(
        "flush", [{"flushed": 1, "sessions": [3], "errors": 0}, {"flushed": 2, "sessions": [2, 4], "errors": 1}]
    )
    assert flushed == {"flushed": 3, "sessions": [2, 3, 4], "errors": 1}
    rows = [{"pool": "web", "name": "s1", "sessions": n, "state": "up"} for n in (2, 5)]
    assert merge_answers("servers", [{"servers": [rows[0]]}, {"servers": [rows[1]]}])["servers"][0]["sessions"] == 7


def test_the_supervisor_answers_for_the_union_of_real_workers(tmp_path: Path) -> None:
    """Two balancer daemons as workers 0 and 1 (fake kernels), each serving its own control
    socket; the supervisor's answers are their union, and its metrics add them up."""
    cfg = config({"nfqueue.workers": 2, "node.control_socket": str(tmp_path / "ctl.sock")})

    async def scenario() -> tuple[dict[str, Any], dict[str, Any], dict[str, Any], MetricsSnapshot]:
        servers = []
        daemons = []
        for index, clients in enumerate((["10.0.1.10", "10.0.1.11"], ["10.0.1.12"])):
            kernel = FakeProvider(["lan0", "lan1", "fab0"])
            kernel.apply([ops.Add(ops.ClsactQdisc("fab0"))])
            kernel.add_ip_route("10.0.0.0/16", "lan0")
            queue = ScriptedQueue()
            daemon = BalancerDaemon(str(BALANCER_EXAMPLE), kernel, scripted_capture(queue), cfg, shard=Shard(index, 2))
            daemon.queue = queue
            lan0 = kernel.ifindex("lan0")
            daemon.decide([QueuedPacket(index, n + 1, syn(c), lan0, None, 0) for n, c in enumerate(clients)])
            server = ControlServer(worker_socket(cfg.node.control_socket, index), daemon.answer)
            await server.start()
            servers.append(server)
            daemons.append(daemon)
        supervisor = Supervisor(str(BALANCER_EXAMPLE), replace(cfg, metrics=MetricsConfig()), FakeProvider([]))
        try:
            sessions = await supervisor.answer({"cmd": "sessions"})
            status = await supervisor.answer({"cmd": "status"})
            labels = await supervisor.answer({"cmd": "labels"})
            await supervisor.publish()
        finally:
            for server in servers:
                await server.stop()
        return sessions, status, labels, supervisor.snapshot()

    sessions, status, labels, metrics = asyncio.run(scenario())
    rows = sessions["sessions"]
    assert sorted(r["client"] for r in rows) == ["10.0.1.10", "10.0.1.11", "10.0.1.12"]
    assert sorted(r["id"] for r in rows) == [1, 2, 3]  # worker 0: 1, 3; worker 1: 2
    assert status["sessions"] == 3 and [w["sessions"] for w in status["workers"]] == [2, 1]
    assert status["counters"]["sessions_started"] == 3 and status["labels"]["in_use"] == 3
    assert status["loop_steps"]["batch: decide"]["runs"] == 2  # one batch each
    assert labels["labels"]["in_use"] == 3
    assert metrics.sessions_started == 3 and metrics.label_pairs["in_use"] == 3
