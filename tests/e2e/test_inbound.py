"""What customers send besides text, from outside: buttons, lists, quick replies, Flows,
captions, locations, contacts, voice notes (downloaded from the Graph API and transcribed), and
what cannot be read (the fallback reply, without a model call). Each answered exactly once; a
reaction never."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import StartSystem
from tests.e2e.test_dlq import wa_json, wait_for
from tests.support import payloads
from tests.support.fakes import FakeGraphWithMedia, FakeMedia, FakeModel, FakeTranscriber, Reply
from tests.support.system import System

pytestmark = pytest.mark.e2e

FALLBACK = "We can only read text and voice notes here, sorry: could you type it?"
QUICK_DLQ = {"DLQ_RETRY_BASE_SECONDS": "0.2", "DLQ_MAX_ATTEMPTS": "1", "DLQ_POLL_SECONDS": "0.2"}


@pytest.fixture
def media_graph() -> Iterator[FakeGraphWithMedia]:
    server = FakeGraphWithMedia().start()
    yield server
    server.release.set()
    server.stop()


@pytest.fixture
def transcriber() -> Iterator[FakeTranscriber]:
    server = FakeTranscriber().start()
    yield server
    server.stop()


def numbered(n: int) -> str:
    return f"1555300{n:04d}"


async def deliver(system: System, messages: list[dict[str, Any]]) -> None:
    for msg in messages:
        assert (await system.post(payloads.delivery(messages=[msg]))).status_code == 200


def answers(graph: FakeGraphWithMedia) -> dict[str, list[str]]:
    """Each answered message id's reply bodies, in the order sent."""
    out: dict[str, list[str]] = {}
    for send in graph.sends:
        out.setdefault(send.body["context"]["message_id"], []).append(send.body["text"]["body"])
    return out


def user_said(model: FakeModel) -> list[str]:
    return [r.body["messages"][-1]["content"] for r in model.requests]


async def test_every_kind_a_customer_sends_gets_exactly_one_answer_and_a_reaction_none(
    start_system: StartSystem, model: FakeModel, media_graph: FakeGraphWithMedia
) -> None:
    system = await start_system(
        WHATSAPP_API_BASE_URL=media_graph.url, AGENT_FALLBACK_REPLY=FALLBACK, **model.env()
    )
    # What the model must be shown for each, as the customer's words.
    read = {
        "button": (
            payloads.button_reply("slot-7", "Yes, book it", wa_id=numbered(1)),
            ["Yes, book it", "slot-7"],
        ),
        "list": (
            payloads.list_reply("t-1900", "19:00", "Window table", wa_id=numbered(2)),
            ["19:00", "Window table", "t-1900"],
        ),
        "quick reply": (
            payloads.quick_reply("STOP_PROMOS", "Stop promotions", wa_id=numbered(3)),
            ["Stop promotions", "STOP_PROMOS"],
        ),
        "flow": (
            payloads.flow_reply(
                {"flow_token": "tok-secret", "date": "2026-12-24", "guests": 4},
                wa_id=numbered(4),
            ),
            ["date: 2026-12-24", "guests: 4"],
        ),
        "image": (
            payloads.message(
                "image", wa_id=numbered(5), image={"caption": "my receipt", "id": "m"}
            ),
            ["my receipt", "image"],
        ),
        "video": (
            payloads.message(
                "video",
                wa_id=numbered(6),
                video={"caption": "the leak", "id": "v", "mime_type": "video/mp4"},
            ),
            ["the leak", "video"],
        ),
        "document": (
            payloads.message("document", wa_id=numbered(7)),
            ["invoice", "a.pdf"],
        ),
        "location": (
            payloads.message("location", wa_id=numbered(8)),
            ["Office", "1 Main St", "51.5", "-0.12"],
        ),
        "contacts": (
            payloads.message(
                "contacts",
                wa_id=numbered(9),
                contacts=[
                    {
                        "name": {"formatted_name": "Ann Lee", "first_name": "Ann"},
                        "phones": [{"phone": "+1 555 0101", "wa_id": "15550101", "type": "CELL"}],
                    },
                    {"name": {"first_name": "Bo"}, "phones": [{"phone": "+44 20 7946"}]},
                ],
            ),
            ["Ann Lee", "+1 555 0101", "Bo", "+44 20 7946"],
        ),
    }
    fallback = {
        "sticker": payloads.message("sticker", wa_id=numbered(10)),
        "unsupported": payloads.message("unsupported", wa_id=numbered(11)),
        "image without caption": payloads.message(
            "image", wa_id=numbered(12), image={"mime_type": "image/jpeg", "id": "m2"}
        ),
        "unknown": payloads.message(
            "unknown",
            wa_id=numbered(13),
            errors=[{"code": 131051, "title": "Unsupported message type"}],
        ),
    }
    reaction = payloads.message(
        "reaction", wa_id=numbered(1), reaction={"message_id": "wamid.X", "emoji": "\u2764"}
    )
    messages = [m for m, _ in read.values()] + list(fallback.values()) + [reaction]
    await deliver(system, messages)
    await system.wait_status([m["id"] for m in messages[:-1]], {"replied"})
    await system.wait_status([reaction["id"]], {"skipped"})
    await asyncio.sleep(0.5)  # a second answer would have been sent by now

    sent = answers(media_graph)
    assert sorted(sent) == sorted(m["id"] for m in messages[:-1])
    assert all(len(bodies) == 1 for bodies in sent.values()), sent
    for kind, msg in fallback.items():
        assert sent[msg["id"]] == [FALLBACK], kind
    seen = user_said(model)
    assert len(seen) == len(read), seen
    for kind, (msg, words) in read.items():
        (content,) = [c for c in seen if all(w in c for w in words)] or [f"nothing for {kind}"]
        assert sent[msg["id"]] == [f"echo: {content}"], kind
    assert not any("tok-secret" in c for c in seen)
    pool = await system.db()
    reason = await pool.fetchval(
        "SELECT status_reason FROM processed_webhook_messages WHERE message_id = $1",
        reaction["id"],
    )
    assert reason == "reactions are recorded, not answered"
    assert not [r for r in media_graph.requests if r.method == "GET"]


