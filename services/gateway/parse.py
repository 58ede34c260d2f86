"""A webhook delivery (`entry[].changes[].value`) as typed events.

Every message and status type Meta sends is kept: the text answered, the others stored and
skipped with a reason. Every element of a `messages` list becomes a stored message: one that
cannot be answered (no id, no sender, a `phone_number_id` that is not a Cloud API id, a
timestamp no clock holds) carries a `skip_reason` and is stored as skipped, never dropped. A
well-formed body of an unexpected shape yields fewer events, never an exception; only a body
that is not a JSON object, or one nested deeper than JSON parsers go (about a thousand levels),
is rejected. A body whose `object` is another product's (Messenger, Instagram: one Meta app
may serve several, with one secret) yields nothing.

Values are made storable one by one, never by editing encoded text: every string (object keys
too) loses its NUL characters (PostgreSQL text cannot hold them) and has its lone surrogates
replaced by U+FFFD (neither UTF-8, protobuf nor PostgreSQL can hold them), numbers JSON
encoders refuse are kept as their decimal text, and nesting is capped.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import orjson

from common.domain import Event, Message, Status

# Lengths kept, so that no value can break an index (PostgreSQL's btree holds about 2.7 kB per
# entry) or be copied at length into every message of a delivery (names, metadata). Meta's ids
# are well under 100 characters, its profile names under 100.
MAX_ID_CHARS = 256
MAX_NAME_CHARS = 256
MAX_TYPE_CHARS = 64
MAX_METADATA_CHARS = 64
# Nesting kept in a stored payload (orjson encodes at most 254 levels; Meta's are under 10).
MAX_DEPTH = 128
DEEPER = "[nested too deep: not kept]"
# 9999-12-31T23:59:59Z: the last second Python's datetime (and so the state service) holds.
MAX_TIMESTAMP = 253_402_300_799
# What orjson encodes; larger integers are kept as their decimal text.
MIN_INT, MAX_INT = -(2**63), 2**64 - 1
# Messages that cannot be answered, and stored under a synthetic id when they have none.
INVALID_ID_PREFIX = "invalid:"
# The `object` of every WhatsApp Business Platform webhook.
BUSINESS_ACCOUNT = "whatsapp_business_account"


class NotADelivery(ValueError):
    """The body is JSON but cannot be a webhook delivery at all."""


@dataclass
class Delivery:
    messages: list[Message] = field(default_factory=list)
    statuses: list[Status] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # Statuses we could not use (no id, unknown status); counted so they are never silent.
    dropped: list[str] = field(default_factory=list)


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _str(value: Any) -> str:
    """The text of a scalar of an already clean document ("" for anything else)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):
        return str(int(value)) if value.is_integer() else str(value)
    return ""


def clean_text(value: str) -> str:
    """`value` as PostgreSQL text and protobuf can hold it: no NUL, and each lone surrogate
    replaced by U+FFFD (a surrogate pair written as two code points becomes its character, as
    a JSON parser reads `\\ud83d\\ude00`)."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return value


def clean(value: Any, depth: int = 0) -> Any:
    """A copy of a JSON value that orjson, protobuf and PostgreSQL all accept."""
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, int):
        return value if MIN_INT <= value <= MAX_INT else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if depth >= MAX_DEPTH:
        return DEEPER
    if isinstance(value, dict):
        return {clean_text(str(k)): clean(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [clean(v, depth + 1) for v in value]
    return clean_text(str(value))


def _encode(obj: Any, option: int = 0) -> bytes:
    try:
        return orjson.dumps(obj, option=option)
    except TypeError:  # nested deeper than orjson encodes (the document was not cleaned)
        return orjson.dumps(clean(obj), option=option)


def _timestamp(value: Any) -> int | None:
    """Seconds since the epoch, when `value` is one WhatsApp could send (a decimal string or
    an integer between 1970 and 9999); None otherwise."""
    seconds: int
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        seconds = value
    elif isinstance(value, float) and value.is_integer():
        seconds = int(value)
    elif isinstance(value, str) and 0 < len(value) <= 12 and value.isascii() and value.isdigit():
        seconds = int(value)
    else:
        return None
    return seconds if 0 < seconds <= MAX_TIMESTAMP else None


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


def _big_number(text: str) -> int | str:
    # The stdlib parser refuses integers of more than 4,300 digits; keep them as text.
    return int(text) if len(text) <= 40 else text


def _finite(text: str) -> float | str:
    number = float(text)
    return number if math.isfinite(number) else text


def _lenient_loads(body: bytes) -> Any:
    """What orjson refuses but a JSON object still is: lone surrogate escapes, numbers out of
    a double's range, raw control characters, invalid UTF-8 (replaced). ValueError otherwise."""
    try:
        return json.loads(
            body.decode("utf-8", "replace"),
            strict=False,
            parse_int=_big_number,
            parse_float=_finite,
            parse_constant=lambda _: None,  # NaN, Infinity: not JSON
        )
    except RecursionError as exc:
        raise ValueError("nested too deep") from exc


