"""Helpers for tests that run many conversations: tagged texts, a model that knows which
conversation a request belongs to, and per-message reply counts at the fake Graph API."""

from __future__ import annotations

import re
import time
from collections import Counter
from typing import Any

from . import payloads
from .fakes import FakeGraph, FakeModel

TAG = re.compile(r"\bc(\d+)-m(\d+)\b")


def text(conv: int, n: int) -> str:
    return f"c{conv:03d}-m{n} please help"


def wa_id(conv: int) -> str:
    return f"1555{conv:07d}"


def sender(conv: int) -> tuple[str | None, str]:
    """Who writes in conversation `conv` (phone number, BSUID), as Meta names customers since
    BSUIDs: a third by phone number only (before BSUIDs), a third by phone number and BSUID,
    and a third by BSUID only (customers with a username, whose number Meta withholds)."""
    user_id = payloads.bsuid(f"customer-{conv}")
    return [(wa_id(conv), ""), (None, user_id), (wa_id(conv), user_id)][conv % 3]


def recipient(send: dict[str, Any]) -> str:
    """Who a reply went to: the phone number, or the BSUID when there is none."""
    return str(send.get("to") or send.get("recipient") or "")


def message(conv: int, n: int, ts: int) -> dict[str, Any]:
    phone, user_id = sender(conv)
    return payloads.message(
        "text", wa_id=phone, user_id=user_id, text={"body": text(conv, n)}, timestamp=str(ts)
    )


def conversation_key(body: dict[str, Any]) -> str:
    users = [m["content"] for m in body.get("messages", []) if m.get("role") == "user"]
    match = TAG.search(users[-1]) if users else None
    return f"c{match.group(1)}" if match else ""


def model_for_conversations() -> FakeModel:
    return FakeModel(key=conversation_key)


def seen_by_model(model: FakeModel) -> dict[str, list[int]]:
    """For each conversation, the message numbers in the order the model was asked about them."""
    out: dict[str, list[int]] = {}
    with model.lock:
        requests = list(model.requests)
    for r in requests:
        users = [m["content"] for m in r.body.get("messages", []) if m.get("role") == "user"]
        match = TAG.search(users[-1]) if users else None
        if match:
            out.setdefault(f"c{match.group(1)}", []).append(int(match.group(2)))
    return out


def message_doc(conv: int, n: int, base_ts: int | None = None) -> tuple[str, dict[str, Any]]:
    msg = message(conv, n, (base_ts or int(time.time())) + n)
    return msg["id"], payloads.delivery(messages=[msg])


def replies_per_message(graph: FakeGraph) -> Counter[str]:
    return Counter(r.body.get("context", {}).get("message_id", "") for r in graph.sends)