async def test_a_choice_id_or_payload_selects_the_agent_type(
    start_system: StartSystem, model: FakeModel, media_graph: FakeGraphWithMedia
) -> None:
    system = await start_system(WHATSAPP_API_BASE_URL=media_graph.url, **model.env())
    tapped = payloads.button_reply("agent:bookings", "Sounds good", wa_id=numbered(20))
    template = payloads.quick_reply("payments", "Sure", wa_id=numbered(21))
    listed = payloads.list_reply("r1", "Talk to support", wa_id=numbered(22))
    plain = payloads.button_reply("nothing-special", "Thanks", wa_id=numbered(23))
    messages = [tapped, template, listed, plain]
    await deliver(system, messages)
    await system.wait_status([m["id"] for m in messages], {"replied"})
    pool = await system.db()
    rows = await pool.fetch(
        "SELECT m.message_id, m.agent_type FROM processed_webhook_messages m "
        "WHERE m.message_id = ANY($1)",
        [m["id"] for m in messages],
    )
    by_id = {r["message_id"]: r["agent_type"] for r in rows}
    assert [by_id[m["id"]] for m in messages] == ["bookings", "payments", "support", "concierge"]
    prompts = {
        r.body["messages"][-1]["content"]: r.body["messages"][0]["content"] for r in model.requests
    }
    assert any("bookings" in p for c, p in prompts.items() if "agent:bookings" in c)


async def test_a_voice_note_is_downloaded_transcribed_and_answered_from_its_words(
    start_system: StartSystem,
    model: FakeModel,
    media_graph: FakeGraphWithMedia,
    transcriber: FakeTranscriber,
) -> None:
    audio = os.urandom(200_000)
    media_graph.media["media-voice-1"] = FakeMedia(audio, "audio/ogg; codecs=opus")
    # The Graph API fails once: the media's URL is asked again (bounded retries).
    media_graph.media_script.append(media_graph.error(500, 2, "service temporarily unavailable"))
    transcriber.words = "Hi, I would like to book a table for four tonight"
    system = await start_system(
        WHATSAPP_API_BASE_URL=media_graph.url,
        TRANSCRIPTION_URL=transcriber.url + "/v1",
        TRANSCRIPTION_API_KEY="tk-test",
        **model.env(),
    )
    msg = payloads.voice_note("media-voice-1", wa_id=numbered(30))
    await deliver(system, [msg])
    await system.wait_status([msg["id"]], {"replied"})

    (upload,) = transcriber.uploads
    fields, file = upload
    assert file == audio, "the transcriber got exactly the bytes the Graph API served"
    assert fields["model"] == "whisper-1"
    (call,) = transcriber.requests
    assert call.path == "/v1/audio/transcriptions"
    assert call.headers["authorization"] == "Bearer tk-test"
    (request,) = model.requests
    said = request.body["messages"][-1]["content"]
    assert transcriber.words in said and "voice note" in said
    assert "bookings" in request.body["messages"][0]["content"], "routed on the spoken words"
    assert media_graph.downloads == ["media-voice-1"]
    gets = [r.path for r in media_graph.requests if r.method == "GET"]
    assert gets == ["/v23.0/media-voice-1"] * 2 + ["/download/media-voice-1"]
    sent = answers(media_graph)
    assert sent == {msg["id"]: [f"echo: {said}"]}


