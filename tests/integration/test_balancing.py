"""Every internal channel spreads its calls over all the replicas its target names, notices
replicas that stop and come back, and re-sends only idempotent calls that a replica refused with
UNAVAILABLE: against real gRPC servers on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator

import grpc
import pytest
from wa.v1 import agent_pb2, agent_pb2_grpc, state_pb2, state_pb2_grpc

from common import balancing, grpcserver, tls
from devtools.ports import free_port


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> tls.Credentials:
    """Over mutual TLS, as every internal channel is (one certificate both ways: the caller's
    authorization is not what is tested here)."""
    where = tmp_path_factory.mktemp("tls")
    tls.create(where, identities=["state"])
    return tls.Credentials.load(where, "state")


class Replica(agent_pb2_grpc.AgentServicer, state_pb2_grpc.StateServicer):
    """One replica of a service: says which one it is, counts what it was asked, and refuses
    the first `refuse` calls of each method with UNAVAILABLE (a replica going away)."""

    def __init__(self, name: str, refuse: int = 0) -> None:
        self.name = name
        self.calls: Counter[str] = Counter()
        self.refuse = refuse

    async def _maybe_refuse(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.calls[method] += 1
        if self.calls[method] <= self.refuse:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "going away")

    async def GetStatus(
        self, request: agent_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetStatusResponse:
        await self._maybe_refuse("GetStatus", context)
        return agent_pb2.GetStatusResponse(backend=self.name)

    async def Reply(
        self, request: agent_pb2.ReplyRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ReplyResponse:
        await self._maybe_refuse("Reply", context)
        return agent_pb2.ReplyResponse()

    async def IngestBatch(
        self, request: state_pb2.IngestBatchRequest, context: grpc.aio.ServicerContext
    ) -> state_pb2.IngestBatchResponse:
        await self._maybe_refuse("IngestBatch", context)
        return state_pb2.IngestBatchResponse()


@contextlib.asynccontextmanager
async def serving(
    replica: Replica, port: int, creds: tls.Credentials
) -> AsyncIterator[grpc.aio.Server]:
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    agent_pb2_grpc.add_AgentServicer_to_server(replica, server)
    state_pb2_grpc.add_StateServicer_to_server(replica, server)
    grpcserver.bind(server, "127.0.0.1", port, creds)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(None)


async def answered_by(stub: agent_pb2_grpc.AgentStub, calls: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    for _ in range(calls):
        seen[(await stub.GetStatus(agent_pb2.GetStatusRequest(), timeout=5)).backend] += 1
    return seen


async def until_answered_by(stub: agent_pb2_grpc.AgentStub, name: str, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while name not in await answered_by(stub, 3):
        assert loop.time() < deadline, f"{name} never answered"
        await asyncio.sleep(0.05)


async def test_calls_are_spread_over_every_replica_of_the_target(creds: tls.Credentials) -> None:
    replicas = [Replica(f"r{n}") for n in range(3)]
    ports = [free_port() for _ in replicas]
    target = balancing.replicas_target("127.0.0.1", ports)
    assert target.startswith("ipv4:")
    async with contextlib.AsyncExitStack() as stack:
        for replica, port in zip(replicas, ports, strict=True):
            await stack.enter_async_context(serving(replica, port, creds))
        ch = await stack.enter_async_context(
            grpcserver.channel(target, traced=False, transport=creds)
        )
        stub = agent_pb2_grpc.AgentStub(ch)
        for replica in replicas:  # every connection is up
            await until_answered_by(stub, replica.name, timeout=10)
        seen = await answered_by(stub, 30)
    # round_robin: each in turn (pick_first, gRPC's default, sends all 30 to one).
    assert seen == {"r0": 10, "r1": 10, "r2": 10}


async def test_a_replica_that_stops_leaves_the_rotation_and_one_that_returns_rejoins(
    creds: tls.Credentials,
) -> None:
    one, two = Replica("one"), Replica("two")
    ports = [free_port(), free_port()]
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(serving(one, ports[0], creds))
        server_two = await stack.enter_async_context(serving(two, ports[1], creds))
        ch = await stack.enter_async_context(
            grpcserver.channel(
                balancing.replicas_target("127.0.0.1", ports), traced=False, transport=creds
            )
        )
        stub = agent_pb2_grpc.AgentStub(ch)
        await until_answered_by(stub, "two", timeout=10)

        await server_two.stop(None)
        # Not one call fails: the channel sends them all to the replica that is left.
        assert await answered_by(stub, 20) == {"one": 20}

        back = Replica("two again")
        await stack.enter_async_context(serving(back, ports[1], creds))
        # Reconnection backs off up to balancing.RECONNECT_MAX_MS, not gRPC's 120 s.
        await until_answered_by(stub, "two again", timeout=balancing.RECONNECT_MAX_MS / 1000 + 5)


async def test_idempotent_calls_are_sent_again_on_unavailable_turns_are_not(
    creds: tls.Credentials,
) -> None:
    replica = Replica("flaky", refuse=2)
    port = free_port()
    async with (
        serving(replica, port, creds),
        grpcserver.channel(f"127.0.0.1:{port}", traced=False, transport=creds) as ch,
    ):
        # Ingest is keyed by message id: a repetition stores nothing twice.
        await state_pb2_grpc.StateStub(ch).IngestBatch(state_pb2.IngestBatchRequest(), timeout=5)
        assert replica.calls["IngestBatch"] == 3
        # A turn is asked again by the state service's driver only, under a new fencing token.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await agent_pb2_grpc.AgentStub(ch).Reply(agent_pb2.ReplyRequest(), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert replica.calls["Reply"] == 1


def test_the_service_config_names_only_methods_that_exist() -> None:
    from grpc_health.v1 import health_pb2
    from wa.v1 import dlq_pb2

    services = {
        d.full_name: d
        for d in (
            state_pb2.DESCRIPTOR.services_by_name["State"],
            agent_pb2.DESCRIPTOR.services_by_name["Agent"],
            dlq_pb2.DESCRIPTOR.services_by_name["Dlq"],
            health_pb2.DESCRIPTOR.services_by_name["Health"],
        )
    }
    for service, methods in balancing.IDEMPOTENT.items():
        for method in methods:
            assert method in services[service].methods_by_name, f"{service}/{method}"
    assert "Reply" not in balancing.IDEMPOTENT["wa.v1.Agent"]
    assert "Enqueue" not in balancing.IDEMPOTENT["wa.v1.Dlq"]
