"""services/agent/inbound.py without a network: what each kind of message says to the model,
that any payload is read without raising, and the voice-note path with in-memory ports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.agent import agents, http, inbound
from services.agent.deadline import UNBOUNDED, Deadline
from services.agent.graph import GraphError, Media
from services.agent.outbound import GraphAction
from services.state import store
from tests.support import payloads

ROOT = Path(__file__).resolve().parents[2]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=30)
    | st.sampled_from(["", "\x00", "\ud83d", "agent:bookings", "{}", '{"a": [1, 2]}']),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=25,
)
KINDS = (*payloads.ALL_MESSAGE_TYPES, "", "x" * 200)
DOCUMENTED_KEYS = (
    "type",
    "id",
    "caption",
    "title",
    "description",
    "payload",
    "text",
    "body",
    "name",
    "response_json",
    "button_reply",
    "list_reply",
    "nfm_reply",
    "latitude",
    "longitude",
    "address",
    "phones",
    "phone",
    "formatted_name",
    "product_items",
    "voice",
    "mime_type",
    "filename",
)
# Meta-shaped objects with random values where Meta puts its fields.
shaped = st.recursive(
    json_values,
    lambda inner: (
        st.dictionaries(st.sampled_from(DOCUMENTED_KEYS), inner, max_size=6)
        | st.lists(inner, max_size=3)
    ),
    max_leaves=30,
)


def meta_shaped(kind: str, body: Any) -> dict[str, Any]:
    return {"id": "wamid.X", "type": kind, kind: body}


@settings(max_examples=400)
@given(kind=st.sampled_from(KINDS), payload=json_values, text=st.text(max_size=50))
def test_any_payload_is_read_without_raising(kind: str, payload: Any, text: str) -> None:
    check(inbound.read(kind, payload, text))


@settings(max_examples=600)
@given(kind=st.sampled_from(KINDS), body=shaped)
def test_any_meta_shaped_message_is_read_without_raising(kind: str, body: Any) -> None:
    check(inbound.read(kind, meta_shaped(kind, body)))


def check(reading: inbound.Reading) -> None:
    assert isinstance(reading, inbound.Said | inbound.Audio | inbound.Fallback)
    if isinstance(reading, inbound.Said):
        assert len(reading.text) <= inbound.TEXT_CHARS
        assert isinstance(reading.route_text, str) and isinstance(reading.choice, str)
    if isinstance(reading, inbound.Fallback):
        assert reading.reason


@pytest.mark.parametrize(
    ("message", "words", "choice"),
    [
        (payloads.button_reply("slot-1", "Yes, book it"), ["Yes, book it", "slot-1"], "slot-1"),
        (payloads.list_reply("r-9", "9:00", "Morning"), ["9:00", "Morning", "r-9"], "r-9"),
        (payloads.quick_reply("PROMO_STOP", "Stop"), ["Stop", "PROMO_STOP"], "PROMO_STOP"),
        (payloads.flow_reply({"flow_token": "t", "size": "M"}), ["size: M"], ""),
        (payloads.message("image"), ["a photo", "image"], ""),
        (payloads.message("document"), ["invoice", "a.pdf"], ""),
        (payloads.message("location"), ["Office", "1 Main St", "51.5", "-0.12"], ""),
        (payloads.message("contacts"), ["Ann", "+1555"], ""),
        (payloads.message("order"), ["p1", "9.5 USD"], ""),
    ],
)
def test_each_kind_reads_as_the_customers_words(
    message: dict[str, Any], words: list[str], choice: str
) -> None:
    said = inbound.read(message["type"], message)
    assert isinstance(said, inbound.Said), said
    assert all(w in said.text for w in words), said.text
    assert said.choice == choice


def test_a_flow_token_is_not_shown_to_the_model() -> None:
    said = inbound.read("interactive", payloads.flow_reply({"flow_token": "secret", "a": 1}))
    assert isinstance(said, inbound.Said) and "secret" not in said.text


@pytest.mark.parametrize(
    "message",
    [
        payloads.message("sticker"),
        payloads.message("unsupported"),
        payloads.message("video"),  # no caption
        payloads.message("image", image={"id": "m"}),
        payloads.message("reaction"),
        payloads.message("interactive", interactive={"type": "call_permission_reply"}),
        payloads.message("audio", audio={"mime_type": "audio/ogg"}),  # no media id
    ],
)
def test_what_cannot_be_read_is_a_fallback(message: dict[str, Any]) -> None:
    assert isinstance(inbound.read(message["type"], message), inbound.Fallback)


def test_a_voice_note_is_audio_to_transcribe() -> None:
    reading = inbound.read("audio", payloads.voice_note("m-1"))
    assert reading == inbound.Audio("m-1", "audio/ogg; codecs=opus", voice=True)
    assert inbound.audio_filename(reading.mime_type) == "audio.ogg"


def test_every_type_the_state_service_answers_is_read() -> None:
    """The state service hands these to a turn: each has a reading (the unreadable ones a
    fallback on purpose), and a reaction, skipped, is never answered."""
    readable = store.ANSWERED_TYPES - {"sticker", "unsupported", "unknown"}
    for kind in readable:
        # Meta's samples (payloads.message), a video's with the caption it may have.
        message = payloads.message(kind)
        if kind == "video":
            message["video"]["caption"] = "c"
        assert not isinstance(inbound.read(kind, message, "hello"), inbound.Fallback), kind
    assert "reaction" not in store.ANSWERED_TYPES
    assert store.skip_reason("reaction") == "reactions are recorded, not answered"
    assert store.skip_reason("system")


def test_a_choice_naming_an_agent_type_routes_there() -> None:
    catalog = agents.load(ROOT / "config" / "agents.toml")
    assert catalog.route("concierge", "Sounds good", "agent:bookings") == "bookings"
    assert catalog.route("concierge", "Sure", "PAYMENTS") == "payments"
    # Otherwise the title's words route, as a text's would; an unknown id changes nothing.
    assert catalog.route("concierge", "Talk to support", "r1") == "support"
    assert catalog.route("bookings", "Thanks", "agent:nobody") == "bookings"


class Media_:
    def __init__(self, result: Media | Exception) -> None:
        self.result = result
        self.asked: list[tuple[str, int]] = []

    async def download_media(
        self, media_id: str, *, max_bytes: int, deadline: Deadline = UNBOUNDED
    ) -> Media:
        self.asked.append((media_id, max_bytes))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


class Words:
    def __init__(self, words: str | Exception) -> None:
        self.words = words
        self.heard: list[bytes] = []

    async def transcribe(
        self, audio: bytes, *, mime_type: str, deadline: Deadline = UNBOUNDED
    ) -> str:
        self.heard.append(audio)
        if isinstance(self.words, Exception):
            raise self.words
        return self.words


VOICE = payloads.voice_note("m-7")


async def test_a_voice_note_is_transcribed_and_read_from_its_words() -> None:
    media, words = Media_(Media(b"OggS...", "audio/ogg")), Words("  book a table  ")
    reader = inbound.Reader(media=media, transcriber=words, max_bytes=1000)
    said = await reader.understand("audio", VOICE, "")
    assert isinstance(said, inbound.Said)
    assert said.route_text == "book a table" and "voice note" in said.text
    assert media.asked == [("m-7", 1000)] and words.heard == [b"OggS..."]


@pytest.mark.parametrize(
    ("reader", "reason"),
    [
        (inbound.Reader(media=Media_(Media(b"x", "")), transcriber=None), "TRANSCRIPTION_URL"),
        (inbound.Reader(media=None, transcriber=Words("hi")), "WHATSAPP_ACCESS_TOKEN"),
        (
            inbound.Reader(media=Media_(http.TooLarge(10, 11)), transcriber=Words("hi")),
            "too large",
        ),
        (inbound.Reader(media=Media_(Media(b"x", "")), transcriber=Words(" ")), "empty"),
    ],
)
async def test_a_voice_note_that_cannot_be_heard_is_a_fallback(
    reader: inbound.Reader, reason: str
) -> None:
    said = await reader.understand("audio", VOICE, "")
    assert isinstance(said, inbound.Fallback) and reason in said.reason


async def test_a_failed_download_or_transcription_is_an_inbound_error() -> None:
    down = GraphError("HTTP 500", code="1", action=GraphAction.RETRY, status=500)
    reader = inbound.Reader(media=Media_(down), transcriber=Words("hi"))
    with pytest.raises(inbound.InboundError) as failed:
        await reader.understand("audio", VOICE, "")
    assert failed.value.error_class == "MediaDownloadFailed" and failed.value.retryable
    deaf = inbound.InboundError("503", error_class="TranscriptionHTTP503")
    reader = inbound.Reader(media=Media_(Media(b"x", "")), transcriber=Words(deaf))
    with pytest.raises(inbound.InboundError) as failed:
        await reader.understand("audio", VOICE, "")
    assert failed.value.error_class == "TranscriptionHTTP503"


def test_a_flow_response_that_is_not_json_still_reads() -> None:
    message = payloads.message(
        "interactive",
        interactive={
            "type": "nfm_reply",
            "nfm_reply": {"name": "flow", "body": "Sent", "response_json": "{not json"},
        },
    )
    said = inbound.read("interactive", message)
    assert isinstance(said, inbound.Said) and "Sent" in said.text
    deep = "[" * 100_000 + "]" * 100_000
    message["interactive"]["nfm_reply"]["response_json"] = deep
    check(inbound.read("interactive", message))
    message["interactive"]["nfm_reply"]["response_json"] = json.dumps({"k": ["a", "b"]})
    said = inbound.read("interactive", message)
    assert isinstance(said, inbound.Said) and "k: a, b" in said.text
