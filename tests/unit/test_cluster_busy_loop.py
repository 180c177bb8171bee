"""The store's deadlines against a busy loop, on a real etcd (skipped only without the etcd
binary): a call that etcd answers in time while the daemon's loop is blocked is not a store
down (its deadline is waited again, counted); a call etcd does not answer while the loop is
free fails after one deadline; the loop's lag is measured."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.cluster.loop_lag import LoopLag
from orchestrator.cluster.store import STALL, Store, StoreError
from tests.unit.conftest import EtcdServer
from tests.unit.test_cluster_etcd import cluster_config

ETCD = shutil.which("etcd")
pytestmark = pytest.mark.skipif(ETCD is None, reason="no etcd binary (bootstrap.sh installs etcd-server)")
TIMEOUT = 0.5  # the calls' deadline here (the daemon's is 2 s)


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    assert ETCD is not None
    server = EtcdServer(ETCD, tmp_path / "etcd")
    server.start()
    yield server
    server.stop()


def store_of(etcd: EtcdServer) -> Store:
    config = cluster_config(etcd, "a").cluster
    assert config is not None
    return Store(config, timeout=TIMEOUT)


def test_the_loops_lag_is_measured() -> None:
    async def main() -> None:
        lag = LoopLag(tick=0.02)
        lag.start()
        await asyncio.sleep(0.1)
        start = asyncio.get_running_loop().time()
        assert lag.since(start) < 0.5
        time.sleep(0.8)  # the loop blocked, as by a long synchronous step
        assert lag.since(start) >= 0.7  # the tick overdue now
        await asyncio.sleep(0.05)
        assert lag.since(start) >= 0.7  # and the tick that ran late
        await lag.stop()

    asyncio.run(main())


def test_a_deadline_that_expired_while_the_loop_was_blocked_is_not_a_store_down(etcd: EtcdServer) -> None:
    async def main() -> None:
        store = store_of(etcd)
        await store.connect()
        await store.join()
        try:
            for call in (store.load, store.keepalive, store.load):
                task = asyncio.ensure_future(call())
                await asyncio.sleep(0)  # the request is on its way
                time.sleep(3 * TIMEOUT)  # the loop busy past the deadline; etcd answers meanwhile
                assert await task is not None
            assert store.late_deadlines == 3
            assert store.last_stall >= STALL
        finally:
            await store.close()

    asyncio.run(main())


def test_a_store_that_does_not_answer_fails_after_one_deadline(etcd: EtcdServer) -> None:
    async def main() -> None:
        store = store_of(etcd)
        await store.connect()
        await store.join()
        assert etcd.proc is not None
        os.kill(etcd.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreError):
                await store.load()
            # gRPC's own deadline or this loop's first one: no second wait for a loop that kept time
            assert time.monotonic() - started < 2 * TIMEOUT + 1.0
            assert store.late_deadlines == 0
        finally:
            os.kill(etcd.proc.pid, signal.SIGCONT)
            await store.close()

    asyncio.run(main())
