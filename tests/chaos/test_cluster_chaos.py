"""Fault scenarios on the local three-node cluster, under load through the whole pipeline.

The ingress and the worker get BRIDGE_AMQP_URL = node 1, node 2, node 3, so both start on node 1;
the namespace is declared through node 2, so the quorum queues' leaders start there. Each
scenario takes a node away while Jackpot keeps delivering, and ends with the ledger (lost 0,
every voucher activated) and how long the ingress and the worker took to be ready again.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import aio_pika
import pytest

from sandbox.server import Sandboxes, start_sandboxes
from shared import topology
from shared.broker import declare_topology
from shared.settings import Settings
from tests.chaos.harness import TIERS_S, Bridge, Proc, Senders, open_bridge, wait_until
from tests.chaos.ledger import check
from tests.chaos.test_chaos import (
    SEND_TIMEOUT_S,
    accepted,
    check_finish,
    conclude,
    delivered_fully,
    deliveries,
)
from tests.support.cluster import Cluster
from tests.support.tcpproxy import TcpProxy

pytestmark = pytest.mark.chaos

VOUCHERS = 30
# One voucher every 0.25 s: ~7.5 s of load, which every fault below falls inside.
EVERY_S = 0.25
# Faults start once this many vouchers are accepted, so the pipeline is busy at every stage.
BEFORE_FAULT = 6
WATCH_EVERY_S = 0.1
RECOVER_TIMEOUT_S = 30.0
CUT_S = 8.0


@dataclass
class Kit:
    cluster: Cluster
    make_settings: Callable[..., Settings]
    admin: Settings
    channel: aio_pika.abc.AbstractChannel
    logs: Path


@pytest.fixture
async def kit(
    cluster_nodes: Cluster,
    make_settings: Callable[..., Settings],
    tmp_path: Path,
    ledger_schema: str,
) -> AsyncIterator[Kit]:
    """The namespace declared through node 2 (and its ledger schema); the test's own channel on
    node 3 (never stopped)."""
    cluster = cluster_nodes
    tiers = ",".join(map(str, TIERS_S))
    await declare_topology(make_settings(amqp_url=cluster.url(2), retry_tiers_s=tiers))
    admin = make_settings(amqp_url=cluster.urls(3, 1, 2), retry_tiers_s=tiers)
    logs = tmp_path / "logs"
    logs.mkdir()
    connection = await aio_pika.connect(cluster.url(3))
    async with connection, connection.channel() as channel:
        try:
            yield Kit(cluster, make_settings, admin, channel, logs)
        finally:
            await topology.delete(channel, admin.namespace, tiers_s=TIERS_S)


@pytest.fixture
async def sandboxes() -> AsyncIterator[Sandboxes]:
    async with await start_sandboxes() as started:
        yield started


@dataclass
class Watch:
    """Polls the ingress's and the worker's /readyz to time how long each took to recover."""

    bridge: Bridge
    samples: list[tuple[float, str, bool]] = field(default_factory=list)
    task: asyncio.Task[None] | None = None

    async def _poll(self) -> None:
        while True:
            ingress = await self.bridge.ingress_status() == "ready"
            worker = await self.bridge.worker_in_flight() is not None
            now = time.monotonic()
            self.samples += [(now, "ingress", ingress), (now, "worker", worker)]
            await asyncio.sleep(WATCH_EVERY_S)

    def start(self) -> None:
        self.task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)

    def recovered_s(self, who: str, since: float) -> float | None:
        """From `since` to the first ready look after the last unready one (0: never unready)."""
        looks = [(t, ok) for t, w, ok in self.samples if w == who and t >= since]
        unready = [t for t, ok in looks if not ok]
        if not unready:
            return 0.0
        after = [t for t, ok in looks if ok and t > unready[-1]]
        return after[0] - since if after else None

    async def until_ready(self, since: float) -> None:
        """Wait until both answer ready again after a fault that started at `since`."""

        def both() -> bool:
            return all(
                any(w == who and t > since + WATCH_EVERY_S and ok for t, w, ok in self.samples[-4:])
                for who in ("ingress", "worker")
            )

        await wait_until(both, RECOVER_TIMEOUT_S, "the ingress and the worker ready again")

    def note(self, what: str, since: float) -> str:
        parts = []
        for who in ("ingress", "worker"):
            took = self.recovered_s(who, since)
            parts.append(f"{who} {'never' if took is None else f'{took:.1f} s'}")
        return f"ready again after {what}: " + ", ".join(parts)


# What each process logs when it loses its broker connection and when it has a new one.
LOST_AND_BACK = {
    "ingress": ("amqp connection lost, reconnecting", "amqp publisher connected"),
    "worker": ("broker_connection_lost", "consuming"),
}


def failovers(proc: Proc) -> list[tuple[float, str]]:
    """Each reconnection in the process's log: seconds without a broker, and the node it reached."""
    lost_event, back_event = LOST_AND_BACK[proc.name]
    lost_at: datetime | None = None
    found: list[tuple[float, str]] = []
    for line in proc.log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        entry = json.loads(line)
        at = datetime.fromisoformat(str(entry.get("timestamp")).replace("Z", "+00:00"))
        if entry.get("event") == lost_event and lost_at is None:
            lost_at = at
        elif entry.get("event") == back_event and lost_at is not None:
            found.append(((at - lost_at).total_seconds(), str(entry.get("broker"))))
            lost_at = None
    return found


def failover_notes(bridge: Bridge) -> list[str]:
    """How long the ingress and the worker were without a broker each time, and where they went."""
    notes = []
    for proc in bridge.procs:
        moves = ", ".join(f"{s * 1000:.0f} ms to {node}" for s, node in failovers(proc))
        notes.append(f"{proc.name} reconnected: {moves or 'never disconnected'}")
    return notes


