"""An inbound text message as the gateway hands it to the state service (common.domain), for
tests and benches that store messages without going through HTTP."""

from __future__ import annotations

import time

from common.domain import Message


def inbound(
    message_id: str,
    wa_id: str = "15550001111",
    *,
    user_id: str = "",
    username: str = "",
    ts: int = 0,
    kind: str = "text",
    text: str = "hi",
    phone_number_id: str = "100",
    contact_name: str = "Ann",
    payload_json: str | None = None,
) -> Message:
    """Message `message_id` from `wa_id` (a phone number; "" for a customer known only by its
    BSUID, `user_id`) to business number `phone_number_id`, sent at `ts` (default: now)."""
    return Message(
        message_id=message_id,
        phone_number_id=phone_number_id,
        wa_id=wa_id,
        contact_name=contact_name,
        type=kind,
        timestamp=ts or int(time.time()),
        text=text,
        payload_json=f'{{"id": "{message_id}"}}' if payload_json is None else payload_json,
        user_id=user_id,
        username=username,
    )
