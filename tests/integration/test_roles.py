"""Each service's login role, connected as it: what it may not read or write (db/privileges.sql,
db/migrations/0012), how it is provisioned (common/roles.py), and the service that refuses to
run as something stronger."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import orjson
import pytest

from common import migrate, roles, tls
from services.agent import turn as agent_turn
from services.state import store as state_store
from tests.support.servers import Postgres, with_database

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def urls(database_url: str) -> dict[str, str]:
    return await roles.provision(database_url)


@pytest.fixture
async def owner(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url, timeout=10)
    yield conn
    await conn.close()


async def _as(url: str) -> asyncpg.Connection:
    return await asyncpg.connect(url, timeout=10)


async def _seed(owner: asyncpg.Connection) -> None:
    """Two business numbers, each with one conversation, message, context and DLQ item."""
    for n, number in ((1, "PN1"), (2, "PN2")):
        await owner.execute(
            "INSERT INTO webhook_conversations (id, phone_number_id, wa_id) VALUES ($1, $2, $3)",
            n,
            number,
            f"1555000{n}",
        )
        await owner.execute(
            "INSERT INTO processed_webhook_messages (message_id, kind, conversation_id, "
            "phone_number_id, wa_id, message_type, wa_timestamp, body, payload, status, "
            "correlation_id) VALUES ($1, 'message', $2, $3, $4, 'text', now(), 'hi', '{}', "
            "'failed', 'c')",
            f"wamid.{n}",
            n,
            number,
            f"1555000{n}",
        )
        await owner.execute(
            "INSERT INTO conversation_state_transitions (conversation_id, message_id, entity, "
            "to_state) VALUES ($1, $2, 'message', 'failed')",
            n,
            f"wamid.{n}",
        )
        await owner.execute(
            "INSERT INTO agent_contexts (conversation_id, agent_type, last_seq) "
            "VALUES ($1, 'general', 1)",
            n,
        )
        await owner.execute(
            "INSERT INTO agent_context_entries (conversation_id, seq, n, messages) "
            "VALUES ($1, 1, 1, '\"secret\"')",
            n,
        )
        await owner.execute(
            "INSERT INTO webhook_dlq (message_id, conversation_id, error_class) "
            "VALUES ($1, $2, 'X')",
            f"wamid.{n}",
            n,
        )


async def test_row_level_security_is_enabled_and_forced_on_every_table(
    urls: dict[str, str], owner: asyncpg.Connection
) -> None:
    # Provisioned (as every database a service uses is): a table whose migration did not
    # force row level security has it from provisioning.
    rows = await owner.fetch(
        "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p')"
    )
    assert len(rows) >= 12
    assert [
        r["relname"] for r in rows if not (r["relrowsecurity"] and r["relforcerowsecurity"])
    ] == []
    views = await owner.fetch(
        "SELECT relname, reloptions FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = 'public' AND c.relkind = 'v'"
    )
    assert views and all("security_invoker=true" in (v["reloptions"] or []) for v in views)


async def test_no_service_role_is_privileged_or_can_create_anything(
    urls: dict[str, str], owner: asyncpg.Connection
) -> None:
    for service, url in urls.items():
        conn = await _as(url)
        try:
            row = await conn.fetchrow(
                "SELECT rolsuper, rolbypassrls, rolcreaterole, rolcreatedb FROM pg_roles "
                "WHERE rolname = current_user"
            )
            assert row is not None and not any(row.values()), (service, row)
            for ddl in (
                "CREATE TABLE public.x (id int)",
                "CREATE TEMP TABLE x (id int)",
                "CREATE FUNCTION public.f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
                "CREATE SCHEMA s",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await conn.execute(ddl)
            # Nor may it change who an operator may see, or which role plays which service.
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(
                    "INSERT INTO wa_operator_numbers (role_name, phone_number_id) "
                    "VALUES (current_user, 'PN1')"
                )
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch("SELECT * FROM wa_service_roles")
        finally:
            await conn.close()


async def test_the_agent_cannot_change_a_message_status_nor_its_conversation(
    urls: dict[str, str], owner: asyncpg.Connection
) -> None:
    await _seed(owner)
    agent = await _as(urls["agent"])
    try:
        # What its code does: write the reply of a message.
        done = await agent.execute(
            "UPDATE processed_webhook_messages SET reply_text = 'ok' WHERE message_id = 'wamid.1'"
        )
        assert done == "UPDATE 1"
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await agent.execute(
                "UPDATE processed_webhook_messages SET status = 'replied' "
                "WHERE message_id = 'wamid.1'"
            )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await agent.execute(
                "SELECT wa_transition_message('wamid.1', 'replied', "
                "ARRAY['failed'], 'x', NULL, 'c')"
            )
        # It may lock its conversation to fence its writes, never write it.
        async with agent.transaction():
            assert (
                await agent.fetchval(
                    "SELECT fence_token FROM webhook_conversations WHERE id = 1 FOR SHARE"
                )
                == 0
            )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await agent.execute("UPDATE webhook_conversations SET updated_at = now() WHERE id = 1")
        # Its audit rows are changes of agent, not of a message's state.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await agent.execute(
                "INSERT INTO conversation_state_transitions (conversation_id, message_id, "
                "entity, to_state) VALUES (1, 'wamid.1', 'message', 'replied')"
            )
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await agent.fetch("SELECT * FROM webhook_dlq")
    finally:
        await agent.close()
    assert (
        await owner.fetchval(
            "SELECT status FROM processed_webhook_messages WHERE message_id = 'wamid.1'"
        )
        == "failed"
    )


async def test_the_dlq_cannot_read_contexts_or_message_texts(
    urls: dict[str, str], owner: asyncpg.Connection
) -> None:
    await _seed(owner)
    dlq = await _as(urls["dlq"])
    try:
        # What a redrive needs of a message it may read.
        assert (
            await dlq.fetchval(
                "SELECT status FROM processed_webhook_messages WHERE message_id = 'wamid.1'"
            )
            == "failed"
        )
        for query in (
            "SELECT * FROM agent_contexts",
            "SELECT * FROM agent_context_entries",
            "SELECT * FROM agent_sessions",
            "SELECT * FROM conversation_state_transitions",
            "SELECT body FROM processed_webhook_messages",
            "SELECT contact_name FROM webhook_conversations",
            "UPDATE processed_webhook_messages SET status = 'received'",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await dlq.execute(query)
        # Its own table it runs.
        assert await dlq.execute("UPDATE webhook_dlq SET status = 'pending'") == "UPDATE 2"
    finally:
        await dlq.close()


async def test_each_record_of_a_send_takes_the_furthest_status_seen_with_its_own_role(
    urls: dict[str, str], owner: asyncpg.Connection
) -> None:
    """The four statements that record a sent reply read its statuses (which may come before
    the send is recorded) through wa_reply_status_seen (db/migrations/0029), with the rights
    of the service that runs them; no other service may run it."""
    await owner.execute(
        "INSERT INTO webhook_conversations (id, phone_number_id, wa_id) VALUES (1, 'PN1', '1')"
    )
    await owner.execute(
        "INSERT INTO processed_webhook_messages (message_id, kind, conversation_id, "
        "phone_number_id, wa_id, message_type, wa_timestamp, payload, status, correlation_id) "
        "SELECT 'wamid.' || i, 'message', 1, 'PN1', '1', 'text', now(), '{}', 'processing', 'c' "
        "FROM generate_series(1, 5) i"
    )
    # Replies OUT1..OUT4 were delivered and read before their sends were recorded.
    await owner.execute(
        "INSERT INTO processed_webhook_messages (message_id, kind, phone_number_id, wa_id, "
        "message_type, wa_timestamp, payload, status, reply_message_id, reply_status, "
        "correlation_id) "
        "SELECT 'status:wamid.OUT' || i || ':' || s, 'status', 'PN1', '1', 'status', now(), "
        "'{}', 'skipped', 'wamid.OUT' || i, s, 'c' "
        "FROM generate_series(1, 4) i, unnest(ARRAY['read', 'delivered']) s"
    )
    agent = await _as(urls["agent"])
    state = await _as(urls["state"])
    try:
        assert await agent.fetchval(agent_turn.Q["record_sent"], "wamid.1", "wamid.OUT1", 1, 0) == 0
        await agent.fetch(agent_turn.Q["record_unanswered_sends"], ["wamid.2"], ["wamid.OUT2"])
        await state.fetch(state_store.Q["record_stale_send"], "wamid.3", "wamid.OUT3")
        # A turn's final transition (wa_finish_turn calls it); and a reply with no status yet.
        for message, reply in (("wamid.4", "wamid.OUT4"), ("wamid.5", "wamid.OUT5")):
            outcome = await state.fetchval(
                "SELECT outcome FROM wa_transition_message($1, 'replied', ARRAY['processing'],"
                " 'replied', 0, 'c', $2)",
                message,
                reply,
            )
            assert outcome == "done"
        for service in ("dlq", "operator"):
            other = await _as(urls[service])
            try:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await other.fetch("SELECT * FROM wa_reply_status_seen('wamid.OUT1')")
            finally:
                await other.close()
    finally:
        await agent.close()
        await state.close()
    rows = await owner.fetch(
        "SELECT message_id, reply_message_id, reply_status FROM processed_webhook_messages"
        " WHERE kind = 'message' ORDER BY message_id"
    )
    assert [tuple(r) for r in rows] == [
        ("wamid.1", "wamid.OUT1", "read"),
        ("wamid.2", "wamid.OUT2", "read"),
        ("wamid.3", "wamid.OUT3", "read"),
        ("wamid.4", "wamid.OUT4", "read"),
        ("wamid.5", "wamid.OUT5", "sent"),
    ]


async def test_the_operator_reads_and_writes_only_its_numbers(
    urls: dict[str, str], owner: asyncpg.Connection
) -> None:
    await _seed(owner)
    operator_role = roles.user_of(urls["operator"])[0]
    op = await _as(urls["operator"])
    try:
        # Listed for no number: it sees every number.
        assert await op.fetchval("SELECT count(*) FROM webhook_conversations") == 2
        await owner.execute(
            "INSERT INTO wa_operator_numbers (role_name, phone_number_id) VALUES ($1, 'PN1')",
            operator_role,
        )
        for table in (
            "webhook_conversations",
            "processed_webhook_messages",
            "conversation_state_transitions",
            "agent_contexts",
            "agent_context_entries",
            "webhook_dlq",
            "webhook_conversation_health",
        ):
            assert await op.fetchval(f"SELECT count(*) FROM {table}") == 1, table
        assert await op.fetchval("SELECT phone_number_id FROM webhook_conversations") == "PN1"
        stats = await op.fetchrow("SELECT * FROM get_webhook_performance_stats(1)")
        assert stats is not None and stats["total"] == 1
        # It resolves a dead-letter item of its number; one of another number it cannot reach.
        assert await op.execute("UPDATE webhook_dlq SET status = 'resolved'") == "UPDATE 1"
        assert (
            await owner.fetchval("SELECT status FROM webhook_dlq WHERE conversation_id = 2")
            == "pending"
        )
        # Nor may it move an item of its number into another number's conversation.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await op.execute("UPDATE webhook_dlq SET conversation_id = 2")
        for write in (
            "UPDATE processed_webhook_messages SET status = 'received'",
            "DELETE FROM webhook_dlq",
            "INSERT INTO wa_operator_numbers (role_name, phone_number_id) "
            "VALUES (current_user, 'PN2')",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await op.execute(write)
    finally:
        await op.close()


async def test_provisioning_is_idempotent_and_keeps_given_logins(
    database_url: str, urls: dict[str, str]
) -> None:
    user = f"wa_given_{uuid.uuid4().hex[:8]}"
    given = {"state": roles.with_login(database_url, user, "s3cret-pw")}
    try:
        again = await roles.provision(database_url, given)
        assert again["state"] == given["state"]
        conn = await _as(again["state"])
        try:
            assert await conn.fetchval("SELECT current_user") == user
            assert await conn.fetchval("SELECT count(*) FROM processed_webhook_messages") == 0
        finally:
            await conn.close()
        # The role that played state before keeps nothing of it, not even its connection.
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await _as(urls["state"])
        # Nothing changed: the policies are not rewritten (no table is locked for it).
        conn = await asyncpg.connect(database_url, timeout=10)
        try:
            names = {s: roles.user_of(u)[0] for s, u in again.items()}
            async with conn.transaction():
                assert not await roles.apply_privileges(conn, names)
        finally:
            await conn.close()
    finally:
        await _drop_roles(database_url, [user])


async def test_two_databases_of_one_cluster_do_not_share_roles(
    pg: Postgres, template: str, urls: dict[str, str], database_url: str
) -> None:
    other = await pg.create_database(template)
    other_urls = await roles.provision(other)
    mine = {roles.user_of(u)[0] for u in urls.values()}
    theirs = {roles.user_of(u)[0] for u in other_urls.values()}
    assert not mine & theirs
    # This database's state role cannot even connect to the other one.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await _as(with_database(urls["state"], urlsplit_db(other)))
    # A copy of a provisioned database (CREATE DATABASE ... TEMPLATE) gives its original's
    # roles nothing, once provisioned itself.
    copy = await pg.create_database(urlsplit_db(database_url))
    await roles.provision(copy)
    conn = await asyncpg.connect(copy, timeout=10)
    try:
        granted = await conn.fetchval(
            "SELECT count(*) FROM information_schema.role_table_grants WHERE grantee = ANY($1)",
            list(mine),
        )
        policies = await conn.fetchval(
            "SELECT count(*) FROM pg_policies WHERE roles && $1::name[]", list(mine)
        )
        assert (granted, policies) == (0, 0)
    finally:
        await conn.close()


def urlsplit_db(dsn: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(dsn).path.lstrip("/")


async def test_a_non_superuser_owner_keeps_every_row_under_forced_security(
    pg: Postgres,
) -> None:
    """FORCE ROW LEVEL SECURITY holds the owner to policies too: it keeps its rows by its own
    policy, and provisions the roles with CREATEROLE alone."""
    name = f"wa_t_{uuid.uuid4().hex[:12]}"
    owner_role = f"{name}_owner"
    admin = await asyncpg.connect(pg.admin_dsn, timeout=10)
    dsn = roles.with_login(with_database(pg.admin_dsn, name), owner_role, "owner-pw")
    try:
        await admin.execute(f"CREATE ROLE {owner_role} LOGIN CREATEROLE PASSWORD 'owner-pw'")
        await admin.execute(f"CREATE DATABASE {name} OWNER {owner_role}")
        await migrate.migrate(dsn)
        urls = await roles.provision(dsn)
        conn = await asyncpg.connect(dsn, timeout=10)
        try:
            assert not await conn.fetchval(
                "SELECT rolsuper FROM pg_roles WHERE rolname = current_user"
            )
            await _seed(conn)
            assert await conn.fetchval("SELECT count(*) FROM processed_webhook_messages") == 2
        finally:
            await conn.close()
        state = await _as(urls["state"])
        try:
            assert await state.fetchval("SELECT count(*) FROM processed_webhook_messages") == 2
        finally:
            await state.close()
    finally:
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        for role in [roles.default_name(name, s) for s in roles.SERVICES] + [owner_role]:
            await admin.execute(f"DROP ROLE IF EXISTS {roles.quote_ident(role)}")
        await admin.close()


async def test_an_embedded_service_role_needs_its_password(
    pg: Postgres, urls: dict[str, str]
) -> None:
    if pg.external:
        pytest.skip("the machine's server trusts every local connection")
    user, _ = roles.user_of(urls["state"])
    with pytest.raises(asyncpg.InvalidPasswordError):
        await _as(roles.with_login(urls["state"], user, "wrong"))
    with pytest.raises(asyncpg.InvalidPasswordError):
        await _as(roles.with_login(urls["state"], user, None))


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA and the services' certificates, so that the role check is what stops them."""
    where = tmp_path_factory.mktemp("tls")
    tls.create(where)
    return where


