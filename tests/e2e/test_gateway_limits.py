"""The gateway against a hostile internet, over real sockets to the real gateway process:
slow headers and bodies cut off, a concurrency limit answered 503, a bounded ingest queue
(503 with Retry-After while the state service is stalled), /readyz from a cached check."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx

from devtools.system import sign
from tests.conftest import StartSystem
from tests.support import payloads
from tests.support.relay import Relay
from tests.support.system import SECRET, System, readiness

# Bounds on how long the gateway may take to act, not performance assertions: without the
# limits under test the connections stay open for ever.
GRACE = 20.0


def text(body: str, wa_id: str = "15550001111") -> dict[str, Any]:
    return payloads.delivery(messages=[payloads.message("text", wa_id=wa_id, text={"body": body})])


async def connect(system: System) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", system.ports["gateway"])


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """What the server sent before it closed the connection, which it must do in time."""
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
        except TimeoutError:
            break
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"the gateway kept the connection open (received {received!r})")


@contextlib.asynccontextmanager
async def trickle(writer: asyncio.StreamWriter, data: bytes, every: float) -> AsyncIterator[None]:
    """Sends `data` one byte every `every` seconds in the background (a slowloris)."""

    async def run() -> None:
        with contextlib.suppress(OSError):
            for i in range(len(data)):
                writer.write(data[i : i + 1])
                await writer.drain()
                await asyncio.sleep(every)

    task = asyncio.create_task(run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        writer.close()


def request_head(body: bytes, headers: dict[str, str]) -> bytes:
    lines = [
        "POST /webhook HTTP/1.1",
        "Host: 127.0.0.1",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def test_slow_headers_are_cut_off_while_deliveries_go_on(
    start_system: StartSystem,
) -> None:
    # (Longer than the test client keeps an idle connection: it never reuses a closing one.)
    system = await start_system(GATEWAY_HEADER_TIMEOUT_SECONDS="3")
    body, headers = sign(text("slowloris"), SECRET)
    loris_reader, loris_writer = await connect(system)
    idle_reader, idle_writer = await connect(system)  # opens and never says a word
    async with trickle(loris_writer, request_head(body, headers), every=1.0):
        ok = await system.post(text("a normal delivery meanwhile"))
        assert ok.status_code == 200
        assert await closed_within(loris_reader, GRACE) == b""
        assert await closed_within(idle_reader, GRACE) == b""
    idle_writer.close()
    metrics = (await system.http.get(f"{system.url}/metrics")).text
    cut = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('wa_gateway_connections_refused_total{reason="header_timeout"}')
    )
    assert cut >= 2


async def test_a_trickling_body_is_answered_408_and_cut(start_system: StartSystem) -> None:
    system = await start_system(GATEWAY_BODY_TIMEOUT_SECONDS="2")
    body, headers = sign(text("a body sent one byte a second"), SECRET)
    reader, writer = await connect(system)
    writer.write(request_head(body, headers))
    async with trickle(writer, body, every=1.0):
        answer = await closed_within(reader, GRACE)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert (await system.post(text("and the next one is fine"))).status_code == 200


async def test_oversized_headers_are_answered_431(start_system: StartSystem) -> None:
    system = await start_system(GATEWAY_MAX_HEADER_BYTES="4096")
    reader, writer = await connect(system)
    writer.write(b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"a" * 100_000)
    with contextlib.suppress(ConnectionResetError):
        await writer.drain()
    assert (await closed_within(reader, GRACE)).startswith(b"HTTP/1.1 431 ")
    writer.close()


async def test_beyond_the_concurrency_limit_requests_get_503_not_a_wait_but_liveness_answers(
    start_system: StartSystem,
) -> None:
    system = await start_system(GATEWAY_MAX_CONCURRENCY="4", GATEWAY_HEADER_TIMEOUT_SECONDS="60")
    held = [await connect(system) for _ in range(4)]
    # A fresh connection (no pool): the limit counts connections.
    async with httpx.AsyncClient(timeout=GRACE) as client:
        body, headers = sign(text("over the limit"), SECRET)
        refused = await client.post(f"{system.url}/webhook", content=body, headers=headers)
        assert refused.status_code == 503
        # Still alive to its liveness probe (not restarted for being flooded), no longer ready.
        alive = await client.get(f"{system.url}/healthz")
        assert alive.status_code == 200, alive.text
        assert (await client.get(f"{system.url}/readyz")).status_code == 503
        for _, writer in held:
            writer.close()
        await asyncio.sleep(0.5)
    async with httpx.AsyncClient(timeout=GRACE) as client:
        accepted = await client.post(f"{system.url}/webhook", content=body, headers=headers)
        assert accepted.status_code == 200


async def test_a_full_ingest_queue_answers_503_with_retry_after_at_once(
    start_system: StartSystem,
) -> None:
    system = await start_system(GATEWAY_QUEUE_MAX_DELIVERIES="2", GATEWAY_RETRY_AFTER_SECONDS="7")
    state = system.sup.pid("state")
    assert state is not None
    deliveries = [text(f"while state is stalled {n}", wa_id=f"1555000{n:04d}") for n in range(24)]
    ids = [d["entry"][0]["changes"][0]["value"]["messages"][0]["id"] for d in deliveries]
    os.kill(state, signal.SIGSTOP)  # batches now wait: deliveries pile up
    try:
        posts = [asyncio.create_task(system.post(d)) for d in deliveries]
        done, _ = await asyncio.wait(posts, timeout=3)
        answered = [t.result() for t in done]
        metrics = (await system.http.get(f"{system.url}/metrics")).text
    finally:
        os.kill(state, signal.SIGCONT)
    full = [r for r in answered if r.status_code == 503]
    # At most 4 batches in flight and 2 waiting: most of 24 are refused, and at once.
    assert len(full) >= 24 - 4 * 2 - 2, [r.status_code for r in answered]
    assert all(r.headers["retry-after"] == "7" for r in full)
    assert all("too many deliveries waiting" in r.json()["error"] for r in full)
    queued = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("wa_gateway_ingest_queue_deliveries ")
    )
    assert queued <= 2
    assert f'wa_gateway_deliveries_total{{result="queue_full"}} {float(len(full))}' in metrics
    await asyncio.gather(*posts, return_exceptions=True)
    # Meta retries what was refused: every message is stored and answered once state is back.
    for d in deliveries:
        assert (await system.deliver(d)).status_code == 200
    await system.wait_status(ids, {"replied"}, timeout=60)


async def test_readyz_answers_from_a_cached_check_not_a_check_per_request(
    start_system: StartSystem,
) -> None:
    system = await start_system()
    proxy = Relay(upstream=("127.0.0.1", system.ports["agent"]))
    port = await proxy.start()
    try:
        # Only the gateway reaches the agent through the proxy.
        await system.restart(
            "gateway", AGENT_ADDR=f"127.0.0.1:{port}", GATEWAY_READY_REFRESH_SECONDS="5"
        )
        await system.wait_ready()
        before, started = proxy.accepted, time.monotonic()
        for _ in range(40):
            assert (await system.http.get(f"{system.url}/readyz")).status_code == 200
        elapsed = time.monotonic() - started
        # A check opens two connections to the agent (health, breaker status); one runs every
        # 5 s. A check per request would have opened 80.
        assert proxy.accepted - before <= 2 * (elapsed / 5 + 2), proxy.accepted - before
        await system.sup.stop(["agent"])
        _, body = await readiness(system, lambda status, _: status == 503)
        assert [c["name"] for c in body["components"] if not c["healthy"]] == ["agent"]
        assert body["status"] == "not ready"
        # The reason in one line, first: what is down and what it said.
        assert body["reason"].startswith("agent: ") and "UNAVAILABLE" in body["reason"]
    finally:
        await proxy.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length: its status and body."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GRACE)
    lines = head.decode("latin-1").split("\r\n")
    length = next(
        int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")
    )
    body = await asyncio.wait_for(reader.readexactly(length), GRACE)
    return int(lines[0].split()[1]), body


async def refused(system: System, reason: str) -> float:
    metrics = (await system.http.get(f"{system.url}/metrics")).text
    return next(
        (
            float(line.split()[-1])
            for line in metrics.splitlines()
            if line.startswith(f'wa_gateway_connections_refused_total{{reason="{reason}"}}')
        ),
        0.0,
    )


async def test_a_busy_keep_alive_connection_outlives_the_header_timeout(
    start_system: StartSystem,
) -> None:
    # The header deadline starts again at each response: a connection that keeps sending
    # whole requests is never cut off, however long it lives.
    system = await start_system(GATEWAY_HEADER_TIMEOUT_SECONDS="2")
    reader, writer = await connect(system)
    for n in range(10):  # 5 s: past the first request's header deadline twice over
        body, headers = sign(text(f"on one connection {n}", wa_id=f"1555001{n:04d}"), SECRET)
        writer.write(request_head(body, headers) + body)
        status, answer = await read_response(reader)
        assert status == 200, answer
        await asyncio.sleep(0.5)
    # Then silent: its next headers never come, and the connection is closed for that.
    assert await closed_within(reader, GRACE) == b""
    writer.close()
    assert await refused(system, "header_timeout") >= 1


async def test_an_idle_connection_after_a_response_is_closed_by_keep_alive(
    start_system: StartSystem,
) -> None:
    # A header timeout longer than uvicorn's keep-alive (5 s): the keep-alive closes it, and
    # that is not counted as a refused connection.
    system = await start_system(GATEWAY_HEADER_TIMEOUT_SECONDS="60")
    reader, writer = await connect(system)
    body, headers = sign(text("then nothing more"), SECRET)
    writer.write(request_head(body, headers) + body)
    status, answer = await read_response(reader)
    assert status == 200, answer
    assert await closed_within(reader, GRACE) == b""
    writer.close()
    assert await refused(system, "header_timeout") == 0