def parse(body: bytes) -> Delivery:
    """Raises ValueError for non-JSON and NotADelivery for a non-object."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return parse_obj(_lenient_loads(body))
    # orjson yields valid strings only, and NUL only from a `\u0000` escape: a body without
    # one (nearly all) needs no cleaning.
    return parse_obj(doc, cleaned=b"\\u0000" not in body)


def parse_obj(doc: Any, *, cleaned: bool = False) -> Delivery:
    """`cleaned`: every string of `doc` is already storable (see `clean`)."""
    if not isinstance(doc, dict):
        raise NotADelivery("a delivery is a JSON object")
    if not cleaned:
        doc = clean(doc)
    delivery = Delivery()
    kind = doc.get("object")
    if kind is not None and kind != BUSINESS_ACCOUNT:
        # Meta signs every product's webhooks with the app's secret: a Messenger or Instagram
        # delivery to this URL (one app for several products) is not a WhatsApp customer's,
        # whatever its entries look like, and nothing in it is answered from a business number.
        delivery.dropped.append(f"object {_str(kind)[:MAX_TYPE_CHARS]!r} is not WhatsApp's")
        return delivery
    for entry in _list(doc.get("entry")):
        for change in _list(_dict(entry).get("changes")):
            value = _dict(_dict(change).get("value"))
            if value:
                _parse_value(value, delivery)
                _parse_customer_events(_str(_dict(change).get("field")), value, delivery)
    return delivery


def _phone_number_id(metadata: dict[str, Any]) -> tuple[str, str]:
    """The business number's id and, when it cannot go into a Graph API URL, why."""
    pnid = _str(metadata.get("phone_number_id"))
    if not pnid:
        return "", "delivery without metadata.phone_number_id"
    if not (pnid.isascii() and pnid.isdigit()) or len(pnid) > MAX_METADATA_CHARS:
        return pnid[:MAX_METADATA_CHARS], "phone_number_id is not a Cloud API id (digits only)"
    return pnid, ""


class Customer(NamedTuple):
    """Who wrote: the phone number (`from`), the BSUID (`from_user_id`), either may be "" but
    not both, and what `contacts[]` says about them. (A tuple: built twice per message, at a
    third of a frozen dataclass's cost.)"""

    wa_id: str
    user_id: str
    parent_user_id: str
    name: str = ""
    username: str = ""


def _id(value: Any) -> str:
    return _str(value)[:MAX_ID_CHARS]


def _username(profile: dict[str, Any]) -> str:
    # Meta's examples show "@name"; the name itself has no "@". Kept bare, shown with it.
    return _str(profile.get("username")).strip().lstrip("@")[:MAX_NAME_CHARS]


def _contacts(value: dict[str, Any]) -> dict[str, Customer]:
    """`contacts[]` by phone number and by BSUID (a username customer has no phone number)."""
    known: dict[str, Customer] = {}
    for raw in _list(value.get("contacts")):
        contact = _dict(raw)
        profile = _dict(contact.get("profile"))
        customer = Customer(
            wa_id=_id(contact.get("wa_id")),
            user_id=_id(contact.get("user_id")),
            parent_user_id=_id(contact.get("parent_user_id")),
            name=_str(profile.get("name"))[:MAX_NAME_CHARS],
            username=_username(profile),
        )
        for key in (customer.wa_id, customer.user_id):
            if key:
                known[key] = customer
    return known


