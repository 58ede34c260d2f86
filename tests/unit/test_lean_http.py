"""The agent's lean JSON POST (services/agent/http.py, LeanPool): answers and failures as
aiohttp gives them, so GraphClient tells "not sent" from "maybe sent" the same either way."""

from __future__ import annotations

import asyncio
import gzip
import socket
import struct
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest

from services.agent import http
from services.agent.deadline import Deadline
from services.agent.graph import GraphClient, GraphError
from services.agent.outbound import GraphAction

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Raw:
    """A loopback server whose every connection runs `handler`; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[tuple[bytes, bytes]] = []
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.url = ""

    async def __aenter__(self) -> Raw:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            task = asyncio.current_task()
            assert task is not None
            self.tasks.add(task)
            try:
                await self.handler(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.server.wait_closed()

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
        self.requests.append((head, body))
        return head, body


def reply(status: int, body: bytes, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with http.session(lean=True) as s:
        yield s


async def post(s: aiohttp.ClientSession, url: str, timeout: float = 5.0) -> http.Answer:
    return await http.post_json(
        s,
        f"{url}/v23.0/123/messages",
        {"a": 1},
        headers={"Authorization": "Bearer t"},
        timeout=timeout,
    )


async def test_the_lean_pool_answers_like_aiohttp_and_keeps_its_connection(
    session: aiohttp.ClientSession,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await raw.read_request(reader)
            writer.write(reply(200, b'{"ok":true}', "X-Thing: Yes", "Content-Type: json"))

    async with Raw(handler) as raw:
        first = await post(session, raw.url)
        second = await post(session, raw.url)
    assert (first.status, first.json()) == (200, {"ok": True})
    assert first.headers["x-thing"] == "Yes" and second.status == 200
    assert raw.connections == 1  # kept alive
    head, body = raw.requests[0]
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v23.0/123/messages HTTP/1.1"
    assert f"Host: {raw.url.removeprefix('http://')}" in lines
    assert "Authorization: Bearer t" in lines and "Content-Type: application/json" in lines
    assert orjson.loads(body) == {"a": 1}


async def test_chunked_and_close_delimited_bodies_are_read_whole(
    session: aiohttp.ClientSession,
) -> None:
    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5\r\n{"a":\r\n2\r\n2}\r\n0\r\n\r\n'
        )
        await raw.read_request(reader)
        writer.write(b"HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\nbusy")
        await writer.drain()
        writer.close()

    async with Raw(chunked) as raw:
        assert (await post(session, raw.url)).json() == {"a": 2}
        failed = await post(session, raw.url)
    assert (failed.status, failed.body) == (500, b"busy")


async def test_a_connection_closed_before_the_answer_may_have_sent_it() -> None:
    """The request was written, no answer came: GraphClient must not send it again."""

    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)

    raw = Raw(hang_up)
    await _failed_and_not_sent_again(raw, True, aiohttp.ServerDisconnectedError)


async def _failed_and_not_sent_again(raw: Raw, lean: bool, cause: type[BaseException]) -> None:
    """A request `raw` reads and answers nothing to fails with `cause`, not as a timeout, and
    GraphClient sends it once."""
    async with raw, http.session(lean=lean) as s:
        with pytest.raises(http.HttpFailure) as failed:
            await post(s, raw.url)
        assert isinstance(failed.value.__cause__, cause)
        assert not failed.value.timeout
        graph = GraphClient(s, base_url=raw.url, version="v23.0", access_token="t")
        with pytest.raises(GraphError) as sent:
            await graph.send_text("123", "15550001111", "hi", reply_to="wamid.IN")
    assert sent.value.action is GraphAction.DLQ and sent.value.status == 0
    assert len(raw.requests) == 2  # one per call: the send was not tried again


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "aiohttp"])
async def test_a_connection_reset_before_the_answer_may_have_sent_it(lean: bool) -> None:
    """The request was written and the connection was reset (RST, not a close) before any
    answer: the server may have acted on it as much as after a close (a proxy that fails after
    forwarding, a server that crashes after accepting). GraphClient must not send it again in
    the turn: the next turn waits for the reply's status webhook instead."""

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()  # with a zero linger: an RST

    raw = Raw(reset)
    await _failed_and_not_sent_again(raw, lean, aiohttp.ClientOSError)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "aiohttp"])
async def test_a_send_that_could_not_connect_was_not_sent_and_may_be_tried_again(
    lean: bool,
) -> None:
    async with Raw(lambda r, w: asyncio.sleep(0)) as raw:
        url = raw.url  # closed: nothing listens there any more
    async with http.session(lean=lean) as s:
        graph = GraphClient(s, base_url=url, version="v23.0", access_token="t", max_retries=0)
        with pytest.raises(GraphError) as failed:
            await graph.send_text("123", "15550001111", "hi", reply_to="wamid.IN")
    assert failed.value.action is GraphAction.RETRY and failed.value.status == 0


