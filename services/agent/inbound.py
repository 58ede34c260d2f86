"""What a customer's message says, for the model: every kind the state service hands to a turn
becomes the user message's text (a tapped button as the choice and its id, a caption, a voice
note's transcript, a location or shared contacts as a short line), or a fallback decision when
it cannot be read (a sticker, media without a caption, an unsupported type, a voice note with
no transcription configured).

`read` interprets a stored message (its type and payload, Meta's message object) without any
I/O and never raises, whatever the payload; `Reader.understand` is what a turn calls: it also
downloads and transcribes a voice note. Media is held in memory for that call only.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from typing import Any, Protocol

from opentelemetry import trace

from common import telemetry

from . import http
from .deadline import UNBOUNDED, Deadline
from .graph import GraphError, Media

log = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)

# What one field of a message contributes at most (a Flow's answers, a contact's name...): the
# user message stays a message, however large the payload.
FIELD_CHARS = 500
# What a rendered message holds at most (WhatsApp's own text limit).
TEXT_CHARS = 4096
# Shared contacts and order items listed, at most.
MAX_ITEMS = 10


@dataclass(frozen=True)
class Said:
    """What the customer said, for the model."""

    # The model's user message.
    text: str
    # What keyword routing reads: the customer's own words (a title, a caption, a transcript),
    # never our labels or ids ("agent" is a keyword).
    route_text: str
    # A tapped button's id, a list row's id or a template quick reply's payload: may select an
    # agent type (AgentCatalog.route).
    choice: str = ""


@dataclass(frozen=True)
class Audio:
    """A voice note or audio file, to be downloaded and transcribed."""

    media_id: str
    mime_type: str
    voice: bool


@dataclass(frozen=True)
class Fallback:
    """Cannot be answered from what it says: the customer gets the fallback reply, and the
    model is not called. `reason` is for operators (logs, the trace)."""

    reason: str


Reading = Said | Audio | Fallback


class InboundError(Exception):
    """The message could not be read now (media download, transcription): the turn fails with
    `error_class`, and the dead-letter queue redrives it while `retryable`."""

    def __init__(self, message: str, *, error_class: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.retryable = retryable


class MediaSource(Protocol):
    async def download_media(
        self, media_id: str, *, max_bytes: int, deadline: Deadline = UNBOUNDED
    ) -> Media: ...


class Transcriber(Protocol):
    async def transcribe(
        self, audio: bytes, *, mime_type: str, deadline: Deadline = UNBOUNDED
    ) -> str: ...


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: Any, limit: int = FIELD_CHARS) -> str:
    """A scalar's text, at most `limit` characters ("" for anything else); a short field's
    on one line."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, bool) or value is None:
        return ""
    elif isinstance(value, int):
        text = str(value) if -(10**30) < value < 10**30 else ""
    elif isinstance(value, float) and math.isfinite(value):
        text = repr(value)
    else:
        return ""
    text = " ".join(text.split()) if limit <= FIELD_CHARS else text.strip()
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _quoted(text: str) -> str:
    return f"\u201c{text}\u201d"


def _said(text: str, route_text: str, choice: str = "") -> Said:
    if len(text) > TEXT_CHARS:
        text = text[: TEXT_CHARS - 1] + "\u2026"
    return Said(text=text, route_text=route_text, choice=choice)


