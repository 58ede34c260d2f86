"""The walking skeleton, driven from outside: signed deliveries in, Graph API calls out."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common import grpcserver, roles
from tests.conftest import StartSystem
from tests.support import payloads
from tests.support.fakes import FakeGraph
from tests.support.servers import Postgres, Redis, with_database
from tests.support.system import ACCESS_TOKEN, VERIFY_TOKEN, System, readiness

pytestmark = pytest.mark.e2e


async def test_signed_text_gets_exactly_one_reply_after_the_ack(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system()
    graph.release.clear()  # the Graph API holds every reply until the test lets it go
    doc = payloads.text_delivery("hello, I need help", wa_id="15551234567")
    message_id = doc["entry"][0]["changes"][0]["value"]["messages"][0]["id"]

    started = time.monotonic()
    resp = await system.post(doc)
    acked_at = time.monotonic()
    assert resp.status_code == 200, resp.text
    assert resp.json()["stored"] == 1
    # Acknowledged while the Graph API holds every reply (for 30 s): the ack did not wait for
    # one. (Whether the agent's send reached the fake before the test read the 200 is a race
    # between processes, not a property of the ack.)
    assert acked_at - started < 5
    assert not any(r.answered for r in graph.sends)

    graph.release.set()
    assert graph.wait_for(lambda: len(graph.sends) >= 1)
    await system.wait_status([message_id], {"replied"})
    await asyncio.sleep(0.5)  # a second call would have arrived by now
    sends = graph.sends
    assert len(sends) == 1
    call = sends[0]
    assert call.path == f"/v23.0/{payloads.PHONE_NUMBER_ID}/messages"
    assert call.headers["authorization"] == f"Bearer {ACCESS_TOKEN}"
    assert call.body["messaging_product"] == "whatsapp"
    assert call.body["to"] == "15551234567"
    assert call.body["type"] == "text"
    assert call.body["text"]["body"].strip()
    assert call.body["context"]["message_id"] == message_id


@pytest.mark.parametrize(
    "headers",
    [
        {},  # unsigned
        {"X-Hub-Signature-256": "sha256=" + "0" * 64},  # forged
        {"X-Hub-Signature-256": "md5=abc"},  # malformed
    ],
)
async def test_unsigned_and_forged_deliveries_are_refused(
    start_system: StartSystem, graph: FakeGraph, headers: dict[str, str]
) -> None:
    system = await start_system()
    doc = payloads.text_delivery("sneaky")
    body, _ = payloads.sign(doc, "irrelevant")
    resp = await system.http.post(
        f"{system.url}/webhook",
        content=body,
        headers={"Content-Type": "application/json", **headers},
    )
    assert resp.status_code == 401
    wrong = await system.post(doc, secret="not-the-app-secret")
    assert wrong.status_code == 401
    await asyncio.sleep(0.5)
    assert await system.statuses() == {}
    assert graph.sends == []


async def test_bad_bodies_are_answered_and_never_crash(start_system: StartSystem) -> None:
    system = await start_system()
    not_json = await system.post(b"{not json")
    assert not_json.status_code == 400
    array = await system.post(b"[1, 2, 3]")
    assert array.status_code == 400
    odd = await system.post({"object": "whatsapp_business_account", "entry": [{"changes": 7}]})
    assert odd.status_code == 200
    big = await system.post(b'{"x": "' + b"a" * (4 * 1024 * 1024 + 10) + b'"}')
    assert big.status_code == 413
    assert (await system.http.get(f"{system.url}/healthz")).status_code == 200


async def test_verification_handshake(start_system: StartSystem) -> None:
    system = await start_system()
    ok = await system.http.get(
        f"{system.url}/webhook",
        params={
            "hub.mode": "subscribe",
            "hub.verify_token": VERIFY_TOKEN,
            "hub.challenge": "1158201444",
        },
    )
    assert ok.status_code == 200
    assert ok.text == "1158201444"
    for params in (
        {"hub.mode": "subscribe", "hub.verify_token": "wrong", "hub.challenge": "x"},
        {"hub.mode": "unsubscribe", "hub.verify_token": VERIFY_TOKEN, "hub.challenge": "x"},
        {},
    ):
        refused = await system.http.get(f"{system.url}/webhook", params=params)
        assert refused.status_code == 403


async def test_every_grpc_service_serves_health_and_reflection(start_system: StartSystem) -> None:
    system = await start_system()
    expected = {"state": "wa.v1.State", "agent": "wa.v1.Agent", "dlq": "wa.v1.Dlq"}
    for name, service in expected.items():
        target = f"127.0.0.1:{system.ports[name]}"
        async with grpcserver.channel(target, transport=system.transport()) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            for svc in ("", service):
                resp = await health.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            listed: set[str] = set()
            async for answer in stub.ServerReflectionInfo(iter([request]), timeout=5):
                listed |= {s.name for s in answer.list_services_response.service}
            assert {service, "grpc.health.v1.Health"} <= listed


async def test_health_readiness_and_metrics(start_system: StartSystem) -> None:
    system = await start_system()
    assert (await system.http.get(f"{system.url}/healthz")).status_code == 200
    ready = await system.http.get(f"{system.url}/readyz")
    assert ready.status_code == 200
    names = {c["name"] for c in ready.json()["components"] if c["healthy"]}
    assert names == {"postgres", "redis", "state", "agent", "dlq"}
    await system.post(payloads.text_delivery("hi"))
    metrics = await system.http.get(f"{system.url}/metrics")
    assert metrics.status_code == 200
    assert 'wa_gateway_deliveries_total{result="stored"} 1.0' in metrics.text
    # The gRPC services expose their own metrics ports.
    state_metrics = await system.http.get(f"http://127.0.0.1:{system.ports['m_state']}/metrics")
    assert "wa_state_ingested_total" in state_metrics.text

    await system.sup.stop(["agent"])
    _, not_ready = await readiness(system, lambda status, _: status == 503)
    down = [c for c in not_ready["components"] if not c["healthy"]]
    assert [c["name"] for c in down] == ["agent"]


async def test_unanswered_message_types_and_statuses_are_stored_and_skipped(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system()
    # Every other kind is answered (tests/e2e/test_inbound.py).
    others = [payloads.message(kind) for kind in ("reaction", "system", "request_welcome")]
    statuses = [payloads.status("wamid.OUT1", s) for s in ("sent", "delivered", "read")]
    resp = await system.post(payloads.delivery(messages=others, statuses=statuses))
    assert resp.status_code == 200
    ids = [m["id"] for m in others]
    await system.wait_status(ids, {"skipped"}, timeout=5)
    pool = await system.db()
    reasons = await pool.fetch(
        "SELECT message_type, status_reason FROM processed_webhook_messages WHERE kind='message'"
    )
    assert all(r["status_reason"] and r["message_type"] in r["status_reason"] for r in reasons)
    stored_statuses = await pool.fetchval(
        "SELECT count(*) FROM processed_webhook_messages WHERE kind = 'status'"
    )
    assert stored_statuses == 3
    await asyncio.sleep(0.5)
    assert graph.sends == []


async def test_an_empty_database_is_migrated_and_provisioned_by_the_owner_first(
    tmp_path: Path, pg: Postgres, redis_server: Redis, redis_prefix: str, graph: FakeGraph
) -> None:
    """What compose's one-shot job does: `python -m common.migrate` with the owner's URL and
    each service's (from secrets); the services then run as those roles."""
    name = f"wa_empty_{uuid.uuid4().hex[:8]}"
    await pg._admin(f'CREATE DATABASE "{name}"')
    pg.created.append(name)
    dsn = with_database(pg.admin_dsn, name)
    logins = {
        roles.VARIABLES[s]: roles.with_login(dsn, roles.default_name(name, s), f"pw-{s}-x9")
        for s in roles.SERVICES
    }
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "common.migrate"],
        env={**os.environ, "DATABASE_URL": dsn, "RUN_DIR": str(tmp_path / "run"), **logins},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "pw-" not in done.stderr + done.stdout  # never a password in a log line
    assert not (tmp_path / "run").exists()  # nothing generated, nothing written
    system = System(
        tmp_path,
        dsn,
        redis_server.url,
        redis_prefix,
        {"WHATSAPP_API_BASE_URL": graph.url, **logins},
    )
    try:
        await system.start()
        doc = payloads.text_delivery("hello")
        message_id = doc["entry"][0]["changes"][0]["value"]["messages"][0]["id"]
        assert (await system.post(doc)).status_code == 200
        await system.wait_status([message_id], {"replied"})
    finally:
        await system.stop()


@pytest.mark.parametrize("port_variable", ["AGENT_GRPC_PORT", "METRICS_PORT"])
async def test_a_service_whose_port_is_taken_says_which_and_exits_2(
    tmp_path: Path, database_url: str, redis_server: Redis, redis_prefix: str, port_variable: str
) -> None:
    system = System(tmp_path, database_url, redis_server.url, redis_prefix, {})
    await system.provision()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        env = {**os.environ, **system.env_for("agent"), port_variable: str(taken)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "services.agent",
            env=env,
            stderr=asyncio.subprocess.PIPE,
        )
        async with asyncio.timeout(60):
            _, stderr = await proc.communicate()
    assert proc.returncode == 2
    (line,) = [json.loads(x) for x in stderr.decode().splitlines() if '"CRITICAL"' in x]
    assert str(taken) in line["msg"] and "cannot be bound" in line["msg"]