def _run_service(
    service: str, env: dict[str, str], tls_dir: Path
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"services.{service}"],
        env={
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "REDIS_URL": "redis://127.0.0.1:1/0",  # never reached: the role check comes first
            "DATABASE_URL": "",
            "GRPC_TLS_DIR": str(tls_dir),
            **env,
        },
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _critical(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [orjson.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    (critical,) = [line for line in lines if line["level"] == "CRITICAL"]
    return str(critical["msg"])


@pytest.mark.parametrize("service", ["state", "agent", "dlq"])
async def test_a_service_given_the_owner_url_refuses_to_start(
    service: str, database_url: str, certificates: Path
) -> None:
    variable = roles.VARIABLES[service]
    done = await asyncio.to_thread(_run_service, service, {variable: database_url}, certificates)
    message = _critical(done)
    assert variable in message and "superuser" in message, message


async def test_the_state_service_refuses_a_database_with_migrations_pending(
    pg: Postgres, certificates: Path
) -> None:
    dsn = await pg.create_database(None)
    await migrate.migrate(dsn)
    urls = await roles.provision(dsn)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(
            "DELETE FROM schema_migrations WHERE version = '0011_message_referral.sql'"
        )
    finally:
        await conn.close()
    done = await asyncio.to_thread(
        _run_service, "state", {"STATE_DATABASE_URL": urls["state"]}, certificates
    )
    message = _critical(done)
    assert "0011_message_referral.sql" in message and "wa migrate" in message, message


def test_default_role_names_fit_and_differ() -> None:
    assert roles.default_name("wa", "state") == "wa_state"
    long_a, long_b = "d" * 60 + "a", "d" * 60 + "b"
    a, b = roles.default_name(long_a, "operator"), roles.default_name(long_b, "operator")
    assert len(a.encode()) <= 63 and len(b.encode()) <= 63 and a != b
    assert a.endswith("_operator")
    unicode = roles.default_name("é" * 40, "state")
    assert len(unicode.encode()) <= 63


async def _drop_roles(dsn: str, names: list[str]) -> None:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        for name in names:
            ident = roles.quote_ident(name)
            # Its privileges and the policies naming it only, in this database (the only one
            # it was given anything in), then the role.
            await conn.execute(f"DROP OWNED BY {ident}; DROP ROLE {ident}")
    finally:
        await conn.close()


async def test_each_service_role_can_wait_for_the_migrations_its_code_needs(pg: Postgres) -> None:
    """`python -m common.migrate --wait` with a service's own URL (a Kubernetes init
    container's): it exits 1 while a migration is pending, and 0 once the owner applied it."""
    dsn = await pg.create_database(None)
    await migrate.migrate(dsn)
    urls = await roles.provision(dsn)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        applied = await conn.fetchrow(
            "DELETE FROM schema_migrations WHERE version = '0011_message_referral.sql'"
            " RETURNING version, checksum"
        )
        assert applied is not None

        def wait(service: str, seconds: str) -> subprocess.CompletedProcess[str]:
            variable = roles.VARIABLES[service]
            argv = ["-m", "common.migrate", "--wait", seconds, "--url-from", variable]
            return subprocess.run(
                [sys.executable, *argv],
                env={**os.environ, variable: urls[service]},
                capture_output=True,
                text=True,
                timeout=60,
            )

        for service in ("state", "agent", "dlq", "operator"):
            pending = await asyncio.to_thread(wait, service, "0.5")
            assert pending.returncode == 1, (service, pending.stderr)
            assert "0011_message_referral.sql" in pending.stderr, pending.stderr
        # The owner applies it while a service waits.
        waiting = asyncio.create_task(asyncio.to_thread(wait, "agent", "30"))
        await asyncio.sleep(1)
        await conn.execute(
            "INSERT INTO schema_migrations (version, checksum) VALUES ($1, $2)",
            applied["version"],
            applied["checksum"],
        )
        done = await waiting
        assert done.returncode == 0, done.stderr
    finally:
        await conn.close()


async def test_a_service_waits_for_its_privileges_not_only_for_the_migrations(
    pg: Postgres,
) -> None:
    """The owner's job commits each migration, then grants the services their privileges on
    the new tables: `migrate --wait` (a Kubernetes init container's) lets a service start only
    once the job has done both, not between them."""
    dsn = await pg.create_database(None)
    await migrate.migrate(dsn)
    urls = await roles.provision(dsn)
    variable = roles.VARIABLES["agent"]

    def wait(seconds: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "common.migrate", "--wait", seconds, "--url-from", variable],
            env={**os.environ, variable: urls["agent"]},
            capture_output=True,
            text=True,
            timeout=60,
        )

    job = await asyncpg.connect(dsn, timeout=10)
    try:
        # Every migration is applied; the job is still granting (it holds its lock).
        await job.execute("SELECT pg_advisory_lock($1)", migrate.PROVISION_LOCK_KEY)
        held = await asyncio.to_thread(wait, "0.5")
        assert held.returncode == 1, held.stderr
        assert "being applied" in held.stderr, held.stderr
        waiting = asyncio.create_task(asyncio.to_thread(wait, "30"))
        await asyncio.sleep(1)
        assert not waiting.done()
        await job.execute("SELECT pg_advisory_unlock($1)", migrate.PROVISION_LOCK_KEY)
        done = await waiting
        assert done.returncode == 0, done.stderr
    finally:
        await job.close()


async def test_the_owners_job_holds_its_lock_from_the_first_migration_to_the_last_grant(
    pg: Postgres, tmp_path: Path
) -> None:
    """What `migrate --wait` respects (above) is held by the job itself for as long as it
    migrates and grants, and let go when it is done."""
    dsn = await pg.create_database(None)
    watcher = await asyncpg.connect(dsn, timeout=10)
    refused = 0
    done = False

    async def watch() -> None:
        nonlocal refused
        while not done:
            if await watcher.fetchval(
                "SELECT pg_try_advisory_lock_shared($1)", migrate.PROVISION_LOCK_KEY
            ):
                await watcher.execute(
                    "SELECT pg_advisory_unlock_shared($1)", migrate.PROVISION_LOCK_KEY
                )
            else:
                refused += 1
            await asyncio.sleep(0.005)

    watching = asyncio.create_task(watch())
    try:
        settings = roles.RoleSettings.from_env({"DATABASE_URL": dsn, "RUN_DIR": str(tmp_path)})
        await roles.migrate_and_provision(settings)
        done = True
        await watching
        assert refused > 0, "the job never held its lock"
        # Let go: a waiting service now finds everything applied.
        assert await migrate.pending(dsn) == []
    finally:
        done = True
        await watching
        await watcher.close()