def read(message_type: str, payload: Any, text: str = "") -> Reading:
    """The message of `message_type` whose Meta object is `payload` (any JSON value; `text`:
    its stored text, what a text message says). Never raises."""
    message = _dict(payload)
    if message_type == "text":
        # As always: the stored text, exactly (it is what the context has held so far).
        return Said(text=text, route_text=text)
    if message_type == "interactive":
        return _interactive(_dict(message.get("interactive")))
    if message_type == "button":
        # A template's quick reply: what the button said, and the payload the template set.
        button = _dict(message.get("button"))
        title, payload_id = _str(button.get("text")), _str(button.get("payload"))
        if not title and not payload_id:
            return Fallback("a quick reply without text or payload")
        text = f"[tapped the quick reply {_quoted(title or payload_id)}"
        if payload_id:
            text += f", payload {payload_id}"
        return _said(text + "]", title, payload_id)
    if message_type in ("image", "video", "document"):
        media = _dict(message.get(message_type))
        caption = _str(media.get("caption"), TEXT_CHARS)
        if not caption:
            return Fallback(f"{message_type} without a caption")
        filename = _str(media.get("filename"), 200) if message_type == "document" else ""
        label = f"{message_type} {_quoted(filename)}" if filename else message_type
        article = "an" if label[0] in "aeiou" else "a"
        return _said(f"[sent {article} {label} with the caption] {caption}", caption)
    if message_type == "audio":
        audio = _dict(message.get("audio"))
        media_id = _str(audio.get("id"), 256)
        if not media_id:
            return Fallback("audio without a media id")
        return Audio(
            media_id=media_id,
            mime_type=_str(audio.get("mime_type"), 100),
            voice=audio.get("voice") is True,
        )
    if message_type == "location":
        return _location(_dict(message.get("location")))
    if message_type == "contacts":
        return _contacts(_list(message.get("contacts")))
    if message_type == "order":
        return _order(_dict(message.get("order")))
    if message_type == "sticker":
        return Fallback("a sticker")
    if message_type == "reaction":
        # Never handed to a turn (the state service skips reactions); never answered.
        return Fallback("a reaction")
    return Fallback(f"message type {_str(message_type, 64)!r} cannot be read")


def _interactive(interactive: dict[str, Any]) -> Reading:
    kind = _str(interactive.get("type"), 64)
    if kind in ("button_reply", "list_reply"):
        reply = _dict(interactive.get(kind))
        title, choice = _str(reply.get("title")), _str(reply.get("id"), 256)
        description = _str(reply.get("description")) if kind == "list_reply" else ""
        if not title and not choice:
            return Fallback(f"a {kind} without title or id")
        what = "the button" if kind == "button_reply" else "the list option"
        text = f"[chose {what} {_quoted(title or choice)}"
        if description:
            text += f" ({description})"
        if choice:
            text += f", id {choice}"
        return _said(text + "]", " ".join(p for p in (title, description) if p), choice)
    if kind == "nfm_reply":
        # A WhatsApp Flow's answers: response_json is a JSON object in a string.
        reply = _dict(interactive.get("nfm_reply"))
        name = _str(reply.get("name"), 64) or "flow"
        answers = _flow_answers(reply.get("response_json"))
        if not answers:
            body = _str(reply.get("body"))
            if not body:
                return Fallback("a flow reply without answers")
            return _said(f"[completed the form {_quoted(name)}] {body}", body)
        lines = "; ".join(f"{k}: {v}" for k, v in answers)
        return _said(
            f"[completed the form {_quoted(name)}] {lines}", " ".join(v for _, v in answers)
        )
    return Fallback(f"interactive reply {kind!r} cannot be read")


def _flow_answers(raw: Any) -> list[tuple[str, str]]:
    """A Flow's fields and values (flow_token aside: ours, not the customer's)."""
    doc: Any = raw
    if isinstance(raw, str):
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):
            return []
    answers = []
    for key, value in list(_dict(doc).items())[: MAX_ITEMS * 3]:
        if key == "flow_token":
            continue
        if isinstance(value, list):
            shown = ", ".join(s for s in (_str(v, 100) for v in value[:MAX_ITEMS]) if s)
        else:
            shown = _str(value)
        name = _str(key, 100)
        if name and shown:
            answers.append((name, shown))
    return answers


def _location(location: dict[str, Any]) -> Reading:
    name, address = _str(location.get("name")), _str(location.get("address"))
    lat = _coordinate(location.get("latitude"), 90)
    lng = _coordinate(location.get("longitude"), 180)
    parts = [p for p in (name, address) if p]
    if lat is not None and lng is not None:
        parts.append(f"({lat:.6g}, {lng:.6g})")
    if not parts:
        return Fallback("a location without coordinates or address")
    return _said("[shared a location] " + ", ".join(parts), " ".join(p for p in (name, address)))


def _coordinate(value: Any, bound: float) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, int | float) and math.isfinite(value) and abs(value) <= bound:
        return float(value)
    return None


