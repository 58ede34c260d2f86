"""What one gRPC hop costs in CPU, at an offered rate and back to back: a unary call (as the
gateway's `IngestBatch` was) and one request and answer on a bidirectional stream (as the
gateway's `State.Ingests` and the state service's `Agent.Turns`), between two processes on this
machine, through grpc aio with the channel and server options every service uses
(common/grpcserver.py; plaintext and without interceptors, so without the services' TLS and
tracing hooks: a lower bound of their hop).

    .venv/bin/python -m bench.grpc_hop [--calls 1000] [--rate 100] [--rate 0 ...]

Each line gives the client's and the server's CPU per exchange (each process's own getrusage,
read around the paced exchanges only). Rate 0 is back to back. This is why a message costs
more CPU at 100 messages/s than in a burst: a burst shares each call among many messages and
finds every process's caches warm.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import uvloop

from common import grpcserver
from devtools.ports import free_port

PAYLOAD = b"x" * 300  # about one text message's IngestRequest
WARM_UP = 50


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def serve(port: int) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    async def own_cpu(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return str(_own_cpu()).encode()

    async def echoes(
        requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for request in requests:
            yield request

    server = grpc.aio.server(options=grpcserver.SERVER_OPTIONS)
    handlers = {
        "Cpu": grpc.unary_unary_rpc_method_handler(own_cpu),
        "Unary": grpc.unary_unary_rpc_method_handler(echo),
        "Stream": grpc.stream_stream_rpc_method_handler(echoes),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("hop.Hop", handlers),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


async def _paced(
    rate: float, calls: int, one: Callable[[], Awaitable[None]]
) -> tuple[float, float]:
    """Runs `one()` `calls` times, the n-th no earlier than n / rate s after the start (at
    once with rate 0); returns this process's CPU seconds and the wall seconds it took."""
    cpu_before, started = _own_cpu(), time.monotonic()
    for n in range(calls):
        if rate and (wait := started + n / rate - time.monotonic()) > 0:
            await asyncio.sleep(wait)
        await one()
    return _own_cpu() - cpu_before, time.monotonic() - started


async def client(port: int, kind: str, rate: float, calls: int) -> None:
    options = grpcserver.CHANNEL_OPTIONS
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        server_cpu = channel.unary_unary("/hop.Hop/Cpu")
        if kind == "unary":
            unary = channel.unary_unary("/hop.Hop/Unary")

            async def one() -> None:
                await unary(PAYLOAD, timeout=5)

        else:
            stream = channel.stream_stream("/hop.Hop/Stream")()

            async def one() -> None:
                await stream.write(PAYLOAD)
                await stream.read()

        for _ in range(WARM_UP):
            await one()
        server_before = float(await server_cpu(b"", timeout=5))
        used, took = await _paced(rate, calls, one)
        server_used = float(await server_cpu(b"", timeout=5)) - server_before
    print(f"{used / calls * 1e6:.0f} {server_used / calls * 1e6:.0f} {calls / took:.0f}")


def _measure(port: int, kind: str, rate: float, calls: int) -> str:
    argv = ["--client", str(port), kind, str(rate), str(calls)]
    out = subprocess.run(
        [sys.executable, "-m", "bench.grpc_hop", *argv],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    client_us, server_us, per_second = (float(x) for x in out)
    pace = f"{rate:g}/s" if rate else "back to back"
    return (
        f"{kind:<6} {pace:>13}: client {client_us:5.0f} µs, server {server_us:5.0f} µs"
        f" an exchange ({per_second:.0f}/s)"
    )


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        uvloop.run(serve(int(sys.argv[2])))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        uvloop.run(client(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), int(sys.argv[5])))
        return
    parser = argparse.ArgumentParser(prog="python -m bench.grpc_hop", description=__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument(
        "--rate", type=float, action="append", help="exchanges a second; 0: back to back"
    )
    args = parser.parse_args()
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc_hop", "--serve", str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == "ready"
        for rate in args.rate or [100.0, 0.0]:
            for kind in ("unary", "stream"):
                print(_measure(port, kind, rate, args.calls), flush=True)
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
