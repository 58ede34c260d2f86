"""The running system's database connections: every one is a service's own login role, none
a superuser, none the owner (README, Security: Database roles)."""

from __future__ import annotations

import asyncpg
import pytest

from common import roles
from tests.conftest import StartSystem
from tests.support import payloads

pytestmark = pytest.mark.e2e


async def test_no_service_connection_is_a_superuser_or_the_owner(
    start_system: StartSystem, database_url: str
) -> None:
    system = await start_system()
    doc = payloads.text_delivery("hello")
    message_id = doc["entry"][0]["changes"][0]["value"]["messages"][0]["id"]
    await system.deliver(doc)
    await system.wait_status([message_id], {"replied"})
    provisioned = {s: roles.user_of(system.env[v])[0] for s, v in roles.VARIABLES.items()}
    conn = await asyncpg.connect(database_url, timeout=10)  # the test's own: the owner's
    try:
        rows = await conn.fetch(
            "SELECT a.usename, a.application_name, r.rolsuper, r.rolbypassrls "
            "FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid "
            "WHERE a.datname = current_database() AND a.pid <> pg_backend_pid()"
        )
        owner = await conn.fetchval("SELECT current_user")
    finally:
        await conn.close()
    services: dict[str, set[str]] = {}
    for row in rows:
        name = row["application_name"]
        if name.startswith("wa-"):
            services.setdefault(name.removeprefix("wa-"), set()).add(row["usename"])
        else:  # the tests' own connections (System.db()) are the only others: the owner's
            assert row["usename"] == owner, row
    # Each of the three services is connected, only as its own role, which is not privileged.
    assert services == {s: {provisioned[s]} for s in ("state", "agent", "dlq")}, rows
    assert not any(r["rolsuper"] or r["rolbypassrls"] for r in rows if r["usename"] != owner)
