"""Internal gRPC over mutual TLS (README, Security): a caller without a certificate of the
system's CA gets nothing on any internal port, a certificate gets only the RPCs its identity
calls, probes answer over HTTP without one, and GRPC_INSECURE=true is plaintext, said loudly."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from wa.v1 import agent_pb2, agent_pb2_grpc, dlq_pb2, dlq_pb2_grpc, state_pb2, state_pb2_grpc

from common import grpcserver, tls
from tests.conftest import StartSystem
from tests.support import payloads
from tests.support.fakes import FakeGraph
from tests.support.system import System

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


async def _code(call: object) -> grpc.StatusCode:
    """The status of a call that must fail."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await call  # type: ignore[misc]
    return failed.value.code()


async def _refused_everything(target: str, transport: tls.Transport) -> list[str]:
    """What this caller got from the port: nothing, if the list is empty."""
    got = []
    async with grpcserver.channel(target, transport=transport, traced=False) as ch:
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        if await _code(health) != grpc.StatusCode.UNAVAILABLE:
            got.append("health")
        reflection = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        try:
            async for _ in reflection:
                got.append("reflection")
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                got.append(f"reflection {exc.code().name}")
        # An RPC each service answers the operator.
        dlq = dlq_pb2_grpc.DlqStub(ch).List(dlq_pb2.ListRequest(), timeout=5)
        if await _code(dlq) != grpc.StatusCode.UNAVAILABLE:
            got.append("an RPC")
    return got


async def test_no_caller_without_a_certificate_of_the_systems_ca_gets_anything(
    start_system: StartSystem, tmp_path: Path
) -> None:
    # (Unset for the services: this process has it from importing them.)
    system = await start_system(GRPC_VERBOSITY="")
    other = tmp_path / "another-ca"
    tls.create(other)
    mine = system.transport("operator")
    assert mine is not None
    foreign = tls.Credentials.load(other, "operator")
    strangers: dict[str, tls.Transport] = {
        "plaintext": None,
        # Trusts the system's CA (it is no secret) but presents another CA's certificate.
        "another CA's certificate": tls.Credentials(
            "operator", ca=mine.ca, cert=foreign.cert, key=foreign.key
        ),
    }
    for name in ("state", "agent", "dlq"):
        target = f"127.0.0.1:{system.ports[name]}"
        for who, transport in strangers.items():
            assert await _refused_everything(target, transport) == [], (name, who)
        # The same port answers the system's own certificate.
        ok, detail = await grpcserver.check_health(target, transport=mine)
        assert ok, (name, detail)
    # Refused in silence: the logs stay JSON lines (gRPC's C core logged each failed
    # handshake on stderr, in its own format).
    for name in ("state", "agent", "dlq"):
        lines = system.log_path(name).read_text(errors="replace").splitlines()
        assert all(line.startswith("{") for line in lines if line), (name, lines[-5:])


