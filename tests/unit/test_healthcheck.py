"""The container healthcheck's HTTP form, as compose runs it every few seconds in every
container: its answer, and what it costs to start (the modules it imports)."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from devtools.loopback import LoopbackServer

ROOT = Path(__file__).resolve().parents[2]
# Each takes a large part of a second of CPU to import: a check every 5 s that imports them
# costs a container a quarter of a core.
HEAVY = ("grpc", "opentelemetry", "pydantic", "asyncpg", "cryptography")


class _Probes(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/readyz" else 503)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def probes() -> Iterator[str]:
    server = LoopbackServer(("127.0.0.1", 0), _Probes)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def _check(url: str) -> tuple[int, list[str]]:
    """The exit code of `python -m common.healthcheck http URL`, and the modules it imported."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "common.healthcheck", "http", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    imported = [
        line.rsplit("|", 1)[-1].strip()
        for line in done.stderr.splitlines()
        if line.startswith("import time:")
    ]
    return done.returncode, imported


def test_the_http_check_says_ready_or_not_without_importing_the_services_libraries(
    probes: str,
) -> None:
    code, imported = _check(f"{probes}/readyz")
    assert code == 0
    assert "urllib.request" in imported
    assert [m for m in imported if m.split(".")[0] in HEAVY] == []
    assert _check(f"{probes}/elsewhere")[0] == 1
    assert _check("http://127.0.0.1:1/readyz")[0] == 1
