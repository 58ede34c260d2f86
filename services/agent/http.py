"""The agent's HTTP calls over its shared aiohttp session (a JSON POST, a size-capped GET, a
multipart upload), each with a timeout, answered as plain data (status, body, headers) so
callers decide what is an error and what is retryable."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson


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


def session(*, connections: int = 100) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(total=30, connect=5),
    )


async def post_json(
    http: aiohttp.ClientSession,
    url: str,
    payload: dict[str, Any],
    *,
    headers: Mapping[str, str],
    timeout: float,
) -> Answer:
    try:
        async with http.post(
            url,
            data=orjson.dumps(payload),
            headers={"Content-Type": "application/json", **headers},
            timeout=aiohttp.ClientTimeout(total=timeout, connect=min(timeout, 5.0)),
        ) as resp:
            return Answer(
                resp.status, await resp.read(), {k.lower(): v for k, v in resp.headers.items()}
            )
    except TimeoutError as exc:
        raise HttpFailure(f"no answer within {timeout:g}s", timeout=True) from exc
    except aiohttp.ClientError as exc:
        raise HttpFailure(f"{type(exc).__name__}: {exc}", timeout=False) from exc


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
    try:
        async with http.post(
            url,
            data=form,
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
