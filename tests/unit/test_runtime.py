"""The runtime settings a service applies before taking traffic (in a child process: they
are process-wide, and this test process keeps CPython's defaults)."""

from __future__ import annotations

import subprocess
import sys

import orjson

PROBE = """
import gc, orjson
from common import runtime
before = {"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}
import services.gateway.app  # what a service loads at start
runtime.settle()
print(orjson.dumps({"before": before, "after": {
    "threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()}}).decode())
"""


def test_settle_freezes_the_start_up_heap_and_makes_collections_rarer() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], check=True, capture_output=True, text=True
    ).stdout
    result = orjson.loads(out)
    assert result["before"] == {"threshold": [700, 10, 10], "frozen": 0}
    assert result["after"]["threshold"] == [20_000, 50, 100]
    # Everything imported at start (grpc, protobuf, OpenTelemetry, Starlette) is out of
    # every collection's sight from now on.
    assert result["after"]["frozen"] > 10_000
