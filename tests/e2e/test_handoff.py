"""Human handoff from outside: a customer who asks for a person gets the handoff message, and
from then on no model call and no automatic answer until an operator releases the
conversation; messages meanwhile are kept and listed for the person; operators answer with
`wa reply`, sent once per invocation, within the 24-hour window."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest
from wa.v1 import agent_pb2, agent_pb2_grpc

from common import grpcserver
from tests.conftest import StartSystem
from tests.e2e.test_dlq import wa, wa_json
from tests.support import payloads
from tests.support.fakes import FakeGraph, FakeModel
from tests.support.system import System

pytestmark = pytest.mark.e2e

CUSTOMER = "15550004242"
CONCIERGE_PROMPT = "You are the WhatsApp concierge"
HANDOFF_PROMPT = "Tell the customer, kindly"


async def post_text(
    system: System, text: str, wa_id: str = CUSTOMER, phone_number_id: str = ""
) -> str:
    msg = payloads.message("text", wa_id=wa_id, text={"body": text})
    doc = payloads.delivery(messages=[msg])
    if phone_number_id:
        doc["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = phone_number_id
    assert (await system.post(doc)).status_code == 200
    return str(msg["id"])


async def say(system: System, text: str, wait: set[str], wa_id: str = CUSTOMER) -> str:
    message_id = await post_text(system, text, wa_id)
    await system.wait_status([message_id], wait)
    return message_id


async def row(system: System, message_id: str) -> dict[str, Any]:
    pool = await system.db()
    found = await pool.fetchrow(
        "SELECT status, status_reason, agent_type, reply_text FROM processed_webhook_messages "
        "WHERE message_id = $1",
        message_id,
    )
    assert found is not None
    return dict(found)


def sends_saying(graph: FakeGraph, text: str) -> list[Any]:
    return [r for r in graph.sends if r.body["text"]["body"] == text]


async def test_after_the_handoff_no_model_call_until_released_then_the_bot_answers_again(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph
) -> None:
    system = await start_system(**model.env())
    await say(system, "hello there", {"replied"})
    asked = await say(system, "I want to talk to a human please", {"replied"})
    assert (await row(system, asked))["agent_type"] == "handoff"
    assert model.requests[-1].body["messages"][0]["content"].startswith(HANDOFF_PROMPT)
    calls, sends = len(model.requests), len(graph.sends)
    assert (calls, sends) == (2, 2)

    later = [await post_text(system, f"are you there? {n}") for n in range(3)]
    await system.wait_status(later, {"skipped"})
    for message_id in later:
        assert (await row(system, message_id))["status_reason"].startswith(
            "waiting for a person (handed off at "
        )
    # Kept for the person: never answered by the model, never sent anything.
    assert (len(model.requests), len(graph.sends)) == (calls, sends)

    (listed,) = await asyncio.to_thread(wa_json, system, "handoff", "list")
    assert listed["wa_id"] == CUSTOMER and listed["name"] == "Test Customer"
    assert listed["handoff_message_id"] == asked and listed["since"]
    assert [m["message_id"] for m in listed["waiting"]] == later
    assert listed["waiting_count"] == 3
    assert listed["waiting"][0]["text"] == "are you there? 0"
    human = await asyncio.to_thread(wa, system, "handoff", "list")
    assert CUSTOMER in human.stdout and "waiting for a person since" in human.stdout

    released = await asyncio.to_thread(wa, system, "handoff", "release", f"+{CUSTOMER}")
    assert released.returncode == 0, released.stderr
    assert await asyncio.to_thread(wa_json, system, "handoff", "list") == []
    traced = await asyncio.to_thread(wa, system, "trace", CUSTOMER)
    assert "handoff: person  handed off to a person by the handoff agent" in traced.stdout
    assert "handoff: bot  released to the bot by" in traced.stdout

    # The bot answers again, from the default agent (not straight back into the handoff).
    back = await say(system, "what time do you open tomorrow", {"replied"})
    assert (await row(system, back))["agent_type"] == "concierge"
    assert len(model.requests) == calls + 1
    assert model.requests[-1].body["messages"][0]["content"].startswith(CONCIERGE_PROMPT)
    assert len(graph.sends) == sends + 1

    again = await asyncio.to_thread(wa, system, "handoff", "release", CUSTOMER)
    assert again.returncode == 1 and "not waiting for a person" in again.stderr


async def test_a_message_arriving_while_the_handoff_turn_is_in_flight_waits_for_the_person(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph
) -> None:
    system = await start_system(**model.env())
    graph.release.clear()  # the handoff message's send waits: its turn stays in flight
    asked = await post_text(system, "get me a person")
    assert await asyncio.to_thread(graph.wait_for, lambda: len(graph.sends) == 1)
    during = await post_text(system, "hello? anyone?")
    await system.wait_status([during], {"received"})
    graph.release.set()
    await system.wait_status([asked], {"replied"})
    await system.wait_status([during], {"skipped"})
    assert (await row(system, during))["status_reason"].startswith("waiting for a person")
    assert len(model.requests) == 1 and len(graph.sends) == 1
    (listed,) = await asyncio.to_thread(wa_json, system, "handoff", "list")
    assert [m["message_id"] for m in listed["waiting"]] == [during]


async def test_an_operator_reply_is_sent_once_per_invocation_even_when_retried(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph
) -> None:
    system = await start_system(**model.env())
    await say(system, "I need an operator", {"replied"})
    sends = len(graph.sends)

    first = await asyncio.to_thread(
        wa, system, "reply", CUSTOMER, "Hi, Ana here.", "--idempotency-key", "k-1"
    )
    assert first.returncode == 0, first.stderr
    assert "sent to" in first.stdout
    # The same request again (a retry after a lost answer): found, not sent again.
    retried = await asyncio.to_thread(
        wa, system, "reply", CUSTOMER, "Hi, Ana here.", "--idempotency-key", "k-1"
    )
    assert retried.returncode == 0, retried.stderr
    assert "already sent" in retried.stdout
    assert len(sends_saying(graph, "Hi, Ana here.")) == 1
    (sent,) = sends_saying(graph, "Hi, Ana here.")
    assert sent.body["to"] == CUSTOMER
    assert sent.body["biz_opaque_callback_data"].startswith("operator:")

    # Each invocation is its own answer.
    for _ in range(2):
        done = await asyncio.to_thread(wa, system, "reply", CUSTOMER, "Anything else?")
        assert done.returncode == 0, done.stderr
    assert len(sends_saying(graph, "Anything else?")) == 2

    # A NUL (a form can carry one; PostgreSQL's text cannot) is refused as such, not an
    # UNKNOWN error with a traceback in the agent's log.
    target = f"127.0.0.1:{system.ports['agent']}"
    async with grpcserver.channel(target, transport=system.transport()) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await agent_pb2_grpc.AgentStub(ch).SendOperatorReply(
                agent_pb2.SendOperatorReplyRequest(
                    customer=CUSTOMER, text="a\x00b", idempotency_key="k-nul"
                ),
                timeout=10,
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value
    assert len(graph.sends) == sends + 3
    assert len(model.requests) == 1  # operators' answers never call the model

    traced = await asyncio.to_thread(wa, system, "trace", CUSTOMER)
    assert "operator: sent  reply by" in traced.stdout and "Hi, Ana here." in traced.stdout

    # After the release, the bot knows what the operator said.
    assert (await asyncio.to_thread(wa, system, "handoff", "release", CUSTOMER)).returncode == 0
    await say(system, "thanks, and your address?", {"replied"})
    said = [m["content"] for m in model.requests[-1].body["messages"] if m["role"] == "assistant"]
    assert "Hi, Ana here." in said and said.count("Anything else?") == 2


async def test_after_the_release_the_bot_knows_what_the_customer_asked_the_person(
    start_system: StartSystem, model: FakeModel
) -> None:
    system = await start_system(**model.env())
    await say(system, "I need an operator", {"replied"})
    await say(system, "can I move my table to friday?", {"skipped"})
    for answer in ("Yes, done: Friday at 8.", "Anything else?"):
        done = await asyncio.to_thread(wa, system, "reply", CUSTOMER, answer)
        assert done.returncode == 0, done.stderr
    assert (await asyncio.to_thread(wa, system, "handoff", "release", CUSTOMER)).returncode == 0
    await say(system, "thanks!", {"replied"})
    said = [(m["role"], m["content"]) for m in model.requests[-1].body["messages"]]
    asked = ("user", "can I move my table to friday?")
    # Once, in its place: before the person's answers, not again before the second one.
    assert said.count(asked) == 1
    at = said.index(asked)
    assert said[at + 1 : at + 3] == [
        ("assistant", "Yes, done: Friday at 8."),
        ("assistant", "Anything else?"),
    ]
    assert said[-1] == ("user", "thanks!")
    # The context's entries number its messages without gaps or overlaps (seq to seq + n - 1),
    # and the context's last number is the last of them: what pruning the context relies on.
    pool = await system.db()
    entries = await pool.fetch("SELECT seq, n FROM agent_context_entries ORDER BY seq")
    assert [e["seq"] for e in entries[1:]] == [e["seq"] + e["n"] for e in entries[:-1]]
    last = await pool.fetchval("SELECT last_seq FROM agent_contexts")
    assert last == entries[-1]["seq"] + entries[-1]["n"] - 1


async def test_operator_replies_refused_outside_the_window_for_unknown_or_ambiguous_customers(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph
) -> None:
    system = await start_system(**model.env())
    await say(system, "hello", {"replied"})
    other_number = "100000000000002"
    on_other = await post_text(system, "hello from the other number", phone_number_id=other_number)
    await system.wait_status([on_other], {"replied"})
    sends = len(graph.sends)

    unknown = await asyncio.to_thread(wa, system, "reply", "15559999999", "hi")
    assert unknown.returncode == 1 and "no conversation with customer" in unknown.stderr
    ambiguous = await asyncio.to_thread(wa, system, "reply", CUSTOMER, "hi")
    assert ambiguous.returncode == 1 and "--number" in ambiguous.stderr
    named = await asyncio.to_thread(
        wa, system, "reply", CUSTOMER, "hi from two", "--number", other_number
    )
    assert named.returncode == 0, named.stderr
    (sent,) = sends_saying(graph, "hi from two")
    assert sent.path.split("/")[2] == other_number

    pool = await system.db()
    await pool.execute(
        "UPDATE webhook_conversations SET last_message_at = now() - interval '25 hours' "
        "WHERE wa_id = $1 AND phone_number_id = $2",
        CUSTOMER,
        payloads.PHONE_NUMBER_ID,
    )
    late = await asyncio.to_thread(
        wa, system, "reply", CUSTOMER, "too late", "--number", payloads.PHONE_NUMBER_ID
    )
    assert late.returncode == 1 and "outside the 24-hour window" in late.stderr
    assert len(graph.sends) == sends + 1
    not_handed = await asyncio.to_thread(
        wa, system, "handoff", "release", CUSTOMER, "--number", other_number
    )
    assert not_handed.returncode == 1 and "not waiting for a person" in not_handed.stderr
    reused = await asyncio.to_thread(
        wa, system, "reply", "15550007777", "other", "--idempotency-key", "k-2"
    )
    assert reused.returncode == 1 and "no conversation" in reused.stderr
    await asyncio.to_thread(
        wa, system, "reply", CUSTOMER, "one", "--number", other_number, "--idempotency-key", "k-3"
    )
    other = await asyncio.to_thread(
        wa, system, "reply", CUSTOMER, "two", "--number", other_number, "--idempotency-key", "k-3"
    )
    assert other.returncode == 1 and "used for another reply" in other.stderr
    assert not sends_saying(graph, "two")

    # `wa forget` erases the operators' replies with the conversation.
    assert await pool.fetchval("SELECT count(*) FROM operator_replies") == 2
    forgot = await asyncio.to_thread(wa, system, "forget", CUSTOMER, "--yes")
    assert forgot.returncode == 0, forgot.stderr
    assert await pool.fetchval("SELECT count(*) FROM operator_replies") == 0


async def test_a_reply_retried_while_its_first_send_is_in_flight_is_not_sent_twice(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph
) -> None:
    system = await start_system(**model.env(WHATSAPP_TIMEOUT_SECONDS="25"))
    await say(system, "hello", {"replied"})
    args = ("reply", CUSTOMER, "On it.", "--idempotency-key", "k-flight")
    graph.release.clear()  # the first request's send waits at the Graph API
    first = asyncio.create_task(asyncio.to_thread(wa, system, *args))
    assert await asyncio.to_thread(graph.wait_for, lambda: bool(sends_saying(graph, "On it.")))
    # The same request again while the first one's outcome is unknown: refused, not sent.
    retried = await asyncio.to_thread(wa, system, *args)
    assert retried.returncode == 1 and "not sent again" in retried.stderr
    graph.release.set()
    done = await first
    assert done.returncode == 0 and "sent to" in done.stdout, done.stderr
    again = await asyncio.to_thread(wa, system, *args)
    assert again.returncode == 0 and "already sent" in again.stdout
    assert len(sends_saying(graph, "On it.")) == 1


async def test_an_operator_takes_a_conversation_over_and_answers_it(
    start_system: StartSystem, model: FakeModel, graph: FakeGraph
) -> None:
    system = await start_system(**model.env())
    await say(system, "hello", {"replied"})
    taken = await asyncio.to_thread(wa, system, "handoff", "take", CUSTOMER)
    assert taken.returncode == 0 and "taken over" in taken.stdout, taken.stderr
    again = await asyncio.to_thread(wa, system, "handoff", "take", CUSTOMER)
    assert again.returncode == 0 and "already waiting for a person" in again.stdout
    calls, sends = len(model.requests), len(graph.sends)

    held = await say(system, "can I change my booking?", {"skipped"})
    assert (await row(system, held))["status_reason"].startswith("waiting for a person")
    (listed,) = await asyncio.to_thread(wa_json, system, "handoff", "list")
    assert listed["handoff_message_id"] == ""
    assert [m["message_id"] for m in listed["waiting"]] == [held]
    answered = await asyncio.to_thread(wa, system, "reply", CUSTOMER, "Yes, to when?")
    assert answered.returncode == 0, answered.stderr
    assert len(model.requests) == calls and len(graph.sends) == sends + 1
    traced = await asyncio.to_thread(wa, system, "trace", CUSTOMER)
    assert "handoff: person  taken over from the bot by" in traced.stdout