async def test_without_transcription_a_voice_note_gets_the_fallback_and_no_model_call(
    start_system: StartSystem, model: FakeModel, media_graph: FakeGraphWithMedia
) -> None:
    media_graph.media["media-voice-2"] = FakeMedia(b"OggS" + os.urandom(1000))
    system = await start_system(
        WHATSAPP_API_BASE_URL=media_graph.url, AGENT_FALLBACK_REPLY=FALLBACK, **model.env()
    )
    msg = payloads.voice_note("media-voice-2", wa_id=numbered(31))
    await deliver(system, [msg])
    await system.wait_status([msg["id"]], {"replied"})
    await asyncio.sleep(0.5)
    assert answers(media_graph) == {msg["id"]: [FALLBACK]}
    assert model.requests == []
    assert media_graph.downloads == [] and media_graph.aborted == []
    pool = await system.db()
    row = await pool.fetchrow(
        "SELECT reply_text, reply_message_id FROM processed_webhook_messages WHERE message_id = $1",
        msg["id"],
    )
    assert row is not None and row["reply_text"] == FALLBACK and row["reply_message_id"]
    # An operator reading the message's timeline sees why it got the fallback reply.
    reason = await pool.fetchval(
        "SELECT reason FROM conversation_state_transitions"
        " WHERE message_id = $1 AND to_state = 'replied'",
        msg["id"],
    )
    assert reason.startswith("reply sent as ") and "; the fallback reply: " in reason, reason
    assert "TRANSCRIPTION_URL" in reason, reason


async def test_a_too_large_voice_note_is_refused_before_being_read_whole(
    start_system: StartSystem,
    model: FakeModel,
    media_graph: FakeGraphWithMedia,
    transcriber: FakeTranscriber,
) -> None:
    cap = 256 * 1024
    # Its size is declared by the metadata: not a byte is downloaded.
    media_graph.media["media-big-declared"] = FakeMedia(os.urandom(cap + 1))
    # No size anywhere, sent chunked: the download is cut off once it passes the cap.
    media_graph.media["media-big-chunked"] = FakeMedia(os.urandom(32 * 1024 * 1024), declared=False)
    transcriber.words = "never heard"
    system = await start_system(
        WHATSAPP_API_BASE_URL=media_graph.url,
        TRANSCRIPTION_URL=transcriber.url,
        MEDIA_MAX_BYTES=str(cap),
        AGENT_FALLBACK_REPLY=FALLBACK,
        **model.env(),
    )
    declared = payloads.voice_note("media-big-declared", wa_id=numbered(32))
    chunked = payloads.voice_note("media-big-chunked", wa_id=numbered(33))
    await deliver(system, [declared, chunked])
    await system.wait_status([declared["id"], chunked["id"]], {"replied"})
    assert answers(media_graph) == {declared["id"]: [FALLBACK], chunked["id"]: [FALLBACK]}
    assert model.requests == [] and transcriber.uploads == []
    gets = [r.path for r in media_graph.requests if r.method == "GET"]
    assert "/download/media-big-declared" not in gets
    assert "/download/media-big-chunked" in gets
    assert media_graph.wait_for(lambda: bool(media_graph.aborted))
    (aborted_id, written), *_ = media_graph.aborted
    assert aborted_id == "media-big-chunked" and written < 32 * 1024 * 1024
    assert media_graph.downloads == []


async def test_a_failing_transcription_is_retried_then_dead_lettered_with_its_class(
    start_system: StartSystem,
    model: FakeModel,
    media_graph: FakeGraphWithMedia,
    transcriber: FakeTranscriber,
) -> None:
    media_graph.media["media-voice-3"] = FakeMedia(os.urandom(5000))
    failure: Reply = (503, {"error": {"message": "overloaded"}}, {})
    transcriber.script.extend([failure] * 50)
    system = await start_system(
        WHATSAPP_API_BASE_URL=media_graph.url,
        TRANSCRIPTION_URL=transcriber.url,
        AGENT_MAX_RETRIES="1",
        **QUICK_DLQ,
        **model.env(),
    )
    msg = payloads.voice_note("media-voice-3", wa_id=numbered(34))
    await deliver(system, [msg])
    pool = await system.db()

    async def dead() -> bool:
        status = await pool.fetchval(
            "SELECT status FROM webhook_dlq WHERE message_id = $1", msg["id"]
        )
        return bool(status == "dead")

    await wait_for(dead)
    assert model.requests == [] and media_graph.sends == []
    # Two turns (the first and one redrive), two attempts each: bounded.
    assert len(transcriber.uploads) == 4
    traced = await asyncio.to_thread(wa_json, system, "trace", msg["id"])
    classes = [a["error_class"] for a in traced["dlq"][0]["attempts"]]
    assert classes and set(classes) == {"TranscriptionHTTP503"}