async def test_a_body_cut_short_is_a_payload_error(session: aiohttp.ClientSession) -> None:
    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n{"a"')
        await writer.drain()

    async with Raw(short) as raw:
        with pytest.raises(http.HttpFailure) as failed:
            await post(session, raw.url)
    assert isinstance(failed.value.__cause__, aiohttp.ClientPayloadError)


async def test_no_answer_in_time_is_a_timeout_and_the_connection_is_dropped(
    session: aiohttp.ClientSession,
) -> None:
    slow = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await raw.read_request(reader)
            if not slow.is_set():
                slow.set()
                await asyncio.sleep(0.5)  # answers late, on the connection given up
            writer.write(reply(200, b"{}"))

    async with Raw(handler) as raw:
        with pytest.raises(http.HttpFailure) as failed:
            await post(session, raw.url, timeout=0.1)
        assert failed.value.timeout
        assert (await post(session, raw.url)).status == 200
    assert raw.connections == 2


async def test_no_answer_in_time_on_a_kept_alive_connection_is_a_timeout_too(
    session: aiohttp.ClientSession,
) -> None:
    """The answer awaited on a connection kept from an earlier request (timed by the pool's
    watch, not by the request's own timeout): late, it is a timeout, soon after the timeout,
    and that connection is not used again."""
    answered = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        while True:
            await raw.read_request(reader)
            answered += 1
            if answered == 2:
                await asyncio.sleep(2.0)  # answers late, on the connection given up
            writer.write(reply(200, b"{}"))

    async with Raw(handler) as raw:
        assert (await post(session, raw.url)).status == 200
        started = time.monotonic()
        with pytest.raises(http.HttpFailure) as failed:
            await post(session, raw.url, timeout=0.2)
        assert failed.value.timeout
        assert time.monotonic() - started < 1.0
        assert raw.connections == 1  # the kept-alive one
        assert (await post(session, raw.url)).status == 200
    assert raw.connections == 2


async def test_no_connection_is_a_failure_nothing_was_sent(
    session: aiohttp.ClientSession,
) -> None:
    async with Raw(lambda r, w: asyncio.sleep(0)) as raw:
        url = raw.url
    with pytest.raises(http.HttpFailure) as failed:
        await post(session, url)
    assert not failed.value.timeout
    cause = failed.value.__cause__
    assert not isinstance(cause, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError)


async def test_an_idle_connection_the_server_closed_is_not_reused(
    session: aiohttp.ClientSession,
) -> None:
    async def once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        writer.write(reply(200, b"{}"))
        await writer.drain()
        writer.close()  # keep-alive announced, then closed while idle

    async with Raw(once) as raw:
        assert (await post(session, raw.url)).status == 200
        await asyncio.sleep(0.1)
        assert (await post(session, raw.url)).status == 200
    assert raw.connections == 2


@pytest.mark.parametrize(("status", "method"), [(303, "GET"), (307, "POST")])
async def test_a_redirect_is_followed_as_aiohttp_follows_it(
    session: aiohttp.ClientSession, status: int, method: str
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, _ = await raw.read_request(reader)
            if head.startswith(b"POST /v23.0"):
                writer.write(reply(status, b"", "Location: /elsewhere"))
            else:
                writer.write(reply(200, b'{"at":"elsewhere"}'))

    async with Raw(handler) as raw:
        answer = await post(session, raw.url)
    assert answer.json() == {"at": "elsewhere"}
    assert raw.requests[1][0].startswith(f"{method} /elsewhere ".encode())


async def test_closing_the_session_closes_the_lean_connections() -> None:
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        writer.write(reply(200, b"{}"))
        if not await reader.read(1):
            closed.set()

    async with Raw(handler) as raw:
        async with http.session(lean=True) as s:
            await post(s, raw.url)
        await asyncio.wait_for(closed.wait(), 2)


def test_the_lean_pool_is_off_when_traces_are_exported(monkeypatch: Any) -> None:
    """aiohttp's instrumentation makes the Graph calls' spans: traced, aiohttp sends them."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.delenv("OTEL_SDK_DISABLED", raising=False)

    async def lean() -> Any:
        async with http.session() as s:
            return getattr(s.connector, "lean", None)

    assert asyncio.run(lean()) is None


async def test_an_idle_connection_past_the_keepalive_is_closed_not_reused(
    session: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await raw.read_request(reader)
            writer.write(reply(200, b"{}"))

    monkeypatch.setattr(http, "KEEPALIVE_SECONDS", 0.05)
    async with Raw(handler) as raw:
        await post(session, raw.url)
        await asyncio.sleep(0.1)
        await post(session, raw.url)
    assert raw.connections == 2


async def test_mark_read_ends_by_its_deadline(session: aiohttp.ClientSession) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        await asyncio.sleep(5)

    async with Raw(silent) as raw:
        graph = GraphClient(session, base_url=raw.url, version="v23.0", access_token="t")
        started = asyncio.get_running_loop().time()
        with pytest.raises(GraphError) as failed:
            await graph.mark_read("123", "wamid.IN", deadline=Deadline.after(0.6))
    assert failed.value.code == "timeout"
    assert asyncio.get_running_loop().time() - started < 2


async def test_an_answer_that_is_no_http_is_a_response_error(
    session: aiohttp.ClientSession,
) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await asyncio.sleep(1)

    async with Raw(garbage) as raw:
        with pytest.raises(http.HttpFailure) as failed:
            await post(session, raw.url)
    assert isinstance(failed.value.__cause__, aiohttp.ClientResponseError)
    assert str(failed.value).startswith("ClientResponseError: 400")


async def test_a_compressed_body_is_decompressed_as_aiohttp_does(
    session: aiohttp.ClientSession,
) -> None:
    async def gzipped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await raw.read_request(reader)
        writer.write(reply(200, gzip.compress(b'{"a":1}'), "Content-Encoding: gzip"))
        await raw.read_request(reader)
        writer.write(reply(200, zlib.compress(b'{"b":2}'), "Content-Encoding: deflate"))

    async with Raw(gzipped) as raw:
        assert (await post(session, raw.url)).json() == {"a": 1}
        assert (await post(session, raw.url)).json() == {"b": 2}


@pytest.mark.parametrize("url", ["ftp://graph.example", "http://[::1"])
async def test_an_unusable_url_is_a_failure_as_with_aiohttp(
    session: aiohttp.ClientSession, url: str
) -> None:
    with pytest.raises(http.HttpFailure) as failed:
        await http.post_json(session, url, {}, headers={}, timeout=1)
    assert isinstance(failed.value.__cause__, aiohttp.InvalidURL)
