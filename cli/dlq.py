"""`wa dlq list|show|retry|purge`, over the dlq service's gRPC API.

`--json` output is stable: `list` prints a JSON array of items, `show` one item; an item has
id, message_id, conversation_id (also as conversation), wa_id, user_id, username ("@name", or
"" without one), status, attempts, error_class,
error_message, last_error ("class: message"), retryable, correlation_id, created_at,
updated_at, next_attempt_at, deferrals (and, for `show`, payload and history:
[{at, error_class, error_message, deferred}], timeline: [...]; `deferred`: no attempt used).
"""

from __future__ import annotations

import sys
from typing import Any

import grpc
import orjson
from wa.v1 import dlq_pb2, dlq_pb2_grpc, state_pb2, state_pb2_grpc

from cli.settings import CliSettings
from common import grpcserver, wire

from .errors import calling, one_line

FIELDS = (
    "id",
    "message_id",
    "conversation_id",
    "wa_id",
    "user_id",
    "status",
    "attempts",
    "error_class",
    "error_message",
    "retryable",
    "correlation_id",
    "created_at",
    "updated_at",
    "next_attempt_at",
    "deferrals",
)
TIME_FIELDS = ("created_at", "updated_at", "next_attempt_at")
PLAIN_FIELDS = tuple(
    f
    for f in FIELDS
    if f not in {*TIME_FIELDS, "status", "error_class", "error_message", "retryable"}
)


def item_dict(item: dlq_pb2.DlqItem, *, full: bool = False) -> dict[str, Any]:
    """The item as `--json` prints it (times as ISO 8601 text, the status's name)."""
    out: dict[str, Any] = {f: getattr(item, f) for f in PLAIN_FIELDS}
    out["status"] = wire.DLQ_STATUS[item.status]
    out["error_class"] = item.error.error_class
    out["error_message"] = item.error.message
    out["retryable"] = item.error.retryable
    for name in TIME_FIELDS:
        out[name] = wire.iso(item, name)
    out["next_attempt_at"] = out["next_attempt_at"] or None
    out = {f: out[f] for f in FIELDS}
    out["username"] = f"@{item.username}" if item.username else ""
    # The contract's words for two of them, kept alongside.
    out["conversation"] = item.conversation_id
    out["last_error"] = f"{item.error.error_class}: {item.error.message}"
    if full:
        out["payload"] = orjson.loads(item.payload_json) if item.payload_json else None
        out["history"] = [
            {
                "at": wire.iso(h, "at"),
                "error_class": h.error_class,
                "error_message": h.error_message,
                "deferred": h.deferred,
            }
            for h in item.history
        ]
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    cols = (
        "id",
        "status",
        "attempts",
        "message_id",
        "conversation",
        "customer",
        "error",
        "next_attempt",
        "created",
    )
    data = [
        (
            str(r["id"]),
            r["status"],
            str(r["attempts"]),
            r["message_id"],
            str(r["conversation"] or "-"),
            customer(r),
            f"{r['error_class']}: {r['error_message']}"[:60],
            (r["next_attempt_at"] or "-")[:19],
            r["created_at"][:19],
        )
        for r in rows
    ]
    widths = [
        max(len(c), *(len(d[i]) for d in data)) if data else len(c) for i, c in enumerate(cols)
    ]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(d, widths, strict=True)) for d in data]
    return "\n".join(lines)


def customer(item: dict[str, Any]) -> str:
    """How an operator recognises the customer: username, else phone number, else BSUID."""
    return str(item["username"] or item["wa_id"] or item["user_id"] or "-")


async def list_items(status: str, as_json: bool, limit: int, customer: str = "") -> int:
    """`customer`: only that customer's items (phone number, BSUID or username)."""
    settings = CliSettings.from_env()
    async with grpcserver.channel(settings.dlq_addr) as ch:
        with calling("dlq", settings.dlq_addr):
            resp = await dlq_pb2_grpc.DlqStub(ch).List(
                dlq_pb2.ListRequest(
                    status=wire.DLQ_STATUS_NUMBER[status], limit=limit, customer=customer
                ),
                timeout=10,
            )
    rows = [item_dict(i) for i in resp.items]
    if as_json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
    elif rows:
        print(_table(rows))
    else:
        print("no dead-letter items" + (f" with status {status}" if status else ""))
    return 0


