"""The agent's HTTP calls over its shared aiohttp session (a JSON POST, a size-capped GET, a
multipart upload), each with a timeout, answered as plain data (status, body, headers) so
callers decide what is an error and what is retryable."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import aiohttp
import httptools
import orjson
from aiohttp import hdrs
from aiohttp.http import SERVER_SOFTWARE
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from common import telemetry
from common.deadlines import Deadlines


class HttpFailure(Exception):
    """No answer: the call timed out or the connection failed."""

    def __init__(self, message: str, *, timeout: bool) -> None:
        super().__init__(message)
        self.timeout = timeout


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")


def session(*, connections: int = 100, lean: bool | None = None) -> aiohttp.ClientSession:
    """The process's session. `lean` (default: when no traces are exported, whose aiohttp
    spans the lean pool would not make) gives its JSON POSTs the `LeanPool`."""
    if lean is None:
        lean = not telemetry.export_enabled()
    return aiohttp.ClientSession(
        connector=_Connector(
            LeanPool(connections) if lean else None, limit=connections, ttl_dns_cache=300
        ),
        timeout=aiohttp.ClientTimeout(total=30, connect=5),
    )


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, closing the session's `LeanPool` with its own connections."""

    def __init__(self, lean: LeanPool | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lean = lean

    async def close(self, *, abort_ssl: bool = False) -> None:
        if self.lean is not None:
            self.lean.close()
        await super().close(abort_ssl=abort_ssl)


async def post_json(
    http: aiohttp.ClientSession,
    url: str,
    payload: dict[str, Any],
    *,
    headers: Mapping[str, str],
    timeout: float,
) -> Answer:
    lean: LeanPool | None = getattr(http.connector, "lean", None)
    if lean is not None:
        answer = await lean.post(url, orjson.dumps(payload), headers, timeout)
        if answer.status not in _REDIRECTS or "location" not in answer.headers:
            return answer
        return await _redirected(http, url, answer, payload, headers, timeout)
    return await _request(
        http,
        "POST",
        url,
        data=orjson.dumps(payload),
        headers={"Content-Type": "application/json", **headers},
        timeout=timeout,
    )


async def _request(
    http: aiohttp.ClientSession,
    method: str,
    url: str | URL,
    *,
    data: Any,
    headers: Mapping[str, str],
    timeout: float,
) -> Answer:
    """One aiohttp request read whole, its failures as HttpFailure."""
    try:
        async with http.request(
            method,
            url,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0)),
        ) as resp:
            return Answer(
                resp.status, await resp.read(), {k.lower(): v for k, v in resp.headers.items()}
            )
    except TimeoutError as exc:
        raise HttpFailure(f"no answer within {timeout:g}s", timeout=True) from exc
    except aiohttp.ClientError as exc:
        raise HttpFailure(f"{type(exc).__name__}: {exc}", timeout=False) from exc


async def _redirected(
    http: aiohttp.ClientSession,
    url: str,
    answer: Answer,
    payload: dict[str, Any],
    headers: Mapping[str, str],
    timeout: float,
) -> Answer:
    """What aiohttp does with a redirected POST (and any further redirect): 303, 301 and 302
    are followed with a GET without the body, 307 and 308 with the POST; the Authorization
    header does not go to another origin."""
    origin = URL(url)
    target = origin.join(URL(answer.headers["location"]))
    forwarded = {"Content-Type": "application/json", **headers}
    if target.origin() != origin.origin():
        forwarded = {k: v for k, v in forwarded.items() if k.lower() != "authorization"}
    get = answer.status in (301, 302, 303)
    return await _request(
        http,
        "GET" if get else "POST",
        target,
        data=None if get else orjson.dumps(payload),
        headers=forwarded,
        timeout=timeout,
    )


class TooLarge(Exception):
    """A body over the caller's cap: refused before it was read whole."""

    def __init__(self, limit: int, size: int | None = None) -> None:
        said = f"{size} bytes" if size is not None else f"over {limit} bytes"
        super().__init__(f"the body is {said}, the limit is {limit} (MEDIA_MAX_BYTES)")
        self.limit = limit
        self.size = size


