"""`wa trace MESSAGE_ID|PHONE|BSUID`: a message's timeline and its trace id."""

from __future__ import annotations

import sys
from typing import Any

import grpc
import orjson
from wa.v1 import dlq_pb2, dlq_pb2_grpc, state_pb2, state_pb2_grpc

from cli.settings import CliSettings
from common import grpcserver, wire

from .errors import calling

# Audited events of the conversation rather than of one message (README, "Human handoff").
CONVERSATION_EVENTS = frozenset({"handoff", "operator"})


def is_message_id(target: str) -> bool:
    """WhatsApp message ids (and ours for messages stored without one) by their prefix; other
    message ids are told from customers only by asking (`lookups`)."""
    return target.startswith(("wamid.", "invalid:"))


def is_phone_number(target: str) -> bool:
    return target.lstrip("+").isdigit()


def customer_key(target: str) -> str:
    return target.lstrip("+") if is_phone_number(target) else target


def lookups(target: str) -> list[state_pb2.GetTimelineRequest]:
    """What `target` may name, in the order to ask: a message id by its prefix, a phone number
    by its digits; anything else a customer (a business-scoped user id or a username) and, if
    no customer, a message whose id Meta did not prefix."""
    as_message = state_pb2.GetTimelineRequest(message_id=target, limit=20)
    as_customer = state_pb2.GetTimelineRequest(wa_id=customer_key(target), limit=20)
    if is_message_id(target):
        return [as_message]
    if is_phone_number(target):
        return [as_customer]
    return [as_customer, as_message]


async def trace(target: str, as_json: bool) -> int:
    settings = CliSettings.from_env()
    candidates = lookups(target)
    async with grpcserver.channel(settings.state_addr) as ch:
        for request in candidates:
            try:
                with calling("state", settings.state_addr):
                    tl = await state_pb2_grpc.StateStub(ch).GetTimeline(request, timeout=10)
                break
            except grpc.aio.AioRpcError as exc:  # NOT_FOUND: no such message or customer
                if exc.code() != grpc.StatusCode.NOT_FOUND or request is candidates[-1]:
                    print(f"{target}: {exc.details()}", file=sys.stderr)
                    return 1
    messages = [
        {
            "message_id": m.message_id,
            "type": m.type,
            "status": wire.MESSAGE_STATUS[m.status],
            "reason": m.status_reason,
            "text": m.text,
            "reply_text": m.reply_text,
            "reply_message_id": m.reply_message_id,
            "reply_status": m.reply_status,
            "correlation_id": m.correlation_id,
            "trace_id": m.trace_id,
            "received_at": wire.iso(m, "received_at"),
            "attempts": m.attempts,
            "reply_error_code": m.reply_error_code,
            "reply_parts": m.reply_parts,
            "reply_parts_failed": m.reply_parts_failed,
        }
        for m in tl.messages
    ]
    focus = [m for m in messages if m["message_id"] == target] or messages[:1]
    ids = {m["message_id"] for m in focus}
    dlq = await _dlq_attempts(settings, ids)
    transitions = [
        {
            "at": wire.iso(t, "at"),
            "message_id": t.message_id,
            "entity": t.entity,
            "from": t.from_state,
            "to": t.to_state,
            "reason": t.reason,
            "correlation_id": t.correlation_id,
        }
        for t in reversed(tl.transitions)
        if t.message_id in ids
        or (t.entity == "conversation" and not t.message_id)
        or t.entity in CONVERSATION_EVENTS
    ]
    customer = {
        "wa_id": tl.wa_id,
        "user_id": tl.user_id,
        "username": f"@{tl.username}" if tl.username else "",
        "name": tl.contact_name,
    }
    if as_json:
        print(
            orjson.dumps(
                {"customer": customer, "messages": focus, "transitions": transitions, "dlq": dlq},
                option=orjson.OPT_INDENT_2,
            ).decode()
        )
        return 0
    print(
        "customer "
        + " ".join(v for v in (customer["username"], customer["name"]) if v)
        + f" (phone {tl.wa_id or 'not shared'}, BSUID {tl.user_id or '-'})"
    )
    for m in focus:
        print(f"message {m['message_id']} ({m['type']}) [{m['status']}]")
        print(f"  trace id        {m['trace_id'] or '-'}")
        print(f"  correlation id  {m['correlation_id']}")
        print(f"  received        {m['received_at'][:23]}   attempts {m['attempts']}")
        print(f"  text            {m['text']!r}")
        if m["reply_text"]:
            print(f"  reply           {m['reply_text']!r}")
            print(f"  delivery        {_delivery(m)} {m['reply_message_id']}")
            if m["reply_parts"] > 1:
                failed = m["reply_parts_failed"]
                print(
                    f"  sent as         {m['reply_parts']} messages (too long for one)"
                    + (f", {failed} of them not delivered" if failed else "")
                )
    print("timeline:")
    for t in transitions:
        if t["entity"] in CONVERSATION_EVENTS:
            # Handed off / released, an operator's reply: the conversation's, shown with who.
            print(f"  {t['at'][:23]}  {t['entity']}: {t['to']}  {t['reason']}")
        elif t["message_id"] in ids:
            print(f"  {t['at'][:23]}  {t['from'] or '(new)'} -> {t['to']}  {t['reason']}")
    for item in dlq:
        print(f"dead-letter item {item['id']} [{item['status']}]")
        for a in item["attempts"]:
            print(f"  {a['at'][:23]}  {a['error_class']}: {a['error_message']}")
    return 0


def _delivery(m: dict[str, Any]) -> str:
    """The reply's delivery state; `failed` (Meta could not deliver it) with its error code."""
    status = m["reply_status"] or "not sent"
    if m["reply_error_code"] and status in ("failed", "not sent"):
        return f"{status} (error {m['reply_error_code']})"
    return status


async def _dlq_attempts(settings: CliSettings, ids: set[str]) -> list[dict[str, Any]]:
    """The message's dead-letter items and their attempts (empty when it never failed)."""
    out: list[dict[str, Any]] = []
    async with grpcserver.channel(settings.dlq_addr) as ch:
        for message_id in sorted(ids):
            try:
                listed = await dlq_pb2_grpc.DlqStub(ch).List(
                    dlq_pb2.ListRequest(message_id=message_id), timeout=10
                )
            except grpc.aio.AioRpcError:
                continue
            out.extend(
                {
                    "id": item.id,
                    "message_id": item.message_id,
                    "status": wire.DLQ_STATUS[item.status],
                    "attempts": [
                        {
                            "at": wire.iso(h, "at"),
                            "error_class": h.error_class,
                            "error_message": h.error_message,
                        }
                        for h in item.history
                    ],
                }
                for item in listed.items
            )
    return out
