"""Secrets from outside: two app secrets during a rotation, the signature's opt-out refused
where it must be, a caller's trace context and correlation id taken only from Meta, and no
secret or customer's words in any log line of a running system."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
import pytest

from tests.conftest import StartSystem
from tests.support import payloads
from tests.support.fakes import FakeGraph, FakeModel
from tests.support.otlp import OtlpReceiver
from tests.support.system import SERVICES

ROOT = Path(__file__).resolve().parent.parent.parent
NEW, OLD = "rotation-new-secret-5be1", "rotation-old-secret-77d0"


def text(body: str, wa_id: str = "15550001111") -> dict[str, Any]:
    return payloads.delivery(messages=[payloads.message("text", wa_id=wa_id, text={"body": body})])


async def test_both_secrets_of_a_rotation_are_accepted_an_unknown_one_is_not(
    start_system: StartSystem,
) -> None:
    system = await start_system(WHATSAPP_APP_SECRET=f"{NEW}, {OLD}")
    assert (await system.post(text("signed with the new"), secret=NEW)).status_code == 200
    assert (await system.post(text("signed with the old"), secret=OLD)).status_code == 200
    assert (await system.post(text("signed with neither"), secret="other")).status_code == 401
    both = f"{NEW},{OLD}"
    assert (await system.post(text("the value itself"), secret=both)).status_code == 401
    warning = [line for line in system.log_lines("gateway") if "2 secrets" in line["msg"]]
    assert warning and warning[0]["level"] == "WARNING"


def run_gateway(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """The gateway process in `cwd`, with only `env` of the WhatsApp settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("WHATSAPP_", "GATEWAY_"))}
    return subprocess.run(
        [sys.executable, "-m", "services.gateway"],
        env={**base, "PYTHONPATH": str(ROOT), "GATEWAY_PORT": "1", **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_skipping_the_signature_while_a_secret_is_set_stops_the_gateway_in_one_line(
    tmp_path: Path,
) -> None:
    done = run_gateway(tmp_path, WHATSAPP_SKIP_SIGNATURE="true", WHATSAPP_APP_SECRET="s3cr3t-x")
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    entry = orjson.loads(line)
    assert entry["level"] == "CRITICAL" and "WHATSAPP_SKIP_SIGNATURE" in entry["msg"]
    assert "s3cr3t-x" not in done.stderr


def test_skipping_the_signature_is_never_read_from_dotenv(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("WHATSAPP_SKIP_SIGNATURE=true\n")
    # (Internal gRPC in plaintext, so that no certificate is needed to get that far.)
    done = run_gateway(tmp_path, GRPC_INSECURE="true")
    assert done.returncode == 2
    lines = [orjson.loads(line) for line in done.stderr.splitlines()]
    (critical,) = [line for line in lines if line["level"] == "CRITICAL"]
    assert "WHATSAPP_APP_SECRET is not set" in critical["msg"]


def test_more_than_two_app_secrets_are_refused(tmp_path: Path) -> None:
    done = run_gateway(tmp_path, WHATSAPP_APP_SECRET="a-secret,b-secret,c-secret")
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert "WHATSAPP_APP_SECRET" in line and "b-secret" not in line


@pytest.fixture
def otlp() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


async def test_a_callers_trace_context_and_correlation_id_count_only_once_signed(
    start_system: StartSystem, otlp: OtlpReceiver, model: FakeModel
) -> None:
    system = await start_system(
        **model.env(),
        OTEL_SDK_DISABLED="false",
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url,
        OTEL_BSP_SCHEDULE_DELAY="100",
    )
    forged_trace, caller_span = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    forged = {
        "traceparent": f"00-{forged_trace}-{caller_span}-01",
        "x-correlation-id": "forged-correlation-id",
    }
    refused = await system.post(text("forged"), secret="not-the-secret", headers=forged)
    assert refused.status_code == 401

    meta_trace = "1bf92f3577b34da6a3ce929d0e0e4731"
    signed = {
        "traceparent": f"00-{meta_trace}-{caller_span}-01",
        "x-correlation-id": "meta-correlation-id",
    }
    accepted = await system.post(text("signed"), headers=signed)
    assert accepted.status_code == 200
    assert accepted.json()["correlation_id"] == "meta-correlation-id"

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        requests = {
            s.attributes.get("http.response.status_code"): s
            for s in otlp.spans
            if s.service == "gateway" and s.kind == 2
        }
        if {200, 401} <= set(requests):
            break
        await asyncio.sleep(0.2)
    assert requests[401].trace_id != forged_trace and requests[401].parent_id == ""
    assert not [s for s in otlp.spans if s.trace_id == forged_trace]
    assert requests[200].trace_id == meta_trace and requests[200].parent_id == caller_span
    assert requests[200].attributes["wa.correlation_id"] == "meta-correlation-id"
    logged = {line.get("correlation_id") for line in system.log_lines("gateway")}
    assert "forged-correlation-id" not in logged


async def test_a_flood_of_forged_deliveries_is_counted_each_and_logged_once_in_a_while(
    start_system: StartSystem,
) -> None:
    """Anyone who can reach the gateway can send unsigned deliveries: each is refused and
    counted, and the log says so once every ten seconds, with how many it left out."""
    system = await start_system()
    started = time.monotonic()
    for _ in range(3):
        await asyncio.gather(
            *(system.post(text("forged"), secret="not-the-secret") for _ in range(40))
        )
    took = time.monotonic() - started

    def refusals() -> list[dict[str, Any]]:
        return [
            line
            for line in system.log_lines("gateway")
            if line.get("msg", "").startswith("refused deliveries with a missing or wrong")
        ]

    # One line per ten seconds at most (one, unless the machine took that long to send them).
    assert 1 <= len(refusals()) <= 1 + int(took // 10)
    await asyncio.sleep(10.5)
    before = len(refusals())
    assert (await system.post(text("forged"), secret="not-the-secret")).status_code == 401
    for _ in range(50):  # its line is written by now; the log file may lag a little
        if len(refusals()) > before:
            break
        await asyncio.sleep(0.1)
    lines = refusals()
    # Every refusal is in the log: logged, or counted in the next line as left out.
    assert len(lines) + sum(line["not_logged_since_last"] for line in lines) == 121
    assert len(lines) == before + 1
    metrics = (await system.http.get(f"{system.url}/metrics")).text
    assert 'wa_gateway_deliveries_total{result="bad_signature"} 121.0' in metrics


def with_password(url: str, password: str) -> str:
    """`url` with a password (trust authentication, as in the tests, ignores it)."""
    parts = urlsplit(url)
    user = parts.username or "postgres"
    host = parts.hostname or ""  # a Unix socket's folder is in the query (embedded server)
    netloc = f"{user}:{password}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def url_passwords(env: dict[str, str]) -> set[str]:
    return {
        password
        for value in env.values()
        if "://" in value and (password := urlsplit(value).password)
    }


# Without an access token replies are recorded and not sent: that path logs too.
@pytest.mark.parametrize("access_token", ["access-token-e80d2a", ""])
async def test_no_secret_and_no_customers_words_in_any_log_line(
    start_system: StartSystem,
    graph: FakeGraph,
    model: FakeModel,
    database_url: str,
    access_token: str,
) -> None:
    system = await start_system(
        **model.env(OPENAI_API_KEY="sk-model-key-93be1c"),
        WHATSAPP_APP_SECRET=f"{NEW},{OLD}",
        WHATSAPP_VERIFY_TOKEN="verify-token-4c1f9e",
        WHATSAPP_ACCESS_TOKEN=access_token,
        DATABASE_URL=with_password(database_url, "pg-password-2b7f"),
    )
    graph.webhook = (f"{system.url}/webhook", NEW)  # Meta's status webhooks for the replies, signed
    texts = [f"my account number is 4417-{n}-quokka" for n in range(3)]
    ids = []
    for n, said in enumerate(texts):
        doc = text(said, wa_id=f"1555123000{n}")
        ids.append(doc["entry"][0]["changes"][0]["value"]["messages"][0]["id"])
        assert (await system.post(doc, secret=(NEW, OLD)[n % 2])).status_code == 200
    # Deliveries that go wrong: a forged one, a body that is not JSON, the handshake.
    assert (await system.post(text("forged-zebra-words"), secret="nope")).status_code == 401
    assert (await system.post(b"{ not json: secret-ish-words", secret=NEW)).status_code == 400
    handshake = {"hub.mode": "subscribe", "hub.challenge": "c", "hub.verify_token": "x"}
    for token in ("verify-token-4c1f9e", "wrong-token-guess"):
        await system.http.get(
            f"{system.url}/webhook", params={**handshake, "hub.verify_token": token}
        )
    await system.wait_status(ids, {"replied"}, timeout=60)
    await asyncio.sleep(1.5)  # the status webhooks and the last log lines
    pool = await system.db()
    replies = [
        r["reply_text"]
        for r in await pool.fetch(
            "SELECT reply_text FROM processed_webhook_messages WHERE message_id = ANY($1)", ids
        )
    ]
    assert len(replies) == len(texts) and all(replies)

    secrets = {
        NEW,
        OLD,
        "verify-token-4c1f9e",
        *([access_token] if access_token else []),
        "sk-model-key-93be1c",
        *url_passwords(system.env),
    }
    assert "pg-password-2b7f" in secrets
    words = {*texts, "quokka", "forged-zebra-words", "secret-ish-words", *replies}
    words.add("PRIVATE KEY")  # a TLS key (PEM) of the internal gRPC connections
    lines = [*system.events]
    for name in SERVICES:
        lines += system.log_path(name).read_text(errors="replace").splitlines()
    assert len(lines) > 20
    leaks = [(w, line) for line in lines for w in secrets | words if w in line]
    assert leaks == []