# What an error answer's body is read up to: enough for its message, never a download.
ERROR_BODY_BYTES = 64 * 1024


async def get(
    http: aiohttp.ClientSession,
    url: str,
    *,
    headers: Mapping[str, str],
    timeout: float,
    max_bytes: int,
) -> Answer:
    """A GET whose successful body may not exceed `max_bytes`: a larger declared
    Content-Length is refused before reading, and the streamed body is cut off (the connection
    closed) as soon as it goes over, so a lying or absent length costs at most the cap. Raises
    TooLarge then."""
    try:
        async with http.get(
            url,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0)),
        ) as resp:
            ok = resp.status < 400
            cap = max_bytes if ok else min(max_bytes, ERROR_BODY_BYTES)
            declared = resp.content_length
            if ok and declared is not None and declared > cap:
                resp.close()
                raise TooLarge(cap, declared)
            body = bytearray()
            async for chunk in resp.content.iter_chunked(64 * 1024):
                body += chunk
                if len(body) > cap:
                    # Closing (not releasing) drops the connection: nothing more is read.
                    resp.close()
                    if ok:
                        raise TooLarge(cap)
                    del body[cap:]
                    break
            return Answer(resp.status, bytes(body), {k.lower(): v for k, v in resp.headers.items()})
    except TimeoutError as exc:
        raise HttpFailure(f"no answer within {timeout:g}s", timeout=True) from exc
    except aiohttp.ClientError as exc:
        raise HttpFailure(f"{type(exc).__name__}: {exc}", timeout=False) from exc


async def post_file(
    http: aiohttp.ClientSession,
    url: str,
    fields: Mapping[str, str],
    file: tuple[str, bytes, str],
    *,
    headers: Mapping[str, str],
    timeout: float,
) -> Answer:
    """A multipart/form-data POST of `fields` and one `file` (filename, bytes, content type),
    the way OpenAI-compatible upload endpoints take it."""
    form = aiohttp.FormData()
    for name, value in fields.items():
        form.add_field(name, value)
    filename, data, content_type = file
    form.add_field("file", data, filename=filename, content_type=content_type)
    return await _request(http, "POST", url, data=form, headers=headers, timeout=timeout)


# --- The lean pool ---------------------------------------------------------------------------
# A turn makes two Graph API calls (mark as read, send), each a small JSON POST on a kept-alive
# connection. aiohttp spends about 140 us of CPU on each here (request and response objects,
# header multidicts, a writer task, timer handles), the lean pool about 40, system calls
# included: two per message, a sixth of the agent's CPU per message. The lean pool sends such a
# POST with aiohttp's request headers (bar Accept-Encoding: bodies come uncompressed), parses
# the answer with httptools (llhttp, as aiohttp's own C parser), and fails as aiohttp would: the
# same exception classes for the same events, so callers tell "not sent" from "maybe sent" alike.

# aiohttp's keepalive_timeout: an idle connection older than this is closed, not reused.
KEEPALIVE_SECONDS = 15.0
CONNECT_SECONDS = 5.0
# How often the answers awaited on kept-alive connections are looked at for one past its
# timeout (common/deadlines.py).
WATCH_SECONDS = 0.05
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


@functools.lru_cache(maxsize=256)
def _target(url: str) -> tuple[tuple[str, int, bool], str, bytes]:
    """(connection key: host, port, TLS), its Host header, the request line's start)."""
    try:
        u = URL(url)
    except ValueError as exc:
        raise aiohttp.InvalidURL(url) from exc
    if u.scheme not in ("http", "https") or not u.raw_host:
        raise aiohttp.InvalidURL(url)
    https = u.scheme == "https"
    port = u.port or (443 if https else 80)
    line = f"POST {u.raw_path_qs} HTTP/1.1\r\nHost: {u.host_port_subcomponent}\r\n".encode()
    return (u.raw_host, port, https), u.host_port_subcomponent or u.raw_host, line


