"""The runtime settings a service applies before taking traffic (in a child process: they
are process-wide, and this test process keeps the interpreter's own). Judged against what the
interpreter had before, never against one CPython version's defaults."""

from __future__ import annotations

import subprocess
import sys

import orjson

from common import runtime

PROBE = """
import gc, orjson
from common import runtime
import services.gateway.app  # what a service loads at start
before = {"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count(),
          "tracked": len(gc.get_objects())}
runtime.settle()
print(orjson.dumps({"before": before, "after": {
    "threshold": gc.get_threshold(), "frozen": gc.get_freeze_count(),
    "tracked": len(gc.get_objects())}}).decode())
"""


def test_settle_freezes_the_start_up_heap_and_makes_collections_rarer() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], check=True, capture_output=True, text=True
    ).stdout
    before, after = orjson.loads(out)["before"], orjson.loads(out)["after"]
    assert after["threshold"] == list(runtime.GC_THRESHOLDS)
    # Young collections rarer than the interpreter's own setting, whatever its version's is.
    assert after["threshold"][0] > before["threshold"][0]
    # Everything imported at start (grpc, protobuf, OpenTelemetry, Starlette) is out of every
    # collection's sight from now on: nearly all of it frozen (the collection before the freeze
    # frees some), next to nothing left for the collector to walk.
    assert after["frozen"] - before["frozen"] >= 0.9 * before["tracked"]
    assert after["tracked"] < 0.01 * before["tracked"]
