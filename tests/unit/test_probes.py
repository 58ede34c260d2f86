"""The metrics port's probes: what Kubernetes and compose ask without a certificate."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from common import probes


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture
def probe() -> Iterator[tuple[probes.Readiness, str]]:
    readiness = probes.Readiness()
    server = probes.ProbeServer("127.0.0.1", 0, readiness)
    yield readiness, f"http://127.0.0.1:{server.port}"
    server.close()


def test_ready_only_while_serving_and_alive_throughout(probe: tuple[probes.Readiness, str]) -> None:
    readiness, url = probe
    assert get(f"{url}/readyz") == (503, "not serving\n")  # starting
    assert get(f"{url}/healthz") == (200, "ok\n")
    readiness.serving = True
    assert get(f"{url}/readyz") == (200, "serving\n")
    readiness.serving = False  # what a graceful shutdown does first
    assert get(f"{url}/readyz") == (503, "not serving\n")
    assert get(f"{url}/healthz") == (200, "ok\n")
    status, text = get(f"{url}/metrics")
    assert status == 200 and "process_start_time_seconds" in text
