"""Console operators, their sessions and the audit trail, in the database (migration 0019),
through the operator login role. Used by the console and by `wa operator add`."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any

import asyncpg

from common.db import Conn

from . import passwords

ROLES = ("admin", "viewer")
# scrypt takes 32 MiB and ~0.1 s a hash: at most this many at once, so a flood of logins
# queues instead of exhausting memory.
_HASHING = asyncio.Semaphore(4)


class OperatorError(ValueError):
    """An operator cannot be added as asked."""


@dataclass(frozen=True)
class Operator:
    name: str
    role: str
    numbers: tuple[str, ...]  # empty: every number the login role may see

    @property
    def may_act(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class Session:
    operator: Operator
    csrf_token: str


async def add(conn: Conn, name: str, role: str, password: str, numbers: list[str]) -> None:
    """Creates the operator, or replaces its role, password and numbers (unlocking it and
    ending its sessions)."""
    if role not in ROLES:
        raise OperatorError(f"role must be one of {', '.join(ROLES)}")
    why = passwords.weak(password)
    if why:
        raise OperatorError(why)
    hashed = await asyncio.to_thread(passwords.hash_password, password)
    async with conn.transaction():
        try:
            await conn.execute(
                "INSERT INTO wa_console_operators (name, role, password_hash) VALUES ($1, $2, $3) "
                "ON CONFLICT (name) DO UPDATE SET role = EXCLUDED.role, "
                "password_hash = EXCLUDED.password_hash, failed_attempts = 0, "
                "first_failed_at = NULL, locked_until = NULL, updated_at = now()",
                name,
                role,
                hashed,
            )
        except asyncpg.CheckViolationError:
            raise OperatorError("a name is 1 to 64 letters, digits or . _ @ -") from None
        # A new password or role ends the sessions opened with the old ones.
        await conn.execute("DELETE FROM wa_console_sessions WHERE operator = $1", name)
        await conn.execute("DELETE FROM wa_console_operator_numbers WHERE operator = $1", name)
        await conn.executemany(
            "INSERT INTO wa_console_operator_numbers (operator, phone_number_id) VALUES ($1, $2)",
            [(name, n) for n in numbers],
        )


async def listing(conn: Conn) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        """SELECT o.name, o.role, o.created_at, o.locked_until > now() AS locked,
                  coalesce((SELECT array_agg(n.phone_number_id ORDER BY n.phone_number_id)
                              FROM wa_console_operator_numbers n WHERE n.operator = o.name),
                           '{}') AS numbers
             FROM wa_console_operators o ORDER BY o.name"""
    )
    return [
        {
            "name": r["name"],
            "role": r["role"],
            "numbers": list(r["numbers"]),
            "locked": bool(r["locked"]),
            "created_at": r["created_at"].isoformat(),
        }
        for r in rows
    ]


async def remove(conn: Conn, name: str) -> bool:
    """Removes the operator and ends its sessions; False when there was none."""
    done = await conn.execute("DELETE FROM wa_console_operators WHERE name = $1", name)
    return done != "DELETE 0"


class LockedOut(Exception):
    """Too many failed logins: none accepted until `until`."""

    def __init__(self, until: datetime.datetime) -> None:
        super().__init__(f"locked until {until:%H:%M:%S} UTC")
        self.until = until


async def login(
    conn: Conn,
    name: str,
    password: str,
    *,
    max_failures: int,
    window: datetime.timedelta,
    session_ttl: datetime.timedelta,
) -> str | None:
    """A new session's token when the password is right, None when not; LockedOut while the
    name is locked (a right password then does not log in either)."""
    row = await conn.fetchrow(
        "SELECT password_hash, locked_until, locked_until > now() AS locked "
        "FROM wa_console_operators WHERE name = $1",
        name,
    )
    stored = row["password_hash"] if row else passwords.dummy_hash()
    async with _HASHING:
        ok = await asyncio.to_thread(passwords.verify, password, stored)
    if row is None:
        return None
    if row["locked"]:
        raise LockedOut(row["locked_until"])
    if not ok:
        # Failures count within the window from the first; the one that reaches the limit
        # locks the name for the window.
        locked_until = await conn.fetchval(
            """UPDATE wa_console_operators SET
                 failed_attempts = CASE WHEN first_failed_at > now() - $2::interval
                                        THEN failed_attempts + 1 ELSE 1 END,
                 first_failed_at = CASE WHEN first_failed_at > now() - $2::interval
                                        THEN first_failed_at ELSE now() END,
                 updated_at = now()
               WHERE name = $1
               RETURNING CASE WHEN failed_attempts >= $3 THEN now() + $2::interval END""",
            name,
            window,
            max_failures,
        )
        if locked_until is not None:
            await conn.execute(
                "UPDATE wa_console_operators SET locked_until = $2, failed_attempts = 0, "
                "first_failed_at = NULL WHERE name = $1",
                name,
                locked_until,
            )
            await record(conn, name, "locked out", name)
        return None
    token = secrets.token_urlsafe(32)
    await conn.execute(
        "UPDATE wa_console_operators SET failed_attempts = 0, first_failed_at = NULL, "
        "locked_until = NULL WHERE name = $1",
        name,
    )
    await conn.execute(
        "INSERT INTO wa_console_sessions (token_hash, operator, csrf_token, expires_at) "
        "VALUES ($1, $2, $3, now() + $4::interval)",
        _digest(token),
        name,
        secrets.token_urlsafe(32),
        session_ttl,
    )
    return token


async def session(conn: Conn, token: str) -> Session | None:
    """The live session of this cookie token, with its operator; None when unknown/expired."""
    if not token:
        return None
    row = await conn.fetchrow(
        """SELECT s.csrf_token, o.name, o.role,
                  coalesce((SELECT array_agg(n.phone_number_id ORDER BY n.phone_number_id)
                              FROM wa_console_operator_numbers n WHERE n.operator = o.name),
                           '{}') AS numbers
             FROM wa_console_sessions s JOIN wa_console_operators o ON o.name = s.operator
            WHERE s.token_hash = $1 AND s.expires_at > now()""",
        _digest(token),
    )
    if row is None:
        return None
    return Session(Operator(row["name"], row["role"], tuple(row["numbers"])), row["csrf_token"])


async def logout(conn: Conn, token: str) -> None:
    await conn.execute("DELETE FROM wa_console_sessions WHERE token_hash = $1", _digest(token))
    await conn.execute("DELETE FROM wa_console_sessions WHERE expires_at < now()")


async def record(
    conn: Conn,
    operator: str,
    action: str,
    target: str,
    phone_number_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """One line of the audit trail: who did what to what, now. `detail` goes as it is: the
    pool's jsonb codec encodes it (common/db.py); text would be stored as a JSON string."""
    await conn.execute(
        "INSERT INTO wa_console_audit (operator, action, target, phone_number_id, detail) "
        "VALUES ($1, $2, $3, $4, $5)",
        operator,
        action,
        target,
        phone_number_id,
        detail or {},
    )


def csrf_ok(expected: str, given: str) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), given.encode())


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()
