"""A webhook delivery (`entry[].changes[].value`) as typed events.

Every message and status type Meta sends is kept: the text answered, the others stored and
skipped with a reason. A well-formed body of an unexpected shape yields fewer events, never an
exception; only a body that is not a JSON object is rejected.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson


class NotADelivery(ValueError):
    """The body is JSON but cannot be a webhook delivery at all."""


@dataclass(frozen=True)
class Message:
    message_id: str
    phone_number_id: str
    display_phone_number: str
    wa_id: str
    contact_name: str
    type: str
    timestamp: int
    text: str
    payload_json: str
    context_message_id: str = ""


@dataclass(frozen=True)
class Status:
    message_id: str
    phone_number_id: str
    recipient_id: str
    status: str
    timestamp: int
    payload_json: str
    error_code: str = ""
    error_title: str = ""
    callback_data: str = ""


@dataclass
class Delivery:
    messages: list[Message] = field(default_factory=list)
    statuses: list[Status] = field(default_factory=list)
    # Events we could not use (no id, no sender, ...); counted so they are never silent.
    dropped: list[str] = field(default_factory=list)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: Any) -> str:
    if isinstance(value, str):
        # PostgreSQL text cannot hold NUL; nothing a person typed needs it.
        return value.replace("\x00", "") if "\x00" in value else value
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, int | float):
        return str(int(value)) if float(value).is_integer() else str(value)
    return ""


def _int(value: Any) -> int:
    try:
        return int(_str(value) or 0)
    except ValueError:
        return 0


def _json(obj: dict[str, Any]) -> str:
    # jsonb rejects the \u0000 escape; drop it rather than lose the whole event.
    return orjson.dumps(obj).decode().replace("\\u0000", "")


def text_of(message: dict[str, Any]) -> str:
    """The human-readable content of a message of any type (body, caption, button title...)."""
    kind = _str(message.get("type"))
    body = _dict(message.get(kind))
    if kind == "text":
        return _str(body.get("body"))
    if kind in {"image", "video", "document", "sticker", "audio"}:
        return _str(body.get("caption"))
    if kind == "button":
        return _str(body.get("text"))
    if kind == "interactive":
        for reply_kind in ("button_reply", "list_reply", "nfm_reply"):
            reply = _dict(body.get(reply_kind))
            if reply:
                return _str(reply.get("title")) or _str(reply.get("body"))
        return ""
    if kind == "reaction":
        return _str(body.get("emoji"))
    if kind == "location":
        parts = [_str(body.get("name")), _str(body.get("address"))]
        return ", ".join(p for p in parts if p)
    if kind == "system":
        return _str(body.get("body"))
    return ""


def parse(body: bytes) -> Delivery:
    """Raises ValueError (orjson's) for non-JSON and NotADelivery for a non-object."""
    return parse_obj(orjson.loads(body))


def parse_obj(doc: Any) -> Delivery:
    if not isinstance(doc, dict):
        raise NotADelivery("a delivery is a JSON object")
    delivery = Delivery()
    for entry in _list(doc.get("entry")):
        for change in _list(_dict(entry).get("changes")):
            value = _dict(_dict(change).get("value"))
            if value:
                _parse_value(value, delivery)
    return delivery


def _parse_value(value: dict[str, Any], delivery: Delivery) -> None:
    metadata = _dict(value.get("metadata"))
    phone_number_id = _str(metadata.get("phone_number_id"))
    display = _str(metadata.get("display_phone_number"))
    names = {}
    for contact in _list(value.get("contacts")):
        contact = _dict(contact)
        names[_str(contact.get("wa_id"))] = _str(_dict(contact.get("profile")).get("name"))
    for raw in _list(value.get("messages")):
        message = _dict(raw)
        message_id = _str(message.get("id"))
        sender = _str(message.get("from"))
        if not message_id or not sender or not phone_number_id:
            delivery.dropped.append(f"message without id, sender or phone_number_id: {message_id}")
            continue
        kind = _str(message.get("type")) or "unknown"
        delivery.messages.append(
            Message(
                message_id=message_id,
                phone_number_id=phone_number_id,
                display_phone_number=display,
                wa_id=sender,
                contact_name=names.get(sender, ""),
                type=kind,
                timestamp=_int(message.get("timestamp")),
                text=text_of(message),
                payload_json=_json(message),
                context_message_id=_str(_dict(message.get("context")).get("id")),
            )
        )
    for raw in _list(value.get("statuses")):
        status = _dict(raw)
        status_id = _str(status.get("id"))
        kind = _str(status.get("status"))
        if not status_id or kind not in {"sent", "delivered", "read", "failed"}:
            delivery.dropped.append(f"status without id or with unknown status: {status_id}")
            continue
        error = _dict(next(iter(_list(status.get("errors"))), {}))
        delivery.statuses.append(
            Status(
                message_id=status_id,
                phone_number_id=phone_number_id,
                recipient_id=_str(status.get("recipient_id")),
                status=kind,
                timestamp=_int(status.get("timestamp")),
                payload_json=_json(status),
                error_code=_str(error.get("code")),
                error_title=_str(error.get("title")),
                callback_data=_str(status.get("biz_opaque_callback_data")),
            )
        )