def leaders(cluster: Cluster, namespace: str) -> Counter[int]:
    """How many of the namespace's queues each node leads."""
    return Counter(cluster.node_of(q["leader"]) for q in cluster.queues(3, namespace).values())


Fault = Callable[[Kit, Bridge, Watch], Awaitable[list[str]]]


async def scenario(
    kit: Kit,
    sandboxes: Sandboxes,
    name: str,
    fault: Fault,
    *,
    amqp_url: str | None = None,
    moves_off_node_1: bool = True,
) -> None:
    """Load, the fault, the ledger: lost 0, every voucher activated, nothing left anywhere."""
    url = amqp_url or kit.cluster.urls(1, 2, 3)
    async with open_bridge(
        kit.make_settings, kit.admin, sandboxes, kit.channel, kit.logs, amqp_url=url
    ) as bridge:
        await bridge.start_ingress()
        await bridge.start_worker()
        vouchers = [bridge.pipeline.new_voucher() for _ in range(VOUCHERS)]
        senders = Senders()
        watch = Watch(bridge)
        watch.start()
        load = asyncio.create_task(
            senders.paced(deliveries(sandboxes.jackpot, vouchers), every_s=EVERY_S)
        )
        try:
            await wait_until(
                lambda: accepted(sandboxes, vouchers) >= BEFORE_FAULT, 30, "vouchers accepted"
            )
            started = time.monotonic()
            notes = await fault(kit, bridge, watch)
            await asyncio.wait_for(load, SEND_TIMEOUT_S)
            outcomes = await senders.wait(SEND_TIMEOUT_S)
            moved = {p.name: failovers(p) for p in bridge.procs}
            ledger, finish = await conclude(
                bridge, name, vouchers, started, notes=[*notes, *failover_notes(bridge)]
            )
        finally:
            load.cancel()
            await senders.cancel()
            await watch.stop()
    check(ledger)
    check_finish(finish)
    delivered_fully(outcomes)
    assert ledger.activated == len(vouchers)
    if moves_off_node_1:
        for who in ("ingress", "worker"):
            assert moved[who], f"the {who} never lost node 1"
            others = (f":{kit.cluster.amqp_port(2)}", f":{kit.cluster.amqp_port(3)}")
            assert any(port in moved[who][0][1] for port in others), moved[who]


async def stop_node(kit: Kit, bridge: Bridge, watch: Watch, n: int, what: str) -> str:
    at = time.monotonic()
    await asyncio.to_thread(kit.cluster.stop_node, n)
    await watch.until_ready(at)
    return watch.note(what, at)


@pytest.mark.timeout(150)
async def test_the_node_the_ingress_is_connected_to_stops(kit: Kit, sandboxes: Sandboxes) -> None:
    async def fault(kit: Kit, bridge: Bridge, watch: Watch) -> list[str]:
        return [await stop_node(kit, bridge, watch, 1, "node 1 (ingress and worker) stopped")]

    await scenario(kit, sandboxes, "C1. cluster: the ingress's node stops", fault)


@pytest.mark.timeout(150)
async def test_the_node_leading_the_quorum_queues_stops(kit: Kit, sandboxes: Sandboxes) -> None:
    async def fault(kit: Kit, bridge: Bridge, watch: Watch) -> list[str]:
        led = await asyncio.to_thread(leaders, kit.cluster, bridge.settings.namespace)
        leader = led.most_common(1)[0][0]
        assert leader == 2, f"the leaders should start where the namespace was declared: {led}"
        note = await stop_node(kit, bridge, watch, leader, f"node {leader} (leaders) stopped")
        after = await asyncio.to_thread(leaders, kit.cluster, bridge.settings.namespace)
        assert leader not in after, f"node {leader} is stopped but still leads: {after}"
        return [note, f"leaders after: {dict(after)}"]

    await scenario(
        kit, sandboxes, "C2. cluster: the quorum leaders' node stops", fault, moves_off_node_1=False
    )


@pytest.mark.timeout(200)
async def test_both_nodes_stop_in_turn_and_come_back(kit: Kit, sandboxes: Sandboxes) -> None:
    async def fault(kit: Kit, bridge: Bridge, watch: Watch) -> list[str]:
        notes = [await stop_node(kit, bridge, watch, 1, "node 1 stopped")]
        await asyncio.to_thread(kit.cluster.start_node, 1)
        notes.append(await stop_node(kit, bridge, watch, 2, "node 2 (leaders) stopped"))
        await asyncio.to_thread(kit.cluster.start_node, 2)
        return notes

    await scenario(kit, sandboxes, "C3. cluster: nodes 1 then 2 stop and return", fault)


@pytest.mark.timeout(150)
async def test_a_network_cut_to_one_node(kit: Kit, sandboxes: Sandboxes) -> None:
    cluster = kit.cluster
    async with TcpProxy("127.0.0.1", cluster.amqp_port(1)) as proxy:
        urls = ",".join([proxy.amqp_url(), cluster.url(2), cluster.url(3)])

        async def fault(kit: Kit, bridge: Bridge, watch: Watch) -> list[str]:
            at = time.monotonic()
            await proxy.cut()
            await watch.until_ready(at)
            await asyncio.sleep(CUT_S)  # the cut itself: node 1 unreachable this long
            await proxy.restore()
            return [watch.note(f"node 1 cut off for {CUT_S:g} s", at)]

        await scenario(kit, sandboxes, "C4. cluster: network cut to node 1", fault, amqp_url=urls)
