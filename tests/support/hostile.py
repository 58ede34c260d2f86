"""Hypothesis strategies for what a customer or Meta could send: any text, any JSON value
where the documented shape of a delivery has one."""

from __future__ import annotations

import json
import time
from typing import Any

from hypothesis import strategies as st

# Strings that break naive handling: NUL and its escape typed as text, lone surrogates, a
# tokenizer's special token, digits.
NASTY = ["\x00", "\ud800", "a\udfffb", "\\u0000", "<|endoftext|>", "1700000000", "12345"]


def expected_text(typed: str) -> str:
    """What is kept of `typed` sent as JSON: NUL removed (PostgreSQL text cannot hold it), a
    lone surrogate as U+FFFD (a pair written as two escapes is its character)."""
    read = json.loads(json.dumps(typed))
    return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in read).replace("\x00", "")


# Every kind of JSON value, with what encoders and databases refuse: NUL, lone surrogates,
# integers beyond 64 bits, non-finite floats (read from NaN / 1e400).
hostile_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**63 - 2, max_value=2**64 + 2)
    | st.floats()
    | st.text()
    | st.sampled_from(NASTY),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=10,
)
DOCUMENTED_KEYS = ("id", "from", "timestamp", "type", "text", "image", "interactive", "context")


PHONE_NUMBER_ID = "100000000000001"


@st.composite
def hostile_deliveries(draw: st.DrawFn, answerable: bool = False) -> dict[str, Any]:
    """The documented shape, with any value where Meta puts one. `answerable`: most messages
    are text messages a system can answer (their text still any string)."""

    def message() -> Any:
        if answerable and draw(st.integers(0, 3)) > 0:
            return {
                "from": draw(st.sampled_from(["15550001111", "15550002222", "15550003333"])),
                "id": f"wamid.H{draw(st.uuids()).hex}",
                "timestamp": str(int(time.time()) - draw(st.integers(0, 10**4))),
                "type": "text",
                "text": {"body": draw(st.text() | st.sampled_from(NASTY))},
                **({"context": {"id": draw(hostile_values)}} if draw(st.booleans()) else {}),
            }
        if draw(st.integers(0, 9)) == 0:
            return draw(hostile_values)
        return {k: draw(hostile_values) for k in DOCUMENTED_KEYS if draw(st.booleans())}

    def status() -> Any:
        keys = ("id", "status", "timestamp", "recipient_id", "errors", "biz_opaque_callback_data")
        doc = {k: draw(hostile_values) for k in keys if draw(st.booleans())}
        if draw(st.booleans()):
            doc["status"] = draw(st.sampled_from(["sent", "delivered", "read", "failed"]))
        return doc

    phone = st.just(PHONE_NUMBER_ID) if answerable and draw(st.booleans()) else hostile_values
    value = {
        "messaging_product": "whatsapp",
        "metadata": {
            "display_phone_number": draw(hostile_values),
            "phone_number_id": draw(phone),
        },
        "contacts": [
            {"profile": {"name": draw(hostile_values)}, "wa_id": draw(hostile_values)}
            for _ in range(draw(st.integers(0, 2)))
        ],
        "messages": [message() for _ in range(draw(st.integers(0, 3)))],
        "statuses": [status() for _ in range(draw(st.integers(0, 2)))],
    }
    return {"object": "whatsapp_business_account", "entry": [{"changes": [{"value": value}]}]}
