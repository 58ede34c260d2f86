"""`wa operator add NAME --role admin|viewer [--numbers PNID,...]`, `wa operator list`,
`wa operator remove NAME`: the people who may log in to the console (services/console). The
password is asked for (twice), or read from stdin (`--password-stdin`) or
WA_OPERATOR_PASSWORD, for scripts; only its scrypt hash is stored."""

from __future__ import annotations

import getpass
import os
import sys

import asyncpg
import orjson

from cli.settings import CliSettings
from common import roles
from services.console import operators

PASSWORD_VARIABLE = "WA_OPERATOR_PASSWORD"


def read_password(from_stdin: bool) -> str | None:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if os.environ.get(PASSWORD_VARIABLE):
        return os.environ[PASSWORD_VARIABLE]
    if not sys.stdin.isatty():
        print(
            f"no terminal to ask for the password: pass --password-stdin or set "
            f"{PASSWORD_VARIABLE}",
            file=sys.stderr,
        )
        return None
    first = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != first:
        print("the two passwords differ", file=sys.stderr)
        return None
    return first


def operator_url(settings: CliSettings) -> str:
    """The operator role's URL: OPERATOR_DATABASE_URL, or the one `make run` generated."""
    if settings.operator_database_url:
        return str(settings.operator_database_url)
    saved = roles.read_urls(settings.run_dir / roles.URLS_FILE)
    return saved.get("operator", "")


def _url() -> str:
    settings = CliSettings.from_env()
    url = operator_url(settings)
    if not url:
        print(
            "OPERATOR_DATABASE_URL is not set and make run has not written "
            f"{settings.run_dir / roles.URLS_FILE}",
            file=sys.stderr,
        )
    return url


async def add(name: str, role: str, numbers: str, from_stdin: bool) -> int:
    url = _url()
    if not url:
        return 2
    password = read_password(from_stdin)
    if password is None:
        return 2
    listed = [n.strip() for n in numbers.split(",") if n.strip()]
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await operators.add(conn, name, role, password, listed)
    except operators.OperatorError as exc:
        print(f"wa operator add: {exc}", file=sys.stderr)
        return 2
    finally:
        await conn.close()
    sees = ", ".join(listed) if listed else "every business number"
    print(f"operator {name} ({role}) may log in to the console; sees {sees}")
    return 0


async def list_operators(as_json: bool) -> int:
    url = _url()
    if not url:
        return 2
    conn = await asyncpg.connect(url, timeout=10)
    try:
        rows = await operators.listing(conn)
    finally:
        await conn.close()
    if as_json:
        print(orjson.dumps(rows, option=orjson.OPT_INDENT_2).decode())
        return 0
    for r in rows:
        sees = ",".join(r["numbers"]) or "all numbers"
        locked = "  LOCKED" if r["locked"] else ""
        print(f"{r['name']:<24} {r['role']:<7} {sees}{locked}")
    if not rows:
        print("no operator yet: wa operator add NAME --role admin")
    return 0


async def remove(name: str) -> int:
    url = _url()
    if not url:
        return 2
    conn = await asyncpg.connect(url, timeout=10)
    try:
        removed = await operators.remove(conn, name)
    finally:
        await conn.close()
    if not removed:
        print(f"no operator {name}", file=sys.stderr)
        return 1
    print(f"operator {name} removed; its sessions ended")
    return 0