def _sender(message: dict[str, Any], contacts: dict[str, Customer]) -> tuple[Customer, str]:
    """The customer and, when there is no usable sender, why."""
    raw_phone, raw_user = _str(message.get("from")), _str(message.get("from_user_id"))
    if not raw_phone and not raw_user:
        return Customer("", "", ""), "message without a sender (from, from_user_id)"
    for raw in (raw_phone, raw_user):
        if len(raw) > MAX_ID_CHARS:
            return (
                Customer(raw_phone[:MAX_ID_CHARS], raw_user[:MAX_ID_CHARS], ""),
                f"sender longer than {MAX_ID_CHARS} characters",
            )
    contact = contacts.get(raw_user) or contacts.get(raw_phone)
    return (
        Customer(
            wa_id=raw_phone or (contact.wa_id if contact else ""),
            user_id=raw_user or (contact.user_id if contact else ""),
            parent_user_id=_id(message.get("from_parent_user_id"))
            or (contact.parent_user_id if contact else ""),
            name=contact.name if contact else "",
            username=contact.username if contact else "",
        ),
        "",
    )


def _message(raw: Any, phone: tuple[str, str], contacts: dict[str, Customer]) -> Message:
    message = raw if isinstance(raw, dict) else {"not_an_object": raw}
    reasons = [] if isinstance(raw, dict) else ["message is not a JSON object"]
    phone_number_id, phone_reason = phone
    if phone_reason:
        reasons.append(phone_reason)
    message_id = _str(message.get("id"))
    if not message_id or len(message_id) > MAX_ID_CHARS:
        reasons.append(
            "message without an id"
            if not message_id
            else f"message id longer than {MAX_ID_CHARS} characters"
        )
        # Deterministic, so Meta's retries of this delivery are still recognised as duplicates.
        canonical = _encode(message, orjson.OPT_SORT_KEYS)
        message_id = INVALID_ID_PREFIX + hashlib.sha256(canonical).hexdigest()
    customer, sender_reason = _sender(message, contacts)
    if sender_reason:
        reasons.append(sender_reason)
    timestamp = _timestamp(message.get("timestamp"))
    if timestamp is None:
        reasons.append("timestamp is not a time in seconds between 1970 and 9999")
    kind = _str(message.get("type"))[:MAX_TYPE_CHARS] or "unknown"
    text = text_of(message)
    if kind == "text" and not text.strip():
        # WhatsApp sends no empty text: there is nothing to answer (the reply would be to "").
        reasons.append("text message without text")
    if message.get("group_id") not in (None, ""):
        # Meta's Groups API: `from` is the member who wrote. Answered like a one-to-one message,
        # the reply would go to that member privately, quoting the group, for every member.
        reasons.append("a message in a WhatsApp group: only one-to-one conversations are answered")
    return Message(
        message_id=message_id,
        phone_number_id=phone_number_id,
        wa_id=customer.wa_id,
        contact_name=customer.name,
        type=kind,
        timestamp=timestamp or 0,
        text=text,
        payload_json=_encode(message).decode(),
        skip_reason="; ".join(reasons),
        user_id=customer.user_id,
        parent_user_id=customer.parent_user_id,
        username=customer.username,
        referral_json=_encode(referral).decode()
        if (referral := _dict(message.get("referral")))
        else "",
    )


def _parse_value(value: dict[str, Any], delivery: Delivery) -> None:
    metadata = _dict(value.get("metadata"))
    phone = _phone_number_id(metadata)
    contacts = _contacts(value)
    for raw in _list(value.get("messages")):
        message = _message(raw, phone, contacts)
        if message.type == "system" and not phone[1]:
            # Whoever Meta names as its sender (the old BSUID, the new one, or nobody when no
            # phone number may be shared), the message belongs to the customer's new BSUID
            # (or, without BSUIDs, to its new number).
            message = _system_event(_dict(raw), message, delivery)
        delivery.messages.append(message)
    for raw in _list(value.get("statuses")):
        status = _dict(raw)
        status_id = _str(status.get("id"))
        kind = _str(status.get("status"))
        if len(status_id) > MAX_ID_CHARS:
            delivery.dropped.append(f"status id longer than {MAX_ID_CHARS} characters")
            continue
        if not status_id or kind not in {"sent", "delivered", "read", "failed"}:
            delivery.dropped.append(f"status without id or with unknown status: {status_id}")
            continue
        error = _dict(next(iter(_list(status.get("errors"))), {}))
        delivery.statuses.append(
            Status(
                message_id=status_id,
                phone_number_id=phone[0],
                recipient_id=_str(status.get("recipient_id"))[:MAX_ID_CHARS],
                status=kind,
                timestamp=_timestamp(status.get("timestamp")) or 0,
                payload_json=_encode(status).decode(),
                error_code=_str(error.get("code"))[:MAX_TYPE_CHARS],
                callback_data=_str(status.get("biz_opaque_callback_data"))[:MAX_ID_CHARS],
                recipient_user_id=_id(status.get("recipient_user_id")),
            )
        )


