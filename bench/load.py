"""A closed-loop HTTP/1.1 load generator on raw asyncio streams (a general-purpose client such
as httpx costs more CPU than the servers it measures): N keep-alive connections, each posting
signed deliveries back to back for a fixed time, every one with a new message id. Run in its
own process so it does not share the measured event loop."""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import time
import uuid
from collections.abc import Callable
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


def endpoint(url: str) -> tuple[str, int, str]:
    """Host, port and path of an http URL."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80, parts.path


async def post_all(
    url: str, requests: list[bytes], connections: int, rate: float | None = None
) -> int:
    """Sends prepared requests over `connections` keep-alive connections; returns non-200s.

    With `rate`, request n is sent no earlier than n / rate seconds after the start: an
    offered load, as customers offer it, instead of as fast as the acknowledgements come."""
    host, port, _ = endpoint(url)
    queue = list(reversed(requests))
    errors = 0
    started = time.monotonic()
    taken = 0

    async def worker() -> None:
        nonlocal errors, taken
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while queue:
                request, n = queue.pop(), taken
                taken += 1
                if rate is not None and (wait := started + n / rate - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                writer.write(request)
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
    host, port, path = endpoint(url)
    address = f"{host}:{port}"
    latencies: list[float] = []
    deadline = time.monotonic() + seconds

    async def worker(n: int) -> int:
        conn = await asyncio.open_connection(host, port)
        try:
            return await post_until(
                deadline,
                conn,
                functools.partial(
                    request_bytes, address, path, secret, n, conversations=conversations
                ),
                latencies,
            )
        finally:
            conn[1].close()

    started = time.monotonic()
    errors = sum(await asyncio.gather(*(worker(n) for n in range(connections))))
    return Result(len(latencies), errors, time.monotonic() - started, latencies)


async def post_until(
    deadline: float,
    conn: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    make_request: Callable[[int], bytes],
    latencies: list[float],
) -> int:
    """Posts back to back on one keep-alive connection until `deadline`, adding each
    request's latency (ms) to `latencies`; returns how many were answered with a non-200."""
    reader, writer = conn
    errors = 0
    i = 0
    while time.monotonic() < deadline:
        i += 1
        data = make_request(i)
        started = time.perf_counter()
        writer.write(data)
        status = await read_response(reader)
        latencies.append((time.perf_counter() - started) * 1000)
        if status != 200:
            errors += 1
    return errors


async def run_paired(
    urls: tuple[str, str], secret: str, *, connections: int, block: float, pairs: int
) -> list[tuple[float, float]]:
    """Loads two systems in turn, `block` seconds each, `pairs` times (ABBA order, so neither
    always goes first), with `connections` keep-alive connections open to each all along.
    Returns each pair's two p50s (ms). Two blocks a fraction of a second apart see the same
    machine, so its drift, large here, cancels out of their ratio."""
    sides = []
    for url in urls:
        host, port, path = endpoint(url)
        conns = [await asyncio.open_connection(host, port) for _ in range(connections)]
        sides.append((f"{host}:{port}", path, conns))

    async def one_block(side: int) -> float:
        host, path, conns = sides[side]
        latencies: list[float] = []
        deadline = time.monotonic() + block
        errors = await asyncio.gather(
            *(
                post_until(
                    deadline,
                    conn,
                    functools.partial(request_bytes, host, path, secret, n, conversations=200),
                    latencies,
                )
                for n, conn in enumerate(conns)
            )
        )
        if any(errors):
            raise RuntimeError(f"{urls[side]} answered {sum(errors)} errors")
        return statistics.median(latencies)

    results = []
    try:
        for i in range(pairs + 1):
            order = (0, 1) if i % 2 == 0 else (1, 0)
            p50 = {side: await one_block(side) for side in order}
            if i:  # the first pair warms the connections up
                results.append((p50[0], p50[1]))
    finally:
        for _, _, conns in sides:
            for _, writer in conns:
                writer.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load")
    parser.add_argument("url")
    parser.add_argument("secret")
    parser.add_argument("connections", type=int)
    parser.add_argument("seconds", type=float)
    parser.add_argument(
        "--against",
        metavar="URL2",
        help="alternate with this system in blocks; prints each pair's p50s",
    )
    parser.add_argument("--block", type=float, default=0.5, help="seconds per block")
    args = parser.parse_args()
    if args.against:
        pairs = asyncio.run(
            run_paired(
                (args.url, args.against),
                args.secret,
                connections=args.connections,
                block=args.block,
                pairs=max(1, int(args.seconds / (2 * args.block))),
            )
        )
        print(orjson.dumps({"pairs": pairs}).decode())
        return
    result = asyncio.run(
        run(args.url, args.secret, connections=args.connections, seconds=args.seconds)
    )
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
