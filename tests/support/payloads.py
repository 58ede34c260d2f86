"""Real WhatsApp Cloud API webhook payloads, of every message and status type."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from cli.simulate import envelope, status_entry, text_delivery
from devtools.system import sign

PHONE_NUMBER_ID = "100000000000001"
DISPLAY = "15550009999"

__all__ = ["delivery", "message", "sign", "status", "text_delivery"]


def new_id() -> str:
    return f"wamid.T{uuid.uuid4().hex.upper()}"


def bsuid(seed: str = "") -> str:
    """A business-scoped user id as Meta writes them: country code, ".", alphanumerics."""
    digits = str(int(uuid.uuid5(uuid.NAMESPACE_OID, seed).hex, 16))[:20] if seed else None
    return f"US.{digits or str(uuid.uuid4().int)[:20]}"


def message(
    kind: str, wa_id: str | None = "15550001111", user_id: str = "", **overrides: Any
) -> dict[str, Any]:
    """One message object as Meta delivers it, for any type. `user_id`: the customer's BSUID
    (`from_user_id`); `wa_id=None`: a customer with a username, whose phone number Meta
    withholds (no `from` at all)."""
    base: dict[str, Any] = {
        "id": new_id(),
        "timestamp": str(int(time.time())),
        "type": kind,
    }
    if wa_id is not None:
        base["from"] = wa_id
    if user_id:
        base["from_user_id"] = user_id
    bodies: dict[str, dict[str, Any]] = {
        "text": {"text": {"body": "hello"}},
        "image": {
            "image": {
                "caption": "a photo",
                "mime_type": "image/jpeg",
                "sha256": "abc",
                "id": "media-1",
            }
        },
        "audio": {
            "audio": {
                "mime_type": "audio/ogg; codecs=opus",
                "sha256": "abc",
                "id": "media-2",
                "voice": True,
            }
        },
        "video": {"video": {"mime_type": "video/mp4", "sha256": "abc", "id": "media-3"}},
        "document": {
            "document": {
                "caption": "invoice",
                "filename": "a.pdf",
                "mime_type": "application/pdf",
                "sha256": "abc",
                "id": "media-4",
            }
        },
        "sticker": {
            "sticker": {
                "mime_type": "image/webp",
                "sha256": "abc",
                "id": "media-5",
                "animated": False,
            }
        },
        "location": {
            "location": {
                "latitude": 51.5,
                "longitude": -0.12,
                "name": "Office",
                "address": "1 Main St",
            }
        },
        "contacts": {
            "contacts": [
                {
                    "name": {"formatted_name": "Ann", "first_name": "Ann"},
                    "phones": [{"phone": "+1555", "type": "CELL"}],
                }
            ]
        },
        "reaction": {"reaction": {"message_id": new_id(), "emoji": "\U0001f44d"}},
        "interactive": {
            "interactive": {"type": "button_reply", "button_reply": {"id": "b1", "title": "Yes"}}
        },
        "button": {"button": {"payload": "yes", "text": "Yes"}},
        "order": {
            "order": {
                "catalog_id": "c1",
                "product_items": [
                    {
                        "product_retailer_id": "p1",
                        "quantity": 1,
                        "item_price": 9.5,
                        "currency": "USD",
                    }
                ],
            }
        },
        "system": {
            "system": {
                "body": "changed number",
                "type": "user_changed_number",
                "wa_id": "15550002222",
            }
        },
        "unsupported": {
            "errors": [
                {
                    "code": 131051,
                    "title": "Message type unknown",
                    "message": "Message type unknown",
                    "error_data": {"details": "Message type is not currently supported"},
                }
            ]
        },
        "request_welcome": {},
    }
    base.update(bodies.get(kind, {}))
    base.update(overrides)
    return base


ALL_MESSAGE_TYPES = (
    "text",
    "image",
    "audio",
    "video",
    "document",
    "sticker",
    "location",
    "contacts",
    "reaction",
    "interactive",
    "button",
    "order",
    "system",
    "unsupported",
    "request_welcome",
)


def status(
    outbound_id: str, kind: str, recipient: str = "15550001111", **overrides: Any
) -> dict[str, Any]:
    body = status_entry(outbound_id, kind, recipient_id=recipient)
    if kind == "failed":
        body["errors"] = [{"code": 131047, "title": "Re-engagement message"}]
    body.update(overrides)
    return body


def delivery(
    messages: list[dict[str, Any]] | None = None,
    statuses: list[dict[str, Any]] | None = None,
    name: str = "Test Customer",
    usernames: dict[str, str] | None = None,
) -> dict[str, Any]:
    """`usernames`: BSUID -> username, for `contacts[].profile.username`."""
    value: dict[str, Any] = {}
    if messages:
        contacts = []
        for wa, user in dict.fromkeys((m.get("from"), m.get("from_user_id")) for m in messages):
            contact: dict[str, Any] = {"profile": {"name": name}}
            if wa is not None:
                contact["wa_id"] = wa
            if user:
                contact["user_id"] = user
                if usernames and user in usernames:
                    contact["profile"]["username"] = usernames[user]
            contacts.append(contact)
        value["contacts"] = contacts
        value["messages"] = messages
    if statuses:
        value["statuses"] = statuses
    return envelope(PHONE_NUMBER_ID, DISPLAY, **value)


# What a customer sends by tapping and sharing, in the shapes Meta documents
# (https://developers.facebook.com/docs/whatsapp/cloud-api/webhooks/payload-examples).


def button_reply(button_id: str, title: str, **kw: Any) -> dict[str, Any]:
    """A tap on a reply button of an interactive message."""
    return message(
        "interactive",
        interactive={"type": "button_reply", "button_reply": {"id": button_id, "title": title}},
        **kw,
    )


def list_reply(row_id: str, title: str, description: str = "", **kw: Any) -> dict[str, Any]:
    """A row picked from a list message."""
    row = {"id": row_id, "title": title}
    if description:
        row["description"] = description
    return message("interactive", interactive={"type": "list_reply", "list_reply": row}, **kw)


def quick_reply(payload: str, text: str, **kw: Any) -> dict[str, Any]:
    """A tap on a template's quick-reply button (type `button`, quoting the template)."""
    return message(
        "button",
        button={"payload": payload, "text": text},
        context={"from": DISPLAY, "id": new_id()},
        **kw,
    )


def flow_reply(response: dict[str, Any], name: str = "flow", **kw: Any) -> dict[str, Any]:
    """A completed WhatsApp Flow: its answers as a JSON string in `response_json`."""
    return message(
        "interactive",
        interactive={
            "type": "nfm_reply",
            "nfm_reply": {"name": name, "body": "Sent", "response_json": json.dumps(response)},
        },
        context={"from": DISPLAY, "id": new_id()},
        **kw,
    )


def voice_note(media_id: str, **kw: Any) -> dict[str, Any]:
    return message(
        "audio",
        audio={
            "mime_type": "audio/ogg; codecs=opus",
            "sha256": "abc",
            "id": media_id,
            "voice": True,
        },
        **kw,
    )