async def test_a_certificate_of_the_system_calls_only_what_its_identity_calls(
    start_system: StartSystem,
) -> None:
    system = await start_system()

    def target(name: str) -> str:
        return f"127.0.0.1:{system.ports[name]}"

    async with (
        grpcserver.channel(target("dlq"), transport=system.transport("gateway")) as gw_dlq,
        grpcserver.channel(target("agent"), transport=system.transport("gateway")) as gw_agent,
        grpcserver.channel(target("state"), transport=system.transport("operator")) as op_state,
        grpcserver.channel(target("dlq"), transport=system.transport("operator")) as op_dlq,
    ):
        # The internet-facing gateway cannot purge the DLQ or make the agent send a reply...
        with pytest.raises(grpc.aio.AioRpcError) as purge:
            await dlq_pb2_grpc.DlqStub(gw_dlq).Purge(dlq_pb2.PurgeRequest(ids=[1]), timeout=5)
        assert purge.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert purge.value.details() == "gateway may not call /wa.v1.Dlq/Purge"
        reply = agent_pb2_grpc.AgentStub(gw_agent).Reply(agent_pb2.ReplyRequest(), timeout=5)
        assert await _code(reply) == grpc.StatusCode.PERMISSION_DENIED
        # (nor on the turns' stream, checked when the call opens)
        # Nothing is written: the refusal needs none, and a write that meets the call's end
        # makes grpc's client record its own INTERNAL ("Failed execute_batch") as the call's
        # status, which CI met twice.
        turns = agent_pb2_grpc.AgentStub(gw_agent).Turns(timeout=5)
        with pytest.raises(grpc.aio.AioRpcError):
            await turns.read()
        assert await turns.code() == grpc.StatusCode.PERMISSION_DENIED
        assert await turns.details() == "gateway may not call /wa.v1.Agent/Turns"
        # ...nor an operator inject a message past the webhook's signature check.
        ingest = state_pb2_grpc.StateStub(op_state).IngestBatch(
            state_pb2.IngestBatchRequest(), timeout=5
        )
        assert await _code(ingest) == grpc.StatusCode.PERMISSION_DENIED
        # What each one does call is answered.
        await agent_pb2_grpc.AgentStub(gw_agent).GetStatus(agent_pb2.GetStatusRequest(), timeout=5)
        listed = await dlq_pb2_grpc.DlqStub(op_dlq).List(dlq_pb2.ListRequest(), timeout=5)
        assert list(listed.items) == []
        health = health_pb2_grpc.HealthStub(gw_dlq)
        assert (await health.Check(health_pb2.HealthCheckRequest(), timeout=5)).status == (
            health_pb2.HealthCheckResponse.SERVING
        )


def _healthcheck(system: System, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "common.healthcheck", *args],
        env={**os.environ, **system.env, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_probes_answer_over_the_metrics_port_without_a_certificate(
    start_system: StartSystem,
) -> None:
    system = await start_system()
    for name in ("state", "agent", "dlq"):
        base = f"http://127.0.0.1:{system.ports[f'm_{name}']}"
        assert (await system.http.get(f"{base}/healthz")).status_code == 200
        ready = await system.http.get(f"{base}/readyz")
        assert (ready.status_code, ready.text) == (200, "serving\n")
        metrics = await system.http.get(f"{base}/metrics")
        assert metrics.status_code == 200 and "process_start_time_seconds" in metrics.text
        # What a compose healthcheck runs: over HTTP, and over gRPC as the operator.
        http = await asyncio.to_thread(_healthcheck, system, "http", f"{base}/readyz")
        assert http.returncode == 0, http.stderr
        grpc_check = await asyncio.to_thread(
            _healthcheck, system, "grpc", f"127.0.0.1:{system.ports[name]}"
        )
        assert (grpc_check.returncode, grpc_check.stdout) == (0, "SERVING\n"), grpc_check.stderr
    lost = await asyncio.to_thread(
        _healthcheck, system, "grpc", f"127.0.0.1:{system.ports['dlq']}", GRPC_TLS_DIR="/nowhere"
    )
    assert lost.returncode == 2 and "cannot read /nowhere/ca.crt" in lost.stderr


async def test_grpc_insecure_is_plaintext_and_every_process_says_so(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system(GRPC_INSECURE="true")
    assert not (system.root / "tls").exists()
    doc = payloads.text_delivery("hello over plaintext")
    message_id = doc["entry"][0]["changes"][0]["value"]["messages"][0]["id"]
    await system.deliver(doc)
    await system.wait_status([message_id], {"replied"})
    ok, _ = await grpcserver.check_health(f"127.0.0.1:{system.ports['dlq']}", transport=None)
    assert ok
    for name in ("state", "agent", "dlq", "gateway"):
        warnings = [
            line
            for line in system.log_lines(name)
            if line["level"] == "WARNING" and "GRPC_INSECURE=true" in line["msg"]
        ]
        assert len(warnings) == 1, name