@functools.cache
def _tls() -> ssl.SSLContext:
    """aiohttp's default (verified) client context."""
    context = ssl.create_default_context()
    context.set_alpn_protocols(("http/1.1",))
    return context


class _Exchange(asyncio.Protocol):
    """One kept-alive HTTP/1.1 connection, one request at a time."""

    def __init__(self, key: tuple[str, int, bool]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Answer] | None = None
        self.lost = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.headers: dict[str, str] = {}
        self.body: list[bytes] = []
        self.status = 0
        self.headers_done = False
        self.keep_alive = False
        self.length_known = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are no subclass

    def data_received(self, data: bytes) -> None:
        if self.waiter is None or self.waiter.done():
            # Nothing was asked: a server that talks out of turn gets no more requests.
            self.close()
            return
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._fail(_Malformed(repr(exc)))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        waiter = self.waiter
        if waiter is None or waiter.done():
            return
        if self.headers_done and not self.length_known and exc is None:
            # A body without a length or chunks ends with its connection.
            self.on_message_complete()
        elif self.headers_done:
            said = f"Response payload is not completed: {exc!r}" if exc else ""
            self._fail(aiohttp.ClientPayloadError(said or "Response payload is not completed"))
        elif isinstance(exc, OSError):
            self._fail(aiohttp.ClientOSError(*exc.args))
        elif exc is None:
            self._fail(aiohttp.ServerDisconnectedError())
        else:
            self._fail(exc)

    # httptools callbacks
    def on_message_begin(self) -> None:
        if self.waiter is None or self.waiter.done():
            # A second answer to one request: this connection is not to be trusted again.
            self.close()

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("utf-8", "surrogateescape")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_done = True
        self.length_known = (
            "content-length" in self.headers
            or "chunked" in self.headers.get("transfer-encoding", "").lower()
            or self.status in (204, 304)
        )

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200:
            self._reset()  # an interim answer: the final one follows
            return
        self.keep_alive = self.parser.should_keep_alive()
        answer = Answer(self.status, b"".join(self.body), self.headers)
        self.headers, self.body = {}, []  # the answer's own, whatever follows
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(answer)

    def _fail(self, exc: BaseException) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()

    def send(self, data: bytes) -> asyncio.Future[Answer]:
        assert self.transport is not None
        self._reset()
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return self.waiter


def _decompressed(answer: Answer, coding: str) -> Answer:
    """A body compressed although no Accept-Encoding asked for it, as aiohttp reads it."""
    try:
        if coding == "deflate":
            try:
                body = zlib.decompress(answer.body)
            except zlib.error:
                body = zlib.decompress(answer.body, -zlib.MAX_WBITS)  # raw deflate
        else:
            body = zlib.decompress(answer.body, 16 + zlib.MAX_WBITS)
    except zlib.error:
        said = f"ClientPayloadError: Can not decode content-encoding: {coding}"
        raise HttpFailure(said, timeout=False) from aiohttp.ClientPayloadError(said)
    return Answer(answer.status, body, answer.headers)


class _Malformed(Exception):
    """An answer that is no HTTP/1.1 response: aiohttp's ClientResponseError (status 400)."""


