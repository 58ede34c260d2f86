"""One PostgreSQL login role per service (state, agent, dlq, and the operator's for the CLI and
console), provisioned by the owner after the migrations, and the check every service makes
at start that it is not connected as something stronger.

Role names are cluster-wide while one cluster may host several systems, one per database (the
tests do): a role's default name derives from its database's, or it is the user of a given
`<SERVICE>_DATABASE_URL` (compose and Kubernetes take those from secrets). Grants and policies
name the roles, so they are not in the migrations but in db/privileges.sql, applied here.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import asyncpg

from . import config, files, migrate, telemetry

SERVICES = ("state", "agent", "dlq", "operator")
VARIABLES = {s: f"{s.upper()}_DATABASE_URL" for s in SERVICES}
PRIVILEGES = migrate.MIGRATIONS.parent / "privileges.sql"
# Where `wa migrate` / `make run` keep the URLs of the roles whose passwords they generated.
URLS_FILE = "database-roles.env"
NAME_MAX = 63  # PostgreSQL's identifier limit, in bytes
ROLE_ATTRIBUTES = "LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE NOREPLICATION"

log = logging.getLogger(__name__)


class RoleSettings(config.Base):
    """What provisioning reads: the owner's DATABASE_URL (Base), and each service's URL when
    the deployment chose it (its user becomes that service's role, its password is set)."""

    state_database_url: str = config.env("STATE_DATABASE_URL", "")
    agent_database_url: str = config.env("AGENT_DATABASE_URL", "")
    dlq_database_url: str = config.env("DLQ_DATABASE_URL", "")
    operator_database_url: str = config.env("OPERATOR_DATABASE_URL", "")

    def given_urls(self) -> dict[str, str]:
        urls = {s: str(getattr(self, f"{s}_database_url")) for s in SERVICES}
        return {s: u for s, u in urls.items() if u}


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def default_name(database: str, service: str) -> str:
    """`<database>_<service>`, or, past 63 bytes, the database name cut short with a digest
    of the whole of it (two long names sharing a prefix still differ)."""
    name = f"{database}_{service}"
    if len(name.encode()) <= NAME_MAX:
        return name
    digest = hashlib.sha256(database.encode()).hexdigest()[:10]
    room = NAME_MAX - len(service) - len(digest) - 2
    prefix = database.encode()[:room].decode(errors="ignore")
    return f"{prefix}_{digest}_{service}"


def scram_verifier(password: str, iterations: int = 4096) -> str:
    """The SCRAM-SHA-256 verifier PostgreSQL stores (RFC 5802/7677): the server is given this,
    never the password, so no statement log or view ever shows a password."""
    salt = secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    b64 = base64.b64encode
    return (
        f"SCRAM-SHA-256${iterations}:{b64(salt).decode()}"
        f"${b64(stored_key).decode()}:{b64(server_key).decode()}"
    )


def with_login(dsn: str, user: str, password: str | None) -> str:
    """`dsn` with its user and password replaced (both dropped when `user` is empty)."""
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    login = ""
    if user:
        login = quote(user, safe="") + (f":{quote(password, safe='')}" if password else "") + "@"
    query = urlencode(
        [(k, v) for k, v in parse_qsl(parts.query) if k not in ("user", "password")], safe="/"
    )
    return urlunsplit(parts._replace(netloc=login + host, query=query))


def user_of(url: str) -> tuple[str, str | None]:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    user = unquote(parts.username) if parts.username else query.get("user", "")
    password = unquote(parts.password) if parts.password else query.get("password")
    return user, password


async def provision(owner_dsn: str, given: Mapping[str, str] | None = None) -> dict[str, str]:
    """Creates or updates each service's login role in the database of `owner_dsn` (the
    owner's), applies db/privileges.sql, and returns each service's URL. A service in `given`
    keeps its URL's user (and password, when it has one); the others get a role named after
    the database with a new random password. Idempotent, and serialised with the migrations
    by their advisory lock, so concurrent starters are safe."""
    given = dict(given or {})
    conn = await asyncpg.connect(owner_dsn, timeout=10)
    try:
        who = await conn.fetchrow("SELECT current_database(), current_user")
        assert who is not None
        database, owner = who
        logins: dict[str, tuple[str, str | None]] = {}
        for service in SERVICES:
            if service in given:
                user, password = user_of(given[service])
                if not user:
                    raise config.ConfigError(f"{VARIABLES[service]} names no user")
            else:
                user, password = default_name(database, service), secrets.token_urlsafe(24)
            logins[service] = (user, password)
        _check_distinct(logins, owner)
        for attempt in range(3):
            try:
                async with conn.transaction():
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", migrate.LOCK_KEY)
                    for service, (user, password) in logins.items():
                        await _ensure_role(conn, service, user, password, owner)
                    await apply_privileges(conn, {s: u for s, (u, _) in logins.items()})
                break
            except asyncpg.UniqueViolationError:
                # Another database's provisioning created a role of the same name meanwhile
                # (two systems given one role): the next round finds it.
                if attempt == 2:
                    raise
    finally:
        await conn.close()
    return {
        s: given[s] if s in given else with_login(owner_dsn, user, password)
        for s, (user, password) in logins.items()
    }


def _check_distinct(logins: Mapping[str, tuple[str, str | None]], owner: str) -> None:
    seen: dict[str, str] = {}
    for service, (user, _) in logins.items():
        if user == owner:
            raise config.ConfigError(
                f"{VARIABLES[service]} names the owner ({owner}): each service needs its own "
                "role, never the one that owns the tables"
            )
        if user in seen:
            raise config.ConfigError(
                f"{VARIABLES[seen[user]]} and {VARIABLES[service]} name the same role {user}: "
                "each service needs its own"
            )
        seen[user] = service


async def _ensure_role(
    conn: asyncpg.Connection, service: str, user: str, password: str | None, owner: str
) -> None:
    row = await conn.fetchrow(
        "SELECT rolsuper, rolbypassrls, pg_has_role($1, $2, 'USAGE') AS owner_rights "
        "FROM pg_roles WHERE rolname = $1",
        user,
        owner,
    )
    secret = f" PASSWORD '{scram_verifier(password)}'" if password else ""
    if row is None:
        await conn.execute(f"CREATE ROLE {quote_ident(user)} {ROLE_ATTRIBUTES}{secret}")
        log.info("database role created", extra={"service": service, "role": user})
        return
    if row["rolsuper"] or row["rolbypassrls"] or row["owner_rights"]:
        raise config.ConfigError(
            f"role {user} ({VARIABLES[service]}) is a superuser, bypasses row level security or "
            "has the owner's rights: a service's role must be none of these"
        )
    if secret:
        await conn.execute(f"ALTER ROLE {quote_ident(user)} LOGIN{secret}")


async def apply_privileges(conn: asyncpg.Connection, names: Mapping[str, str]) -> bool:
    """db/privileges.sql for these roles, unless it was applied as it is now (same text, same
    roles, same migrations): rewriting policies locks every table. Call within a transaction.
    Returns whether it applied."""
    database = await conn.fetchval("SELECT current_database()")
    sql = render(PRIVILEGES.read_text(), {**names, "database": database})
    versions = [r[0] for r in await conn.fetch("SELECT version FROM schema_migrations ORDER BY 1")]
    fingerprint = hashlib.sha256("\n".join([sql, *versions]).encode()).hexdigest()
    if await conn.fetchval("SELECT fingerprint FROM wa_privileges_applied") == fingerprint:
        return False
    await _secure_every_table(conn)
    # Roles that played a service here before (a copy of another database, a renamed role)
    # keep nothing of it.
    for (stale,) in await conn.fetch(
        "SELECT r.role_name FROM wa_service_roles r JOIN pg_roles p ON p.rolname = r.role_name "
        "WHERE r.role_name <> ALL($1::name[])",
        list(names.values()),
    ):
        ident = quote_ident(stale)
        await conn.execute(
            f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {ident};"
            f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {ident};"
            f"REVOKE ALL ON ALL FUNCTIONS IN SCHEMA public FROM {ident};"
            f"REVOKE ALL ON DATABASE {quote_ident(database)} FROM {ident}"
        )
    for table, policy in await conn.fetch(
        "SELECT tablename, policyname FROM pg_policies "
        "WHERE schemaname = 'public' AND policyname LIKE 'role\\_%'"
    ):
        await conn.execute(f"DROP POLICY {quote_ident(policy)} ON {quote_ident(table)}")
    await conn.execute(sql)
    await conn.executemany(
        "INSERT INTO wa_service_roles (service, role_name) VALUES ($1, $2) "
        "ON CONFLICT (service) DO UPDATE SET role_name = EXCLUDED.role_name, updated_at = now()",
        list(names.items()),
    )
    await conn.execute(
        "INSERT INTO wa_privileges_applied (fingerprint) VALUES ($1) ON CONFLICT (singleton) "
        "DO UPDATE SET fingerprint = EXCLUDED.fingerprint, applied_at = now()",
        fingerprint,
    )
    return True


async def _secure_every_table(conn: asyncpg.Connection) -> None:
    """A table a migration left without forced row level security gets it, with the owner's
    policy of db/migrations/0012 (and a warning: the migration should have done it)."""
    for (table,) in await conn.fetch(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') "
        "AND NOT (c.relrowsecurity AND c.relforcerowsecurity)"
    ):
        ident = quote_ident(table)
        await conn.execute(
            f"ALTER TABLE {ident} ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY"
        )
        if not await conn.fetchval(
            "SELECT 1 FROM pg_policies WHERE schemaname = 'public' AND tablename = $1 "
            "AND policyname = 'wa_owner'",
            table,
        ):
            owns = "(SELECT wa_owns('{}'::regclass))".format(ident.replace("'", "''"))
            await conn.execute(
                f"CREATE POLICY wa_owner ON {ident} USING ({owns}) WITH CHECK ({owns})"
            )
        log.warning(
            "row level security was off: enabled and forced (its migration should do it)",
            extra={"table": table},
        )


_PLACEHOLDER = re.compile(r':"(\w+)"')


def render(sql: str, names: Mapping[str, str]) -> str:
    """The script with each `:"name"` replaced by that name as a quoted identifier."""
    return _PLACEHOLDER.sub(lambda m: quote_ident(names[m.group(1)]), sql)


async def provision_configured(
    owner_dsn: str, settings: RoleSettings
) -> tuple[dict[str, str], Path | None]:
    """`provision` with the URLs the environment gives; the others are kept in a file only the
    user can read, `RUN_DIR/database-roles.env`, and read back from it next time (so a restart
    keeps the passwords running services use). Returns the URLs and that file, when written."""
    given = settings.given_urls()
    missing = [s for s in SERVICES if s not in given]
    if not missing:
        return await provision(owner_dsn, given), None
    path = settings.run_dir / URLS_FILE
    saved = read_urls(path)
    here = with_login(owner_dsn, "", None)
    for service in missing:
        url = saved.get(service)
        if url and with_login(url, "", None) == here:
            given[service] = url
    urls = await provision(owner_dsn, given)
    write_urls(path, {s: urls[s] for s in missing})
    return urls, path


async def migrate_and_provision(settings: RoleSettings) -> dict[str, str]:
    """Migrations, then each service's login role and privileges; says (never printing a
    password) which roles play which service and where generated URLs were written."""
    dsn = settings.require_database()
    # Held until every grant is made: a service waiting for the schema (migrate --wait) waits
    # for its privileges on the new tables too.
    held = await asyncpg.connect(dsn, timeout=10)
    try:
        await held.execute("SELECT pg_advisory_lock($1)", migrate.PROVISION_LOCK_KEY)
        await migrate.migrate(dsn)
        urls, written = await provision_configured(dsn, settings)
    finally:
        await held.close()  # (the lock goes with its session)
    log.info(
        "database roles provisioned",
        extra={
            "roles": {s: user_of(u)[0] for s, u in urls.items()},
            "urls_file": str(written) if written else "",
        },
    )
    return urls


def read_urls(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    by_variable = {v: s for s, v in VARIABLES.items()}
    urls = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in by_variable:
            urls[by_variable[key.strip()]] = value.strip()
    return urls


def write_urls(path: Path, urls: Mapping[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# Written by wa migrate / make run: each service's database login."]
    lines += [f"{VARIABLES[service]}={url}" for service, url in urls.items()]
    files.write_atomic(path, "\n".join(lines) + "\n")


async def refuse_privileged(pool: asyncpg.Pool, settings: config.Base) -> None:
    """A service must connect as its own role: not a superuser, not BYPASSRLS, not owning (or
    having the rights of the owner of) our tables; any of those would skip row level security.
    DATABASE_ALLOW_PRIVILEGED_ROLE=true (environment only) lets it, for development."""
    with telemetry.untraced():  # start-up housekeeping, part of no message's trace
        row = await pool.fetchrow(
            """SELECT current_user AS name, r.rolsuper, r.rolbypassrls,
                  EXISTS (SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                           WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')
                             AND pg_has_role(current_user, c.relowner, 'USAGE')) AS owner
             FROM pg_roles r WHERE r.rolname = current_user"""
        )
    assert row is not None
    problems = [
        what
        for what, bad in (
            ("is a superuser", row["rolsuper"]),
            ("bypasses row level security", row["rolbypassrls"]),
            ("owns the tables", row["owner"]),
        )
        if bad
    ]
    if not problems:
        return
    variable = settings.database_variable
    message = (
        f"{variable} connects as {row['name']}, which {' and '.join(problems)}: a service "
        "must use its own role (wa migrate provisions them)"
    )
    if settings.allow_privileged_role:
        log.warning(
            "INSECURE: %s; DATABASE_ALLOW_PRIVILEGED_ROLE=true lets it, for development only",
            message,
        )
        return
    raise config.ConfigError(
        f"{message}; DATABASE_ALLOW_PRIVILEGED_ROLE=true (environment only) allows it for "
        "development"
    )