async def show(item_id: int, as_json: bool) -> int:
    settings = CliSettings.from_env()
    async with grpcserver.channel(settings.dlq_addr) as ch:
        try:
            with calling("dlq", settings.dlq_addr):
                got = await dlq_pb2_grpc.DlqStub(ch).Get(dlq_pb2.GetRequest(id=item_id), timeout=10)
        except grpc.aio.AioRpcError as exc:  # NOT_FOUND: an unknown id
            print(exc.details(), file=sys.stderr)
            return 1
    item = got.item
    data = item_dict(item, full=True)
    timeline: list[dict[str, Any]] = []
    async with grpcserver.channel(settings.state_addr) as ch:
        try:
            tl = await state_pb2_grpc.StateStub(ch).GetTimeline(
                state_pb2.GetTimelineRequest(message_id=item.message_id, limit=10), timeout=10
            )
            timeline = [
                {
                    "at": wire.iso(t, "at"),
                    "message_id": t.message_id,
                    "entity": t.entity,
                    "from": t.from_state,
                    "to": t.to_state,
                    "reason": t.reason,
                }
                for t in tl.transitions
            ]
        except grpc.aio.AioRpcError as exc:
            timeline = [{"error": f"timeline unavailable: {exc.code().name}"}]
    data["timeline"] = timeline
    if as_json:
        print(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())
        return 0
    print(f"dead-letter item {data['id']}  [{data['status']}]")
    for key in (
        "message_id",
        "username",
        "wa_id",
        "user_id",
        "conversation_id",
        "attempts",
        "retryable",
        "correlation_id",
        "created_at",
        "updated_at",
        "next_attempt_at",
        "deferrals",
    ):
        print(f"  {key:<16} {data[key]}")
    print(f"  {'last error':<16} {data['error_class']}: {data['error_message']}")
    print("  payload:")
    print("    " + orjson.dumps(data["payload"]).decode())
    print("  error history:")
    for h in data["history"]:
        note = "  (deferred, no attempt used)" if h["deferred"] else ""
        print(f"    {h['at'][:19]}  {h['error_class']}: {h['error_message']}{note}")
    print("  conversation timeline (newest first):")
    for t in timeline:
        if "error" in t:
            print(f"    {t['error']}")
            continue
        print(
            f"    {t['at'][:19]}  {t['entity']:<12} {t['message_id'] or '-':<24} "
            f"{t['from'] or '(new)'} -> {t['to']}  {t['reason']}"
        )
    return 0


async def retry(ids: list[int], all_items: bool, status: str, as_json: bool) -> int:
    """One call does a bounded amount of work and returns what it did not reach: those are
    asked for again until none is left (or a call makes no progress)."""
    settings = CliSettings.from_env()
    redriven: list[int] = []
    errors: list[str] = []
    request = dlq_pb2.RetryRequest(ids=ids, all=all_items, status=wire.DLQ_STATUS_NUMBER[status])
    async with grpcserver.channel(settings.dlq_addr) as ch:
        stub = dlq_pb2_grpc.DlqStub(ch)
        while True:
            try:
                with calling("dlq", settings.dlq_addr):
                    resp = await stub.Retry(request, timeout=60)
            except grpc.aio.AioRpcError as exc:  # INVALID_ARGUMENT
                print(exc.details(), file=sys.stderr)
                return 2
            redriven.extend(resp.redriven)
            errors.extend(resp.errors)
            if resp.state_unavailable:
                if as_json:
                    out = {"redriven": redriven, "errors": errors}
                    print(orjson.dumps(out).decode())
                print(
                    f"wa dlq retry: the state service did not answer"
                    f" ({one_line(resp.state_unavailable)}); redriven before that:"
                    f" {', '.join(map(str, redriven)) or 'none'}; none other was (the one"
                    " it did not answer for is pending again, redriven once it answers)",
                    file=sys.stderr,
                )
                return 2
            remaining = list(resp.remaining)
            if not remaining or (not resp.redriven and not resp.errors):
                break
            request = dlq_pb2.RetryRequest(ids=remaining)
    errors.extend(f"{i}: not reached, retry it again" for i in remaining)
    if as_json:
        print(orjson.dumps({"redriven": redriven, "errors": errors}).decode())
    else:
        print(f"redriven: {', '.join(map(str, redriven)) or 'none'}")
        for err in errors:
            print(f"not redriven: {err}")
    return 0 if not errors else 1


def confirm_purge(ids: list[int]) -> bool:
    if not sys.stdin.isatty():
        print("refusing to purge without confirmation: pass --yes", file=sys.stderr)
        return False
    answer = input(f"Purge {len(ids)} item(s) {', '.join(map(str, ids))} for good? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        print("nothing purged", file=sys.stderr)
        return False
    return True


async def purge(ids: list[int]) -> int:
    settings = CliSettings.from_env()
    async with grpcserver.channel(settings.dlq_addr) as ch:
        with calling("dlq", settings.dlq_addr):
            resp = await dlq_pb2_grpc.DlqStub(ch).Purge(dlq_pb2.PurgeRequest(ids=ids), timeout=10)
    asked = len(set(ids))
    if resp.purged < asked:
        # As `wa dlq retry` of an unknown id: said, and exit 1.
        print(f"purged {resp.purged} of {asked} item(s): the others are unknown or purged already")
        return 1
    print(f"purged {resp.purged} item(s)")
    return 0
