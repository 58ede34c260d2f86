"""The `wa` command."""

from __future__ import annotations

import argparse
import asyncio
import os
import select
import sys

from common import config
from common.domain import STATS_MAX_HOURS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wa", description="Operate the WhatsApp agent system.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("run", help="start everything in the foreground (what `make run` does)")
    mig = sub.add_parser("migrate", help="apply database migrations")
    mig.add_argument("--check", action="store_true", help="exit 1 if migrations are pending")

    sim = sub.add_parser("simulate", help="send a correctly signed sample text message")
    sim.add_argument("text")
    who = sim.add_mutually_exclusive_group()
    who.add_argument("--from", dest="wa_id", default="15550001111", help="sender's phone number")
    who.add_argument(
        "--username",
        default="",
        help="send as a customer with this WhatsApp username: no phone number, only a BSUID",
    )
    sim.add_argument("--url", default="", help="gateway webhook URL")
    sim.add_argument("--wait", type=float, default=10.0, help="seconds to wait for the outcome")

    dlq = sub.add_parser("dlq", help="the dead-letter queue")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True)
    ls = dsub.add_parser("list", help="list items")
    ls.add_argument(
        "--status", default="", choices=["", "pending", "retrying", "dead", "resolved", "purged"]
    )
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--limit", type=int, default=100)
    ls.add_argument(
        "--customer", default="", help="only this customer's: phone number, BSUID or @username"
    )
    show = dsub.add_parser("show", help="one item with its payload and error history")
    show.add_argument("id", type=int)
    show.add_argument("--json", action="store_true")
    rt = dsub.add_parser("retry", help="redrive items now (dead ones too)")
    rt.add_argument("ids", type=int, nargs="*")
    rt.add_argument("--all", action="store_true")
    rt.add_argument("--status", default="", choices=["", "pending", "retrying", "dead"])
    rt.add_argument("--json", action="store_true")
    pg = dsub.add_parser("purge", help="drop items for good")
    pg.add_argument("ids", type=int, nargs="+")
    pg.add_argument("--yes", action="store_true")

    health = sub.add_parser(
        "health", help="the system's health: exit 0 healthy, 1 degraded, 2 down"
    )
    health.add_argument("--json", action="store_true")

    st = sub.add_parser("stats", help="processing metrics: counts, avg, p95, p99")
    st.add_argument(
        "--hours", type=_hours, default=1.0, help=f"the last N hours (up to {STATS_MAX_HOURS})"
    )
    st.add_argument("--json", action="store_true")

    tr = sub.add_parser("trace", help="a message's timeline and trace id")
    tr.add_argument("target", help="WhatsApp message id, or a customer's phone, BSUID or @username")
    tr.add_argument("--json", action="store_true")

    certs = sub.add_parser("certs", help="certificates of internal mutual TLS")
    csub = certs.add_subparsers(dest="certs_command", required=True)
    cc = csub.add_parser(
        "create",
        help="make the CA and each identity's certificate, keeping what is there and usable",
    )
    cc.add_argument("--dir", default="", help="where (default GRPC_TLS_DIR, or RUN_DIR/tls)")
    cc.add_argument(
        "--hosts",
        nargs="*",
        default=[],
        help="extra DNS names or IPs of every certificate, `{id}` standing for the identity "
        "(e.g. '{id}.wa.svc' '*.{id}.wa.svc.cluster.local')",
    )
    ho = sub.add_parser("handoff", help="conversations handed off to a person")
    hsub = ho.add_subparsers(dest="handoff_command", required=True)
    hl = hsub.add_parser("list", help="conversations waiting for a person, and their messages")
    hl.add_argument("--number", default="", help="only this business number's (PHONE_NUMBER_ID)")
    hl.add_argument("--json", action="store_true")
    hr = hsub.add_parser("release", help="give a conversation back to the bot")
    hr.add_argument("customer", help="the customer's phone number or BSUID")
    hr.add_argument("--number", default="", help="the business number (PHONE_NUMBER_ID)")
    ht = hsub.add_parser("take", help="take a conversation over from the bot")
    ht.add_argument("customer", help="the customer's phone number or BSUID")
    ht.add_argument("--number", default="", help="the business number (PHONE_NUMBER_ID)")
    rp = sub.add_parser("reply", help="answer a customer as an operator (sent once)")
    rp.add_argument("customer", help="the customer's phone number or BSUID")
    rp.add_argument("text")
    rp.add_argument("--number", default="", help="the business number (PHONE_NUMBER_ID)")
    rp.add_argument(
        "--idempotency-key",
        default="",
        help="repeat an earlier invocation safely: the same key never sends twice "
        "(default: a new key per invocation)",
    )
    pr = sub.add_parser("prune", help="prune what RETENTION_DAYS allows now")
    pr.add_argument("--dry-run", action="store_true", help="count, delete nothing")
    pr.add_argument("--json", action="store_true")
    fg = sub.add_parser("forget", help="erase one customer's data everywhere")
    fg.add_argument("customer", help="the customer's phone number or BSUID")
    fg.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    fg.add_argument("--json", action="store_true")
    op = sub.add_parser("operator", help="people who may log in to the console")
    osub = op.add_subparsers(dest="operator_command", required=True)
    oa = osub.add_parser("add", help="add an operator, or change its role, password and numbers")
    oa.add_argument("name")
    oa.add_argument("--role", required=True, choices=["admin", "viewer"])
    oa.add_argument(
        "--numbers",
        default="",
        help="comma-separated business phone number ids it may see (default: all)",
    )
    oa.add_argument(
        "--password-stdin", action="store_true", help="read the password from stdin's first line"
    )
    ol = osub.add_parser("list", help="every operator, its role and numbers")
    ol.add_argument("--json", action="store_true")
    orm = osub.add_parser("remove", help="remove an operator and end its sessions")
    orm.add_argument("name")
    return p


