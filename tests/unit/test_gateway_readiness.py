"""What the gateway's `/readyz` and `/readyz?for=ingest` answer from a check's result
(services/gateway/readiness.py): the whole system, or what storing a delivery needs."""

from __future__ import annotations

from typing import Any

from common import config
from services.gateway.app import READY_FOR
from services.gateway.readiness import Readiness

INGEST = READY_FOR["ingest"]


def _readiness(components: list[dict[str, Any]]) -> Readiness:
    readiness = Readiness(config.Base(), None, refresh=2.0)  # type: ignore[arg-type]
    readiness.record(components)
    return readiness


def _up(*names: str, down: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    return [{"name": n, "healthy": n not in down, "detail": ""} for n in (*names, *down)]


SYSTEM = ("postgres", "redis", "state", "agent", "dlq")


def test_ready_for_ingest_while_only_what_storing_needs_is_up() -> None:
    everything_but = _readiness(_up("postgres", "state", down=("redis", "agent", "dlq")))
    assert everything_but.answer()[0] is False
    ready, body = everything_but.answer(INGEST)
    assert ready is True
    assert {c["name"] for c in body["components"]} == {"postgres", "state"}
    for needed in ("postgres", "state"):
        others = tuple(n for n in SYSTEM if n != needed)
        ready, body = _readiness(_up(*others, down=(needed,))).answer(INGEST)
        assert ready is False and body["reason"].startswith(f"{needed}:")
    assert _readiness(_up(*SYSTEM)).answer(INGEST)[0] is True


def test_not_ready_for_ingest_when_the_check_could_not_name_what_it_needs() -> None:
    failed = _readiness([{"name": "gateway", "healthy": False, "detail": "check failed: boom"}])
    ready, body = failed.answer(INGEST)
    assert ready is False and "check failed" in body["reason"]
    # A result without one of them (however it came about) is no proof that it is up.
    ready, body = _readiness(_up("state", "agent")).answer(INGEST)
    assert ready is False and "postgres: not checked" in body["reason"]
