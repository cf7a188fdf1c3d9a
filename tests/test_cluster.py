"""A three-node cluster: quorum queues on every node, and connections that move when a node goes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from aiormq.exceptions import ChannelPreconditionFailed

from shared import topology
from shared.broker import Nodes
from shared.publisher import ConfirmedPublisher
from shared.settings import Settings
from shared.topology import Names, Stage
from tests.support.cluster import Cluster
from workers.runner import Incoming, Outcome, Runner


@pytest.fixture
async def on_cluster(
    cluster: Cluster, make_settings: Callable[..., Settings]
) -> AsyncIterator[Settings]:
    """This test's namespace on the cluster, deleted afterwards through whichever node answers."""
    settings = make_settings(amqp_url=cluster.urls(1, 2, 3))
    yield settings
    connection = await Nodes(make_settings(amqp_url=cluster.urls(3, 2, 1))).connect("test")
    async with connection, connection.channel() as channel:
        await topology.delete(channel, settings.namespace, tiers_s=settings.retry_tiers_s)


async def declare(settings: Settings, group_size: int | None) -> Names:
    connection = await Nodes(settings).connect("test")
    async with connection, connection.channel() as channel:
        return await topology.declare(
            channel,
            settings.namespace,
            tiers_s=settings.retry_tiers_s,
            delivery_limit=settings.delivery_limit,
            initial_group_size=group_size,
        )


async def test_quorum_queues_are_replicated_to_every_node(
    cluster: Cluster, on_cluster: Settings
) -> None:
    names = await declare(on_cluster, None)
    queues = cluster.queues(2, on_cluster.namespace)
    expected = [names.dead, names.ledger, *(names.queue(s) for s in Stage)]
    expected += [names.tier_queue(t) for t in on_cluster.retry_tiers_s]
    assert sorted(queues) == sorted(expected)
    everyone = sorted(cluster.node_name(n) for n in (1, 2, 3))
    for name, queue in queues.items():
        assert sorted(queue["members"]) == everyone, name  # type: ignore[call-overload]
        # Declared through node 1, which the queues' leaders start on.
        assert queue["leader"] == cluster.node_name(1), name
    await declare(on_cluster, None)  # declaring again is harmless


async def test_a_changed_group_size_for_existing_queues_is_refused_by_the_broker(
    on_cluster: Settings,
) -> None:
    """RabbitMQ will not change a queue's arguments: the README says to keep the setting."""
    await declare(on_cluster, 3)
    await declare(on_cluster, 3)
    with pytest.raises(ChannelPreconditionFailed, match="x-quorum-initial-group-size"):
        await declare(on_cluster, 2)


async def test_the_initial_group_size_limits_the_replicas(
    cluster: Cluster, on_cluster: Settings
) -> None:
    await declare(on_cluster, 2)
    for name, queue in cluster.queues(1, on_cluster.namespace).items():
        assert len(queue["members"]) == 2, name  # type: ignore[arg-type]


@pytest.mark.timeout(180)
async def test_publisher_and_consumers_move_to_another_node_when_theirs_stops(
    cluster_nodes: Cluster, on_cluster: Settings
) -> None:
    cluster, settings = cluster_nodes, on_cluster
    names = await declare(settings, None)
    got: list[str | None] = []
    arrived = asyncio.Event()

    async def handle(message: Incoming) -> Outcome:
        got.append(message.message_id)
        arrived.set()
        return Outcome()

    publisher = ConfirmedPublisher(
        settings.amqp_urls, connect_timeout_s=2.0, reconnect_max_delay_s=0.5
    )
    runner = Runner(settings, {Stage.LIFECYCLE: handle})
    stop = asyncio.Event()
    running = asyncio.create_task(runner.run(stop))
    await publisher.start()
    try:
        assert await publisher.wait_ready(10)
        await asyncio.wait_for(runner.connected.wait(), 20)
        assert publisher._params.address == f"127.0.0.1:{cluster.amqp_port(1)}"
        assert runner.nodes.current == f"127.0.0.1:{cluster.amqp_port(1)}"
        await publisher.publish(names.events, "voucher.lifecycle", b"{}", message_id="before")
        await asyncio.wait_for(arrived.wait(), 10)

        await asyncio.to_thread(cluster.stop_node, 1)
        arrived.clear()
        assert await publisher.wait_ready(30), "the publisher did not reach another node"
        assert publisher._params.address == f"127.0.0.1:{cluster.amqp_port(2)}"
        await asyncio.wait_for(runner.connected.wait(), 30)
        assert runner.nodes.current == f"127.0.0.1:{cluster.amqp_port(2)}"
        await publisher.publish(names.events, "voucher.lifecycle", b"{}", message_id="after")
        await asyncio.wait_for(arrived.wait(), 20)
        assert got == ["before", "after"]
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)
        await publisher.close()
