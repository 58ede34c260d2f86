"""`wa stats`, `wa health` and `wa trace` through the installed executable."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from common import tls
from devtools.ports import free_port
from tests.conftest import StartSystem
from tests.e2e.test_dlq import WA, wa, wa_json
from tests.support import payloads
from tests.support.fakes import FakeGraph, FakeModel, model_error

pytestmark = pytest.mark.e2e


async def test_stats_after_a_known_workload(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph
) -> None:
    model.script.extend([model_error(401), model_error(401)])
    system = await start_system(**model.env())
    # Two conversations fail first (the model refuses its first two calls), then 50 replies.
    texts = [payloads.message("text", wa_id=f"1555{i:04d}") for i in range(52)]
    reactions = [payloads.message("reaction", wa_id=f"1556{i:04d}") for i in range(3)]
    first, rest = texts[:2], texts[2:]
    assert (await system.post(payloads.delivery(messages=first))).status_code == 200
    await system.wait_status([m["id"] for m in first], {"dead_lettered"})
    assert (await system.post(payloads.delivery(messages=rest + reactions))).status_code == 200
    await system.wait_status([m["id"] for m in rest], {"replied"}, timeout=60)

    data = await asyncio.to_thread(wa_json, system, "stats", "--hours", "1")
    assert (
        data["total"],
        data["replied"],
        data["skipped"],
        data["dead_lettered"],
        data["in_flight"],
    ) == (55, 50, 3, 2, 0)
    assert 0 < data["avg_ms"] < 30_000
    assert data["avg_ms"] <= data["p99_ms"] and data["p95_ms"] <= data["p99_ms"]
    human = await asyncio.to_thread(wa, system, "stats")
    assert "replied        50" in human.stdout and "p99" in human.stdout


async def test_health_is_healthy_then_down_when_a_service_stops(
    start_system: StartSystem,
) -> None:
    system = await start_system()
    ok = await asyncio.to_thread(wa, system, "health", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads(ok.stdout)["status"] == "healthy"
    await system.sup.stop(["dlq"])
    down = await asyncio.to_thread(wa, system, "health")
    assert down.returncode == 2
    assert "system: down" in down.stdout
    line = next(x for x in down.stdout.splitlines() if " dlq " in x)
    assert "DOWN" in line and "UNAVAILABLE" in line


async def test_commands_whose_service_is_up_say_so_in_one_line_when_the_state_service_is_down(
    start_system: StartSystem,
) -> None:
    """The gateway and the dlq service answer, and what they need behind them does not: the
    command still says in one line what is down and exits 2 (CONTRACT, Operator CLI)."""
    system = await start_system()
    # Three days old: outside the customer's 24-hour window, dead-lettered at once.
    old = payloads.message("text", timestamp=str(int(time.time()) - 3 * 86400))
    assert (await system.post(payloads.delivery(messages=[old]))).status_code == 200
    await system.wait_status([old["id"]], {"dead_lettered"})
    (item,) = await asyncio.to_thread(wa_json, system, "dlq", "list")
    # The table shows what the contract lists: id, message id, conversation, status...
    header, row = (await asyncio.to_thread(wa, system, "dlq", "list")).stdout.splitlines()
    assert header.split()[:5] == ["ID", "STATUS", "ATTEMPTS", "MESSAGE_ID", "CONVERSATION"]
    assert row.split()[:5] == [str(item["id"]), "dead", "1", old["id"], str(item["conversation"])]
    # An id that is not there is said, as `wa dlq retry` says it.
    unknown = await asyncio.to_thread(
        wa, system, "dlq", "purge", "999999", str(item["id"] + 1), "--yes"
    )
    assert unknown.returncode == 1 and "purged 0 of 2 item(s)" in unknown.stdout, unknown.stdout
    # Output read by something that stops reading (`wa ... | head`): no complaint, no traceback.
    read, write = os.pipe()
    os.close(read)
    env = {k: v for k, v in {**os.environ, **system.env}.items() if k != "DATABASE_URL"}
    piped = await asyncio.to_thread(
        subprocess.run,
        [WA, "dlq", "list", "--json"],
        stdout=write,
        stderr=subprocess.PIPE,
        env=env,
        timeout=60,
    )
    os.close(write)
    assert piped.returncode == 141 and piped.stderr == b"", piped.stderr
    await system.sup.stop(["state"])
    # `--all` first, while the item is dead: a redrive that the state service did not take
    # puts the item back to pending, where the dlq worker may be retrying it when `--all`
    # looks (it then finds nothing to redrive); a redrive by id takes it in any of those.
    for args in (
        ["simulate", "hi"],
        ["dlq", "retry", "--all"],
        ["dlq", "retry", str(item["id"])],
    ):
        done = await asyncio.to_thread(wa, system, *args)
        assert done.returncode == 2, done.stdout + done.stderr
        assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"wa {args[0]}")
        assert "Traceback" not in done.stderr, done.stderr
        said = "cannot store the delivery" if args[0] == "simulate" else "state service"
        assert said in done.stderr, done.stderr
    # PostgreSQL and Redis are up: with the state service that checks them down, they are
    # unknown, not down.
    health = await asyncio.to_thread(wa, system, "health")
    assert health.returncode == 2
    lines = {line.split()[1]: line.split()[0] for line in health.stdout.splitlines()[1:6]}
    assert lines["state"] == "DOWN" and lines["postgres"] == "?" and lines["redis"] == "?", (
        health.stdout
    )


async def test_trace_shows_the_timeline_and_the_dlq_attempts(
    start_system: StartSystem, model: FakeModel
) -> None:
    model.script.append(model_error(401, "bad key"))
    system = await start_system(**model.env())
    msg = payloads.message("text", wa_id="15557770000", text={"body": "hi"})
    assert (await system.post(payloads.delivery(messages=[msg]))).status_code == 200
    await system.wait_status([msg["id"]], {"dead_lettered"})
    by_id = await asyncio.to_thread(wa_json, system, "trace", msg["id"])
    moves = [(t["from"], t["to"]) for t in by_id["transitions"] if t["message_id"] == msg["id"]]
    assert moves[:3] == [("", "received"), ("received", "processing"), ("processing", "failed")]
    assert by_id["dlq"][0]["attempts"][0]["error_class"] == "ModelHTTP401"
    by_phone = await asyncio.to_thread(wa, system, "trace", "+15557770000")
    assert by_phone.returncode == 0 and msg["id"] in by_phone.stdout
    assert "trace id" in by_phone.stdout and "dead-letter item" in by_phone.stdout


async def test_trace_finds_a_message_whose_id_has_no_wamid_prefix(
    start_system: StartSystem,
) -> None:
    system = await start_system()
    msg = payloads.message("text", id="test-msg-1", wa_id="15557770001", text={"body": "hi"})
    assert (await system.post(payloads.delivery(messages=[msg]))).status_code == 200
    await system.wait_status(["test-msg-1"], {"replied"})
    by_id = await asyncio.to_thread(wa_json, system, "trace", "test-msg-1")
    assert [m["message_id"] for m in by_id["messages"]] == ["test-msg-1"]
    assert by_id["messages"][0]["status"] == "replied"
    unknown = await asyncio.to_thread(wa, system, "trace", "no-such-thing")
    assert unknown.returncode == 1 and "no-such-thing" in unknown.stderr


async def test_simulate_sends_a_signed_message_and_reports_the_reply(
    start_system: StartSystem, graph: FakeGraph
) -> None:
    system = await start_system()
    done = await asyncio.to_thread(
        wa, system, "simulate", "hello from the cli", "--from", "15559990000"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "-> 200" in done.stdout and "status: replied" in done.stdout
    assert "reply:" in done.stdout
    (sent,) = graph.sends
    assert sent.body["to"] == "15559990000"


@pytest.mark.parametrize(
    "args",
    [
        ["dlq", "list"],
        ["dlq", "show", "1"],
        ["dlq", "retry", "1"],
        ["dlq", "retry", "--all"],
        ["dlq", "purge", "1", "--yes"],
        ["health"],
        ["stats"],
        ["trace", "wamid.X"],
        ["trace", "15550001111"],
        ["simulate", "hi", "--wait", "1"],
        ["handoff", "list"],
        ["handoff", "release", "15550001111"],
        ["handoff", "take", "15550001111"],
        ["reply", "15550001111", "hi"],
        ["migrate"],
        ["migrate", "--check"],
        ["operator", "list"],
        ["operator", "remove", "someone"],
    ],
)
def test_every_command_says_in_one_line_that_what_it_needs_is_down_and_exits_2(
    args: list[str], tmp_path: Path
) -> None:
    port = str(free_port())  # nothing listens there
    tls.create(tmp_path / "tls")  # the operator's certificate is there: the services are not
    env = {
        **os.environ,
        "GRPC_TLS_DIR": str(tmp_path / "tls"),
        "STATE_ADDR": f"127.0.0.1:{port}",
        "DLQ_ADDR": f"127.0.0.1:{port}",
        "AGENT_ADDR": f"127.0.0.1:{port}",
        "GATEWAY_PORT": port,
        "DATABASE_URL": f"postgresql://postgres@127.0.0.1:{port}/postgres",
        "REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "OPERATOR_DATABASE_URL": f"postgresql://operator@127.0.0.1:{port}/postgres",
    }
    done = subprocess.run(
        [WA, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    if args != ["health"]:  # `wa health` reports every component on stdout, its own way
        assert done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"wa {args[0]}"), done.stderr
    else:
        assert "system: down" in done.stdout


# A service frozen (SIGSTOP, a starved or swapped-out host): the kernel completes the TCP
# handshake for its listening socket, and nothing answers the TLS handshake after it.
@pytest.mark.parametrize(
    "args",
    [
        ["dlq", "list"],
        ["dlq", "retry", "--all"],
        ["stats"],
        ["trace", "wamid.X"],
        ["prune", "--dry-run"],
        ["handoff", "list"],
        ["reply", "15550001111", "hi"],
    ],
)
def test_a_command_whose_service_is_frozen_says_so_in_one_line_within_seconds(
    args: list[str], tmp_path: Path
) -> None:
    with socket.socket() as frozen:
        frozen.bind(("127.0.0.1", 0))
        frozen.listen(64)  # and never accepts
        target = f"127.0.0.1:{frozen.getsockname()[1]}"
        tls.create(tmp_path / "tls")
        env = {**os.environ, "GRPC_TLS_DIR": str(tmp_path / "tls")}
        env.update(STATE_ADDR=target, DLQ_ADDR=target, AGENT_ADDR=target)
        # Well within the calls' own deadlines (10 to 60 s), and gRPC's 20-s default for a
        # connection attempt, which is what a command waited before.
        done = subprocess.run(
            [WA, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=15
        )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"wa {args[0]}"), done.stderr
    assert "did not answer" in done.stderr, done.stderr


@pytest.mark.parametrize("hours", ["0", "-1", "2161", "soon"])
def test_stats_refuses_a_span_it_cannot_answer_for_before_calling(hours: str) -> None:
    done = subprocess.run(
        [WA, "stats", "--hours", hours], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2 and "--hours" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