def _event_id(kind: str, phone_number_id: str, entry: Any) -> str:
    # Deterministic: Meta's retries of a delivery carry the same entry, and are duplicates.
    canonical = _encode([phone_number_id, entry], orjson.OPT_SORT_KEYS)
    return f"{kind}:{hashlib.sha256(canonical).hexdigest()[:40]}"


def _system_event(raw: dict[str, Any], message: Message, delivery: Delivery) -> Message:
    """A `system` message saying the customer's BSUID, or phone number, changed: the event,
    and the message as the customer it now belongs to (unchanged when it says nothing of the
    kind). The messages of its delivery are stored after its events, so under that customer
    the message finds its conversation where the event moved it."""
    system = _dict(raw.get("system"))
    kind = _str(system.get("type"))
    if kind not in {"user_changed_user_id", "user_changed_number"}:
        return message
    current, previous = _id(system.get("user_id")), _id(system.get("previous_user_id"))
    new_phone = old_phone = ""
    if kind == "user_changed_number":
        # `wa_id` since Graph API v12; `new_wa_id` before. The sender is the old number.
        new_phone = _id(system.get("wa_id") or system.get("new_wa_id"))
        old_phone = message.wa_id if message.wa_id != new_phone else ""
    if current and previous:
        # Not under the old number either: stored, the message would give the conversation
        # back the number the change took from it (the ingest keeps the latest one it sees).
        moved = replace(
            message,
            user_id=current,
            wa_id=new_phone,
            parent_user_id=_id(system.get("parent_user_id")),
        )
    elif new_phone and old_phone:
        # No BSUIDs (Meta's shape before them): the number alone is the customer's key.
        current = previous = ""
        moved = replace(message, wa_id=new_phone)
    else:
        return message
    delivery.events.append(
        Event(
            event_id="user_id_update:" + message.message_id,
            phone_number_id=message.phone_number_id,
            kind="user_id_update",
            wa_id=new_phone,
            user_id=current,
            previous_user_id=previous,
            parent_user_id=_id(system.get("parent_user_id")),
            timestamp=message.timestamp,
            payload_json=message.payload_json,
            previous_wa_id=old_phone,
        )
    )
    return moved


def _parse_customer_events(field_name: str, value: dict[str, Any], delivery: Delivery) -> None:
    """`user_id_update` (a BSUID changed) and `user_preferences` (marketing stop / resume)."""
    if field_name not in {"user_id_update", "user_preferences"}:
        return
    phone_number_id, phone_reason = _phone_number_id(_dict(value.get("metadata")))
    for raw in _list(value.get(field_name)):
        entry = _dict(raw)
        timestamp = _timestamp(entry.get("timestamp")) or 0
        if field_name == "user_id_update":
            ids, parents = _dict(entry.get("user_id")), _dict(entry.get("parent_user_id"))
            event = Event(
                event_id=_event_id(field_name, phone_number_id, entry),
                phone_number_id=phone_number_id,
                kind=field_name,
                wa_id=_id(entry.get("wa_id")),
                user_id=_id(ids.get("current")),
                previous_user_id=_id(ids.get("previous")),
                parent_user_id=_id(parents.get("current")),
                timestamp=timestamp,
                payload_json=_encode(entry).decode(),
            )
            usable = bool(event.user_id and event.previous_user_id)
        else:
            event = Event(
                event_id=_event_id(field_name, phone_number_id, entry),
                phone_number_id=phone_number_id,
                kind=field_name,
                wa_id=_id(entry.get("wa_id")),
                user_id=_id(entry.get("user_id")),
                previous_user_id="",
                parent_user_id=_id(entry.get("parent_user_id")),
                timestamp=timestamp,
                payload_json=_encode(entry).decode(),
                preference_category=_str(entry.get("category"))[:MAX_TYPE_CHARS],
                preference_value=_str(entry.get("value"))[:MAX_TYPE_CHARS],
            )
            usable = bool(event.user_id or event.wa_id) and event.preference_value in {
                "stop",
                "resume",
            }
        if phone_reason or not usable:
            delivery.dropped.append(f"{field_name} event not usable: {phone_reason or 'no ids'}")
            continue
        delivery.events.append(event)