# Commands that call the services: they present the operator's certificate.
GRPC_COMMANDS = frozenset(
    {"simulate", "dlq", "health", "stats", "trace", "prune", "forget", "handoff", "reply"}
)


def _hours(text: str) -> float:
    """--hours: more than 0, at most 90 days (what the state service answers for)."""
    try:
        hours = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of hours: {text!r}") from None
    if not 0 < hours <= STATS_MAX_HOURS:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {STATS_MAX_HOURS}")
    return hours


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sub_command = getattr(args, "dlq_command", None) or getattr(args, "handoff_command", None)
    command = " ".join(part for part in (args.command, sub_command) if part)
    try:
        if args.command in GRPC_COMMANDS:
            from common import tls

            from .settings import CliSettings

            tls.configure(CliSettings.from_env(), "operator")
        return _dispatch(args)
    except config.ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError as exc:
        if not _reader_gone():
            print(f"wa {command}: {_down(exc)}", file=sys.stderr)  # a socket's, not stdout's
            return 2
        # Whoever read the output stopped (`wa trace ... | head`): nothing is wrong, and
        # nothing more can be said there. Python would complain again flushing stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a process killed by SIGPIPE
    except Exception as exc:
        what = _down(exc)
        if what is None:
            raise  # a bug, not something down: its traceback is what is needed
        print(f"wa {command}: {what}", file=sys.stderr)
        return 2


def _reader_gone() -> bool:
    """stdout is a pipe (or socket) whose reader closed its end."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (OSError, ValueError, AttributeError):  # no poll(), or stdout has no descriptor
        return False


def _down(exc: Exception) -> str | None:
    """One line saying which service or server the command needs is down (or failed it), or
    None when `exc` is not about something down."""
    import asyncpg
    import grpc
    import httpx

    from . import errors

    if isinstance(exc, errors.ServiceDown):
        what = str(exc)
    elif isinstance(exc, grpc.aio.AioRpcError):
        what = f"a service call failed ({exc.code().name}: {exc.details() or ''})"
    elif isinstance(exc, httpx.HTTPError):
        what = f"the gateway did not answer: {exc!r}"
    elif isinstance(exc, OSError | TimeoutError | asyncpg.PostgresError):
        # PostgreSQL (wa migrate) did not answer, or refused.
        what = f"cannot use the database: {exc}"
    else:
        return None
    return errors.one_line(what)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        from . import run

        return run.main()
    if args.command == "migrate":
        from common import migrate

        return migrate.main(["--check"] if args.check else ["--server-wait", "0"])
    if args.command == "simulate":
        from . import simulate

        return asyncio.run(
            simulate.simulate(args.text, args.wa_id, args.url, args.wait, args.username)
        )
    if args.command == "dlq":
        from . import dlq

        if args.dlq_command == "list":
            return asyncio.run(dlq.list_items(args.status, args.json, args.limit, args.customer))
        if args.dlq_command == "show":
            return asyncio.run(dlq.show(args.id, args.json))
        if args.dlq_command == "retry":
            if not args.ids and not args.all:
                print("give item ids or --all", file=sys.stderr)
                return 2
            return asyncio.run(dlq.retry(args.ids, args.all, args.status, args.json))
        if args.dlq_command == "purge":
            if not args.yes and not dlq.confirm_purge(args.ids):
                return 1
            return asyncio.run(dlq.purge(args.ids))
    if args.command == "health":
        from . import health

        return asyncio.run(health.health(args.json))
    if args.command == "stats":
        from . import stats

        return asyncio.run(stats.stats(args.hours, args.json))
    if args.command == "trace":
        from . import trace

        return asyncio.run(trace.trace(args.target, args.json))
    if args.command == "certs":
        from . import certs

        return certs.create(args.dir, args.hosts)
    if args.command == "handoff":
        from . import handoff

        if args.handoff_command == "list":
            return asyncio.run(handoff.list_handoffs(args.number, args.json))
        if args.handoff_command == "take":
            return asyncio.run(handoff.take_over(args.customer, args.number))
        return asyncio.run(handoff.release(args.customer, args.number))
    if args.command == "reply":
        from . import handoff

        return asyncio.run(
            handoff.reply(args.customer, args.text, args.number, args.idempotency_key)
        )
    if args.command == "prune":
        from . import retention

        return asyncio.run(retention.prune(args.dry_run, args.json))
    if args.command == "forget":
        from common import customers

        from . import retention

        customer = customers.key(args.customer)
        if not customer:
            print("name a customer: a phone number or a BSUID", file=sys.stderr)
            return 2
        if not args.yes and not retention.confirm_forget(customer):
            return 1
        return asyncio.run(retention.forget(customer, args.json))
    if args.command == "operator":
        from . import operator

        if args.operator_command == "list":
            return asyncio.run(operator.list_operators(args.json))
        if args.operator_command == "remove":
            return asyncio.run(operator.remove(args.name))
        return asyncio.run(operator.add(args.name, args.role, args.numbers, args.password_stdin))
    return 2


if __name__ == "__main__":
    sys.exit(main())
