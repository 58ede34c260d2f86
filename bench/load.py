"""A closed-loop HTTP/1.1 load generator on raw asyncio streams (a general-purpose client such
as httpx costs more CPU than the servers it measures): N keep-alive connections, each posting
signed deliveries back to back for a fixed time, every one with a new message id. Run in its
own process so it does not share the measured event loop."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

from cli.simulate import text_delivery
from services.gateway import signature


@dataclass(frozen=True)
class Result:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, p: float) -> float:
        if len(self.latencies_ms) < 2:
            return float("nan")
        return statistics.quantiles(self.latencies_ms, n=100)[int(p) - 1]


def request_bytes(host: str, path: str, secret: str, n: int, i: int, conversations: int) -> bytes:
    wa_id = f"1555{(n * 7919 + i) % conversations:07d}"
    body = orjson.dumps(
        text_delivery(f"bench {n}-{i}", wa_id=wa_id, message_id=f"wamid.B{uuid.uuid4().hex}")
    )
    return signed_request(host, path, secret, body)


def signed_request(host: str, path: str, secret: str, body: bytes) -> bytes:
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"X-Hub-Signature-256: {signature.sign(body, secret)}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def post_all(url: str, requests: list[bytes], connections: int) -> int:
    """Sends prepared requests over `connections` keep-alive connections; returns non-200s."""
    parts = urlsplit(url)
    queue = list(reversed(requests))
    errors = 0

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        try:
            while queue:
                writer.write(queue.pop())
                if await read_response(reader) != 200:
                    errors += 1
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(connections)))
    return errors


async def read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def run(
    url: str, secret: str, *, connections: int, seconds: float, conversations: int = 200
) -> Result:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def worker(n: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        i = 0
        try:
            while time.monotonic() < deadline:
                i += 1
                data = request_bytes(f"{host}:{port}", parts.path, secret, n, i, conversations)
                started = time.perf_counter()
                writer.write(data)
                status = await read_response(reader)
                latencies.append((time.perf_counter() - started) * 1000)
                if status != 200:
                    errors += 1
        finally:
            writer.close()

    started = time.monotonic()
    await asyncio.gather(*(worker(n) for n in range(connections)))
    return Result(len(latencies), errors, time.monotonic() - started, latencies)


def main() -> None:
    url, secret, connections, seconds = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        float(sys.argv[4]),
    )
    result = asyncio.run(run(url, secret, connections=connections, seconds=seconds))
    print(
        orjson.dumps(
            {
                "requests": result.requests,
                "errors": result.errors,
                "seconds": result.seconds,
                "rps": result.rps,
                "p50": result.pct(50),
                "p99": result.pct(99),
            }
        ).decode()
    )


if __name__ == "__main__":
    main()
