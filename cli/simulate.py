"""`wa simulate`: a correctly signed sample delivery to the gateway, and what became of it."""

from __future__ import annotations

import asyncio
import hashlib
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson
from dotenv import dotenv_values
from wa.v1 import state_pb2, state_pb2_grpc

from cli import errors
from cli.settings import CliSettings
from common import grpcserver, wire
from services.gateway import signature

# The checkout's root, where .env.example lives.
ROOT = Path(__file__).resolve().parent.parent


def username_bsuid(username: str) -> str:
    """The business-scoped user id `wa simulate` gives a username customer: the same for the
    same username, so that its simulated messages make one conversation."""
    digits = int(hashlib.sha256(username.lstrip("@").lower().encode()).hexdigest(), 16)
    return f"US.{str(digits)[:20]}"


def text_delivery(
    text: str,
    *,
    wa_id: str | None = "15550001111",
    name: str = "Test Customer",
    phone_number_id: str = "100000000000001",
    display_phone_number: str = "15550009999",
    message_id: str | None = None,
    timestamp: int | None = None,
    user_id: str = "",
    username: str = "",
) -> dict[str, Any]:
    """A delivery exactly as Meta sends one text message. `wa_id=None`: a customer with a
    username, whose phone number Meta withholds: only its BSUID (`user_id`) names it."""
    contact: dict[str, Any] = {"profile": {"name": name}}
    message: dict[str, Any] = {
        "id": message_id or f"wamid.SIM{uuid.uuid4().hex.upper()}",
        "timestamp": str(timestamp or int(time.time())),
        "type": "text",
        "text": {"body": text},
    }
    if wa_id is not None:
        contact["wa_id"] = message["from"] = wa_id
    if user_id:
        contact["user_id"] = message["from_user_id"] = user_id
    if username:
        contact["profile"]["username"] = "@" + username.lstrip("@")
    return envelope(phone_number_id, display_phone_number, contacts=[contact], messages=[message])


def status_entry(
    message_id: str,
    status: str,
    *,
    recipient_id: str = "",
    recipient_user_id: str = "",
    callback_data: str = "",
    timestamp: int | None = None,
) -> dict[str, Any]:
    """One status (`sent`, `delivered`, `read`, `failed`) of a message the business sent, as
    Meta writes it: `recipient_id` names a phone number, `recipient_user_id` a BSUID; `sent`
    and `delivered` carry the conversation and pricing; `callback_data` is the send's
    `biz_opaque_callback_data`, which Meta repeats in each of its statuses."""
    entry: dict[str, Any] = {
        "id": message_id,
        "status": status,
        "timestamp": str(timestamp or int(time.time())),
    }
    if recipient_id:
        entry["recipient_id"] = recipient_id
    if recipient_user_id:
        entry["recipient_user_id"] = recipient_user_id
    if callback_data:
        entry["biz_opaque_callback_data"] = callback_data
    if status in ("sent", "delivered"):
        entry["conversation"] = {
            "id": hashlib.sha256((recipient_id or recipient_user_id).encode()).hexdigest()[:32],
            "origin": {"type": "service"},
        }
        entry["pricing"] = {"billable": True, "pricing_model": "PMP", "category": "service"}
    return entry


def status_delivery(
    entry: dict[str, Any],
    *,
    phone_number_id: str = "100000000000001",
    display_phone_number: str = "15550009999",
) -> dict[str, Any]:
    """A delivery exactly as Meta sends one status (a `status_entry`)."""
    return envelope(phone_number_id, display_phone_number, statuses=[entry])


def envelope(phone_number_id: str, display_phone_number: str, **value: Any) -> dict[str, Any]:
    """The envelope of every delivery: one change of field `messages` holding `value`'s lists
    (`contacts`, `messages`, `statuses`)."""
    metadata = {"display_phone_number": display_phone_number, "phone_number_id": phone_number_id}
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": "200000000000002",
                "changes": [
                    {
                        "field": "messages",
                        "value": {"messaging_product": "whatsapp", "metadata": metadata, **value},
                    }
                ],
            }
        ],
    }


def app_secret(settings: CliSettings) -> str:
    if settings.app_secrets():
        # During a rotation: the first of the two (README, Security: the new one first).
        return settings.app_secrets()[0]
    return str(dotenv_values(ROOT / ".env.example").get("WHATSAPP_APP_SECRET") or "")


async def simulate(text: str, wa_id: str, url: str, wait: float, username: str = "") -> int:
    """`username`: send as a customer with a WhatsApp username (no phone number, a BSUID)."""
    settings = CliSettings.from_env()
    if username:
        delivery = text_delivery(
            text, wa_id=None, user_id=username_bsuid(username), username=username
        )
        wa_id = "@" + username.lstrip("@")
    else:
        delivery = text_delivery(text, wa_id=wa_id)
    message_id = delivery["entry"][0]["changes"][0]["value"]["messages"][0]["id"]
    body = orjson.dumps(delivery)
    headers = {
        "Content-Type": "application/json",
        "X-Hub-Signature-256": signature.sign(body, app_secret(settings)),
    }
    target = url or f"http://127.0.0.1:{settings.gateway_port}/webhook"
    async with httpx.AsyncClient(timeout=10) as client:
        try:
            resp = await client.post(target, content=body, headers=headers)
        except httpx.HTTPError as exc:
            print(f"wa simulate: cannot reach the gateway at {target}: {exc!r}", file=sys.stderr)
            return 2
    if resp.status_code == 503:
        # The gateway is up, and what it stores deliveries through is down or overloaded
        # (its body says which; Meta would retry).
        print(
            f"wa simulate: the gateway at {target} cannot store the delivery now (503:"
            f" {errors.one_line(resp.text)})",
            file=sys.stderr,
        )
        return 2
    print(f"POST {target} -> {resp.status_code} {resp.text}")
    if resp.status_code != 200:
        return 1
    print(f"message {message_id} from {wa_id}: {text!r}")
    if wait <= 0:
        return 0
    async with grpcserver.channel(settings.state_addr) as ch:
        stub = state_pb2_grpc.StateStub(ch)
        deadline = time.monotonic() + wait
        last = ""
        while time.monotonic() < deadline:
            try:
                tl = await stub.GetTimeline(
                    state_pb2.GetTimelineRequest(message_id=message_id, limit=5), timeout=3
                )
            except Exception as exc:  # the state service may be restarting
                last = str(exc)
                await asyncio.sleep(0.3)
                continue
            mine = next((m for m in tl.messages if m.message_id == message_id), None)
            status = wire.MESSAGE_STATUS[mine.status] if mine is not None else ""
            if mine is not None and status != last:
                last = status
                print(
                    f"  status: {status}"
                    + (f" ({mine.status_reason})" if mine.status_reason else "")
                )
            if mine is not None and status in ("replied", "skipped", "dead_lettered"):
                if mine.reply_text:
                    print(f"  reply: {mine.reply_text}")
                print(f"  correlation id: {mine.correlation_id}")
                return 0 if status != "dead_lettered" else 1
            await asyncio.sleep(0.2)
    print(f"  still {last or 'unknown'} after {wait:.0f}s")
    return 1
