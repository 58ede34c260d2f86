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
    ts = (base_ts or int(time.time())) + n
    msg = payloads.message(
        "text", wa_id=wa_id(conv), text={"body": text(conv, n)}, timestamp=str(ts)
    )
    return msg["id"], payloads.delivery(messages=[msg])


def replies_per_message(graph: FakeGraph) -> Counter[str]:
    return Counter(r.body.get("context", {}).get("message_id", "") for r in graph.sends)