def _contacts(contacts: list[Any]) -> Reading:
    shown = []
    for raw in contacts[:MAX_ITEMS]:
        contact = _dict(raw)
        names = _dict(contact.get("name"))
        name = _str(names.get("formatted_name"), 100) or " ".join(
            p for p in (_str(names.get(k), 100) for k in ("first_name", "last_name")) if p
        )
        phones = [
            _str(_dict(p).get("phone"), 40) or _str(_dict(p).get("wa_id"), 40)
            for p in _list(contact.get("phones"))[:MAX_ITEMS]
        ]
        phones = [p for p in phones if p]
        if name or phones:
            shown.append(f"{name or 'no name'}: {', '.join(phones) or 'no phone'}")
    if not shown:
        return Fallback("shared contacts without names or phones")
    more = len(contacts) - MAX_ITEMS
    text = "[shared contacts] " + "; ".join(shown) + (f"; and {more} more" if more > 0 else "")
    return _said(text, "")


def _order(order: dict[str, Any]) -> Reading:
    items = []
    for raw in _list(order.get("product_items"))[:MAX_ITEMS]:
        item = _dict(raw)
        product = _str(item.get("product_retailer_id"), 100)
        if not product:
            continue
        quantity = _str(item.get("quantity"), 20) or "1"
        amount, currency = _str(item.get("item_price"), 20), _str(item.get("currency"), 8)
        price = " ".join(p for p in (amount, currency) if p)
        items.append(f"{quantity} \u00d7 {product}" + (f" at {price} each" if price else ""))
    note = _str(order.get("text"))
    if not items and not note:
        return Fallback("an order without items")
    text = "[sent an order] " + "; ".join(items)
    if note:
        text += f" \u2014 {note}"
    return _said(text, note)


_AUDIO_EXTENSIONS = {
    "audio/ogg": "ogg",
    "audio/opus": "ogg",
    "audio/mpeg": "mp3",
    "audio/mp3": "mp3",
    "audio/mp4": "m4a",
    "audio/m4a": "m4a",
    "audio/x-m4a": "m4a",
    "audio/aac": "aac",
    "audio/amr": "amr",
    "audio/wav": "wav",
    "audio/x-wav": "wav",
    "audio/webm": "webm",
    "audio/flac": "flac",
}


def audio_filename(mime_type: str) -> str:
    """A name whose extension tells a Whisper-compatible server the format (they go by it)."""
    base = mime_type.split(";", 1)[0].strip().lower()
    return f"audio.{_AUDIO_EXTENSIONS.get(base, 'ogg')}"


@dataclass(frozen=True)
class Reader:
    """What a turn uses to read its message. `media`: None without WHATSAPP_ACCESS_TOKEN;
    `transcriber`: None without TRANSCRIPTION_URL (voice notes get the fallback then)."""

    media: MediaSource | None = None
    transcriber: Transcriber | None = None
    max_bytes: int = 16 * 1024 * 1024

    async def understand(
        self, message_type: str, payload: Any, text: str, deadline: Deadline = UNBOUNDED
    ) -> Said | Fallback:
        """The model's user message, or the fallback decision. Raises InboundError when a
        voice note cannot be downloaded or transcribed now."""
        reading = read(message_type, payload, text)
        if not isinstance(reading, Audio):
            return reading
        if self.transcriber is None:
            return Fallback("voice notes are not transcribed (no TRANSCRIPTION_URL)")
        if self.media is None:
            return Fallback("media cannot be downloaded (no WHATSAPP_ACCESS_TOKEN)")
        with tracer.start_as_current_span("agent.transcribe") as span:
            span.set_attribute("wa.media.voice", reading.voice)
            try:
                media = await self.media.download_media(
                    reading.media_id, max_bytes=self.max_bytes, deadline=deadline
                )
            except http.TooLarge as exc:
                # No retry makes it smaller: the customer is told, not left waiting.
                return Fallback(f"audio too large: {exc}")
            except GraphError as exc:
                span.set_status(trace.StatusCode.ERROR, str(exc))
                raise InboundError(
                    f"media {reading.media_id} could not be downloaded: {exc}",
                    error_class="MediaDownloadFailed",
                    retryable=exc.retryable,
                ) from exc
            span.set_attribute("wa.media.bytes", len(media.data))
            try:
                words = await self.transcriber.transcribe(
                    media.data,
                    mime_type=reading.mime_type or media.mime_type,
                    deadline=deadline,
                )
            except InboundError as exc:
                span.set_status(trace.StatusCode.ERROR, str(exc))
                raise
        words = _str(words, TEXT_CHARS)
        if not words:
            return Fallback("the transcript of the audio is empty")
        label = "voice note" if reading.voice else "audio message"
        return _said(f"[{label}, transcribed] {words}", words)
