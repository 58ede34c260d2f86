"""`wa handoff list|take|release` and `wa reply`: conversations waiting for a person, taking
one over from the bot or giving it back, and answering a customer as an operator (README,
"Human handoff").

`wa handoff list --json` prints a JSON array: per conversation conversation_id,
phone_number_id, customer (username "@name", else phone number, else BSUID), wa_id, user_id,
username, name, since, handoff_message_id, waiting_count and waiting: [{message_id, type,
text, received_at, status, reason}] (at most 20, oldest first).
"""

from __future__ import annotations

import asyncio
import getpass
import random
import sys
import uuid
from typing import Any

import grpc
import orjson
from wa.v1 import agent_pb2, agent_pb2_grpc, state_pb2, state_pb2_grpc

from cli.settings import CliSettings
from common import customers, grpcserver, wire

from .errors import ServiceDown, calling, one_line

# Answers the operator can act on: said in one line, exit 1.
REFUSED = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.ABORTED,
    }
)
REPLY_TIMEOUT_SECONDS = 30.0
# A reply whose call found no agent (or no answer in time) is asked again with the same
# idempotency key: it is sent once whatever happened to the first call.
REPLY_ATTEMPTS = 3


def operator() -> str:
    """Who acts, for the audit: the user running the command."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def _customer_of(h: state_pb2.Handoff) -> str:
    return f"@{h.username}" if h.username else h.wa_id or h.user_id or "-"


def handoff_dict(h: state_pb2.Handoff) -> dict[str, Any]:
    return {
        "conversation_id": h.conversation_id,
        "phone_number_id": h.phone_number_id,
        "customer": _customer_of(h),
        "wa_id": h.wa_id,
        "user_id": h.user_id,
        "username": f"@{h.username}" if h.username else "",
        "name": h.contact_name,
        "since": wire.iso(h, "since"),
        "handoff_message_id": h.handoff_message_id,
        "waiting_count": h.waiting_count,
        "waiting": [
            {
                "message_id": m.message_id,
                "type": m.type,
                "text": m.text,
                "received_at": wire.iso(m, "received_at"),
                "status": wire.MESSAGE_STATUS[m.status],
                "reason": m.status_reason,
            }
            for m in h.waiting
        ],
    }


async def list_handoffs(phone_number_id: str, as_json: bool) -> int:
    settings = CliSettings.from_env()
    async with grpcserver.channel(settings.state_addr) as ch:
        with calling("state", settings.state_addr):
            resp = await state_pb2_grpc.StateStub(ch).ListHandoffs(
                state_pb2.ListHandoffsRequest(phone_number_id=phone_number_id), timeout=10
            )
    rows = [handoff_dict(h) for h in resp.handoffs]
    if as_json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0
    if not rows:
        print("no conversation is waiting for a person")
        return 0
    for r in rows:
        name = f" {r['name']}" if r["name"] else ""
        print(
            f"{r['customer']}{name}  (business number {r['phone_number_id']}, "
            f"BSUID {r['user_id'] or '-'})  waiting for a person since {r['since'][:19]}  "
            f"{r['waiting_count']} message(s)"
        )
        for m in r["waiting"]:
            text = m["text"] or f"({m['type']})"
            print(f"  {m['received_at'][:19]}  {m['message_id']}  {text!r}")
        if r["waiting_count"] > len(r["waiting"]):
            print(f"  ... and {r['waiting_count'] - len(r['waiting'])} more")
    return 0


def _refused(what: str, exc: grpc.aio.AioRpcError) -> int:
    print(f"{what}: {one_line(exc.details() or exc.code().name)}", file=sys.stderr)
    return 1


async def release(customer: str, phone_number_id: str) -> int:
    settings = CliSettings.from_env()
    request = state_pb2.ReleaseHandoffRequest(
        customer=customers.key(customer), phone_number_id=phone_number_id, operator=operator()
    )
    async with grpcserver.channel(settings.state_addr) as ch:
        try:
            with calling("state", settings.state_addr):
                resp = await state_pb2_grpc.StateStub(ch).ReleaseHandoff(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in REFUSED:
                raise
            return _refused(f"wa handoff release {customer}", exc)
    print(
        f"released: the bot answers {customer} again (business number "
        f"{resp.phone_number_id}; waiting for a person since {wire.iso(resp, 'since')[:19]})"
    )
    return 0


async def take_over(customer: str, phone_number_id: str) -> int:
    settings = CliSettings.from_env()
    request = state_pb2.TakeOverRequest(
        customer=customers.key(customer), phone_number_id=phone_number_id, operator=operator()
    )
    async with grpcserver.channel(settings.state_addr) as ch:
        try:
            with calling("state", settings.state_addr):
                resp = await state_pb2_grpc.StateStub(ch).TakeOver(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in REFUSED:
                raise
            return _refused(f"wa handoff take {customer}", exc)
    since = wire.iso(resp, "since")[:19]
    if resp.already:
        print(f"{customer} was already waiting for a person (since {since})")
    else:
        print(f"taken over: the bot no longer answers {customer} until `wa handoff release`")
    return 0


async def reply(customer: str, text: str, phone_number_id: str, idempotency_key: str) -> int:
    settings = CliSettings.from_env()
    request = agent_pb2.SendOperatorReplyRequest(
        customer=customers.key(customer),
        phone_number_id=phone_number_id,
        text=text,
        idempotency_key=idempotency_key or f"cli:{uuid.uuid4()}",
        operator=operator(),
    )
    async with grpcserver.channel(settings.agent_addr) as ch:
        stub = agent_pb2_grpc.AgentStub(ch)
        attempt = 0
        while True:
            attempt += 1
            try:
                with calling("agent", settings.agent_addr):
                    resp = await stub.SendOperatorReply(request, timeout=REPLY_TIMEOUT_SECONDS)
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() in REFUSED:
                    return _refused(f"wa reply {customer}", exc)
                raise
            except ServiceDown:
                if attempt >= REPLY_ATTEMPTS:
                    raise
                await asyncio.sleep(random.uniform(0, 0.5 * 2**attempt))
    if resp.duplicate:
        print(f"already sent by an earlier request with this key, as {resp.reply_message_id}")
    elif resp.reply_message_id:
        print(f"sent to {customer} as {resp.reply_message_id}")
    else:
        print(f"recorded for {customer}, not sent (no WHATSAPP_ACCESS_TOKEN)")
    return 0
