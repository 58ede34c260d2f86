"""`wa stats [--hours N] [--json]`: processing figures from get_webhook_performance_stats."""

from __future__ import annotations

import orjson
from wa.v1 import state_pb2, state_pb2_grpc

from cli.errors import calling
from cli.settings import CliSettings
from common import grpcserver

FIELDS = (
    "total",
    "replied",
    "skipped",
    "failed",
    "dead_lettered",
    "in_flight",
    "delivery_failed",
    "avg_ms",
    "p95_ms",
    "p99_ms",
)


async def stats(hours: float, as_json: bool) -> int:
    settings = CliSettings.from_env()
    # (Down or refused: one line and exit 2, as every command says it, cli/main.py.)
    async with grpcserver.channel(settings.state_addr) as ch:
        with calling("state", settings.state_addr):
            resp = await state_pb2_grpc.StateStub(ch).GetStats(
                state_pb2.GetStatsRequest(hours=hours), timeout=30
            )
    data = {"hours": resp.hours, **{f: getattr(resp, f) for f in FIELDS}}
    if as_json:
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"last {resp.hours:g} hour(s)")
    print(f"  messages       {resp.total}")
    print(f"  replied        {resp.replied}")
    print(f"  skipped        {resp.skipped}")
    print(f"  failed         {resp.failed}")
    print(f"  dead-lettered  {resp.dead_lettered}")
    print(f"  in flight      {resp.in_flight}")
    print(f"  not delivered  {resp.delivery_failed}   (replies Meta reported `failed`)")
    print("  latency, acknowledged -> replied:")
    print(f"    avg {resp.avg_ms:.1f} ms   p95 {resp.p95_ms:.1f} ms   p99 {resp.p99_ms:.1f} ms")
    return 0