class LeanPool:
    """Kept-alive connections per host, at most `connections` requests at a time."""

    def __init__(self, connections: int) -> None:
        self._idle: dict[tuple[str, int, bool], list[_Exchange]] = {}
        self._slots = asyncio.Semaphore(connections)
        self._open: set[_Exchange] = set()
        # The answers awaited on kept-alive connections, each until its request's timeout.
        self._deadlines = Deadlines(WATCH_SECONDS)

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout: float
    ) -> Answer:
        """A JSON POST: as `post_json` over aiohttp, redirects followed by aiohttp."""
        try:
            key, host, line = _target(url)
            head = [line]
            for name, value in headers.items():
                if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
                    raise ValueError("Newline or carriage return character detected in headers")
                head.append(f"{name}: {value}\r\n".encode())
            head.append(_FIXED_HEADERS % len(body))
            head.append(body)
            answer = await self._exchange(key, b"".join(head), timeout)
        except TimeoutError as exc:
            raise HttpFailure(f"no answer within {timeout:g}s", timeout=True) from exc
        except aiohttp.ClientError as exc:
            raise HttpFailure(f"{type(exc).__name__}: {exc}", timeout=False) from exc
        except _Malformed as exc:
            info = aiohttp.RequestInfo(URL(url), "POST", CIMultiDictProxy(CIMultiDict()), URL(url))
            error = aiohttp.ClientResponseError(info, (), status=400, message=str(exc))
            raise HttpFailure(f"ClientResponseError: {error}", timeout=False) from error
        except OSError as exc:
            # No connection: aiohttp's ClientConnectorError, nothing was sent.
            raise HttpFailure(
                f"ClientConnectorError: Cannot connect to host {host}: {exc}", timeout=False
            ) from aiohttp.ClientConnectionError(str(exc))
        coding = answer.headers.get("content-encoding", "").lower()
        if coding in ("gzip", "x-gzip", "deflate") and answer.body:
            return _decompressed(answer, coding)
        return answer

    async def _exchange(self, key: tuple[str, int, bool], request: bytes, timeout: float) -> Answer:
        """The request's answer within `timeout` (raises TimeoutError past it)."""
        acquired = False
        conn: _Exchange | None = None
        try:
            if not self._slots.locked():
                await self._slots.acquire()  # (free: returns at once)
                acquired = True
                conn = self._reuse(key)
            if conn is not None:
                # A kept-alive connection at once, as nearly every request of a busy agent
                # finds one: its answer is awaited until `timeout` by the pool's watch, not by
                # an asyncio.timeout of its own (a fifth of a request's CPU in the agent).
                answer = await self._deadlines.wait(conn.send(request), timeout, _timed_out)
            else:
                async with asyncio.timeout(timeout):
                    # As aiohttp's connect timeout: waiting for a free slot and connecting,
                    # together.
                    async with asyncio.timeout(min(timeout, CONNECT_SECONDS)):
                        if not acquired:
                            await self._slots.acquire()
                            acquired = True
                            conn = self._reuse(key)
                        if conn is None:
                            conn = await self._connect(key)
                    answer = await conn.send(request)
            if conn.keep_alive and not conn.lost:
                conn.waiter = None
                conn.idle_since = time.monotonic()
                self._idle.setdefault(key, []).append(conn)
                conn = None
            return answer
        finally:
            if conn is not None:
                # Failed, cancelled or not to be kept: its answer may still be on the way.
                conn.close()
                self._open.discard(conn)
            if acquired:
                self._slots.release()

    def _reuse(self, key: tuple[str, int, bool]) -> _Exchange | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        if idle and now - idle[0].idle_since >= KEEPALIVE_SECONDS:
            # The least recently used one, expired: closed as aiohttp's cleanup would.
            self._open.discard(stale := idle.pop(0))
            stale.close()
        while idle:
            conn = idle.pop()
            alive = not conn.lost and not (conn.transport and conn.transport.is_closing())
            if alive and now - conn.idle_since < KEEPALIVE_SECONDS:
                return conn
            conn.close()
            self._open.discard(conn)
        return None

    async def _connect(self, key: tuple[str, int, bool]) -> _Exchange:
        host, port, https = key
        loop = asyncio.get_running_loop()
        transport, conn = await loop.create_connection(
            lambda: _Exchange(key),
            host,
            port,
            ssl=_tls() if https else None,
            server_hostname=host if https else None,
        )
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._open.add(conn)
        return conn

    def close(self) -> None:
        for conn in self._open:
            conn.close()
        self._open.clear()
        self._idle.clear()
        self._deadlines.close()


def _timed_out(seconds: float) -> TimeoutError:
    return TimeoutError()  # post() says "no answer within" the timeout


_FIXED_HEADERS = (
    f"{hdrs.CONTENT_TYPE}: application/json\r\n{hdrs.ACCEPT}: */*\r\n"
    f"{hdrs.USER_AGENT}: {SERVER_SOFTWARE}\r\n{hdrs.CONTENT_LENGTH}: %d\r\n\r\n"
).encode()
