"""The gateway's HTTP protocol (services/gateway/connections.py) writes each response's head
with its body: a client still gets every response whole, whatever its shape, and a client that
waits for `100 Continue` before its body still gets it first."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from devtools.ports import free_port
from services.gateway import connections

WAIT = 10.0  # bound on every read: a response held back fails the test instead of hanging


async def echo(request: Request) -> Response:
    return PlainTextResponse(b"got " + await request.body())


async def empty(request: Request) -> Response:
    return Response(status_code=204)


async def stream(request: Request) -> Response:
    async def parts() -> AsyncIterator[bytes]:
        for part in (b"one,", b"two,", b"three"):
            yield part

    return StreamingResponse(parts(), media_type="text/plain")


@pytest.fixture
async def server() -> AsyncIterator[int]:
    app = Starlette(
        routes=[
            Route("/echo", echo, methods=["GET", "POST"]),
            Route("/empty", empty, methods=["POST"]),
            Route("/stream", stream, methods=["GET"]),
        ]
    )
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        lifespan="off",
        http=connections.protocol(header_timeout=10, body_timeout=10, max_header_bytes=65536),
    )
    srv = uvicorn.Server(config)
    task = asyncio.create_task(srv.serve())
    for _ in range(500):
        if srv.started:
            break
        await asyncio.sleep(0.01)
    yield port
    srv.should_exit = True
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, WAIT)


async def response(
    reader: asyncio.StreamReader, *, head: bool = False
) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One response: status line, headers, body (by Content-Length, or chunked; none to a
    HEAD request)."""
    raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    status, *lines = raw[:-4].split(b"\r\n")
    headers = dict(line.lower().split(b": ", 1) for line in lines)
    if head:
        return status, headers, b""
    if b"content-length" in headers:
        body = await asyncio.wait_for(reader.readexactly(int(headers[b"content-length"])), WAIT)
        return status, headers, body
    if headers.get(b"transfer-encoding") != b"chunked":
        return status, headers, b""
    body = b""
    while True:
        size = int(await asyncio.wait_for(reader.readuntil(b"\r\n"), WAIT), 16)
        chunk = await asyncio.wait_for(reader.readexactly(size + 2), WAIT)
        if not size:
            return status, headers, body
        body += chunk[:-2]


async def test_responses_of_every_shape_arrive_whole_on_one_connection(server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    status, headers, body = await response(reader)
    assert (status, body) == (b"HTTP/1.1 200 OK", b"got hello")
    assert headers[b"content-type"] == b"text/plain; charset=utf-8"
    # A head without a body (HEAD), an empty body (204), a streamed one: each whole, in order.
    writer.write(b"HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    status, headers, _ = await response(reader, head=True)
    assert (status, headers[b"content-length"]) == (b"HTTP/1.1 200 OK", b"4")
    writer.write(b"POST /empty HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
    status, _, body = await response(reader)
    assert (status, body) == (b"HTTP/1.1 204 No Content", b"")
    writer.write(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await response(reader))[2] == b"one,two,three"
    writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nbye")
    assert (await response(reader))[2] == b"got bye"
    writer.close()


async def test_a_client_waiting_for_100_continue_gets_it_before_sending_its_body(
    server: int,
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
    )
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT)
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hello")
    status, _, body = await response(reader)
    assert (status, body) == (b"HTTP/1.1 200 OK", b"got hello")
    writer.close()


async def test_a_response_without_keep_alive_is_written_before_the_close(server: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    writer.write(
        b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi"
    )
    status, _, body = await response(reader)
    assert (status, body) == (b"HTTP/1.1 200 OK", b"got hi")
    assert await asyncio.wait_for(reader.read(), WAIT) == b""
    writer.close()
