"""`wa prune [--dry-run]` and `wa forget PHONE|BSUID [--yes]`, over the state service's gRPC API
(README, "Retention and erasure")."""

from __future__ import annotations

import sys

import grpc
import orjson
from wa.v1 import state_pb2, state_pb2_grpc

from cli.settings import CliSettings
from common import grpcserver, wire

from .errors import calling, one_line

# A pass on a large backlog runs many batches; a customer's erasure is one transaction.
PRUNE_TIMEOUT_SECONDS = 600.0
FORGET_TIMEOUT_SECONDS = 60.0
# Refusals the operator can act on (another pass running, a turn in flight, a bad argument):
# said in one line, exit 1.
REFUSED = frozenset(
    {
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
)


def _print_counts(counts: list[state_pb2.TableCount], verb: str, cleared: str = "") -> None:
    width = max((len(c.table_name) for c in counts), default=0)
    for c in counts:
        if c.table_name == "wa_message_tombstones" and verb == "erased":
            continue
        said = cleared if cleared and wire.cleared_count(c.table_name) else verb
        print(f"  {c.table_name:<{width}}  {c.rows:>8} {said}")


async def prune(dry_run: bool, as_json: bool) -> int:
    settings = CliSettings.from_env()
    async with grpcserver.channel(settings.state_addr) as ch:
        try:
            with calling("state", settings.state_addr):
                resp = await state_pb2_grpc.StateStub(ch).Prune(
                    state_pb2.PruneRequest(dry_run=dry_run), timeout=PRUNE_TIMEOUT_SECONDS
                )
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in REFUSED:
                raise
            print(f"wa prune: {one_line(exc.details() or '')}", file=sys.stderr)
            return 1
    counts = {c.table_name: c.rows for c in resp.counts}
    total = sum(n for name, n in counts.items() if not wire.cleared_count(name))
    if as_json:
        data = {
            "dry_run": resp.dry_run,
            "retention_days": resp.retention_days,
            "batches": resp.batches,
            "complete": resp.complete,
            "counts": counts,
            "total": total,
        }
        print(orjson.dumps(data).decode())
        return 0
    if dry_run:
        print(f"dry run: {total} row(s) older than {resp.retention_days} days would be deleted")
    else:
        print(
            f"pruned {total} row(s) older than {resp.retention_days} days "
            f"in {resp.batches} batch(es)"
            + ("" if resp.complete else "; work is left, the next pass goes on")
        )
    _print_counts(
        list(resp.counts),
        "would go" if dry_run else "deleted",
        "would be cleared" if dry_run else "cleared",
    )
    return 0


def confirm_forget(customer: str) -> bool:
    if not sys.stdin.isatty():
        print("refusing to erase without confirmation: pass --yes", file=sys.stderr)
        return False
    answer = input(f"Erase every conversation, message and reply of {customer}, for good? [y/N] ")
    if answer.strip().lower() not in ("y", "yes"):
        print("nothing erased", file=sys.stderr)
        return False
    return True


async def forget(customer: str, as_json: bool) -> int:
    settings = CliSettings.from_env()
    async with grpcserver.channel(settings.state_addr) as ch:
        try:
            with calling("state", settings.state_addr):
                resp = await state_pb2_grpc.StateStub(ch).Forget(
                    state_pb2.ForgetRequest(customer=customer), timeout=FORGET_TIMEOUT_SECONDS
                )
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in REFUSED:
                raise
            print(f"wa forget: {one_line(exc.details() or '')}", file=sys.stderr)
            return 1
    counts = {c.table_name: c.rows for c in resp.counts}
    guards = counts.pop("wa_message_tombstones", 0)
    erased = sum(counts.values())
    if as_json:
        print(orjson.dumps({"erased": counts, "total": erased, "tombstones": guards}).decode())
        return 0
    if not erased:
        print(f"nothing stored for {customer}: nothing erased")
        return 0
    print(f"erased {erased} row(s) of {customer}")
    _print_counts(list(resp.counts), "erased")
    print(
        f"  {guards} message id(s) kept as SHA-256 digests, so that Meta's retries of them "
        "stay duplicates (pruned after RETENTION_DAYS)"
    )
    return 0
