"""The embedded Redis (`make run`, the tests) as README, Security says: nothing gets in without
logging in, and the state service logs in as its own user, which can send only the commands
it uses, to keys and channels under its prefix; the system still answers, and `wa health`
says Redis is fine."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError

from common import kv
from services.state.locks import Locks
from tests.e2e.test_dlq import wa, wait_for
from tests.support import payloads
from tests.support.fakes import FakeGraph
from tests.support.servers import Redis
from tests.support.system import System

pytestmark = pytest.mark.e2e

PREFIX = "wa:acl:"


@pytest.fixture
async def embedded_redis(tmp_path: Path) -> AsyncIterator[Redis]:
    """The embedded server even when REDIS_URL names another (that one is the operator's)."""
    server = Redis(tmp_path / "redis", embedded_only=True)
    server.root.mkdir()
    await asyncio.to_thread(server.start)
    yield server
    server.stop()


async def test_only_the_state_service_gets_in_and_only_to_what_it_uses(
    tmp_path: Path, database_url: str, embedded_redis: Redis, graph: FakeGraph
) -> None:
    (tmp_path / "system").mkdir()
    system = System(
        tmp_path / "system",
        database_url,
        embedded_redis.url,
        PREFIX,
        {"WHATSAPP_API_BASE_URL": graph.url},
    )
    await system.start()
    anonymous = aioredis.Redis(host="127.0.0.1", port=embedded_redis.port, protocol=2)
    state = kv.create_client(embedded_redis.url)
    admin = kv.create_client(embedded_redis.admin_url)
    try:
        doc = payloads.text_delivery("hello")
        message_id = doc["entry"][0]["changes"][0]["value"]["messages"][0]["id"]
        await system.deliver(doc)
        await system.wait_status([message_id], {"replied"})
        health = await asyncio.to_thread(wa, system, "health", "--json")
        assert health.returncode == 0, health.stdout + health.stderr
        redis_checks = [c for c in json.loads(health.stdout)["components"] if "redis" in c["name"]]
        assert redis_checks and all(c["healthy"] for c in redis_checks), redis_checks

        assert urlsplit(system.env["REDIS_URL"]).username == kv.STATE_USER
        # Every connection but the admin's own is the state service's user.
        clients = await admin.client_list()
        me = await admin.client_id()
        assert {c["user"] for c in clients if int(c["id"]) != me} == {kv.STATE_USER}, clients
        assert not [m for m in system.log_lines("state") if "REDIS_URL has no password" in m["msg"]]

        with pytest.raises(AuthenticationError):
            await anonymous.ping()
        with pytest.raises(AuthenticationError, match=r"[Aa]uthentication required"):
            await anonymous.execute_command("GET", f"{PREFIX}probe")
        with pytest.raises(AuthenticationError):
            await aioredis.Redis(
                host="127.0.0.1", port=embedded_redis.port, username="default", password="x"
            ).ping()

        # The state's user: its own keys and channel, as the service uses them...
        assert await state.set(f"{PREFIX}probe", "1", px=10_000)
        assert await state.get(f"{PREFIX}probe") == "1"
        assert await state.publish(f"{PREFIX}handback", "{}") >= 1  # the service listens
        # A stopping replica's release publishes from inside its script (services/state/locks.py).
        locks = Locks(state, ttl_seconds=30, prefix=PREFIX)
        lease = await locks.acquire(10**12)
        assert lease is not None
        assert await locks.release_handing_back(lease, b"{}", waiting=True) == (True, True)
        # ...but nothing outside its prefix, and none of the commands it does not use.
        for command in (
            ("SET", "other:probe", "1"),
            ("GET", "wa-other:probe"),
            ("PUBLISH", "other:handback", "{}"),
            ("FLUSHALL",),
            ("CONFIG", "GET", "*"),
            ("KEYS", "*"),
            ("SCAN", "0"),
            ("ACL", "LIST"),
            ("SCRIPT", "FLUSH"),
            ("EVAL", "return redis.call('flushall')", "0"),
            ("CLIENT", "LIST"),
            ("HSET", f"{PREFIX}probe2", "x", "1"),
            ("SHUTDOWN",),
        ):
            with pytest.raises(NoPermissionError):
                await state.execute_command(*command)
        pubsub = state.pubsub()
        with pytest.raises(NoPermissionError):
            await pubsub.subscribe("other:handback")
            await pubsub.get_message(timeout=5)  # the refusal is the subscription's reply
        await pubsub.aclose()
        assert await admin.set("other:probe", "kept") and await admin.get("other:probe") == "kept"
    finally:
        await anonymous.aclose()
        await state.aclose()
        await admin.aclose()
        await system.stop()


@pytest.mark.parametrize(
    ("url", "warned"),
    [("redis://192.0.2.1:6379/0", True), ("redis://wa-state:pw@192.0.2.1:6379/0", False)],
)
async def test_the_state_service_warns_of_an_anonymous_remote_redis(
    tmp_path: Path, database_url: str, url: str, warned: bool
) -> None:
    """An operator's server (REDIS_URL) is used as it is, but one that anybody on the network
    could use says so once, at start (192.0.2.1: a documentation address, never answering)."""
    system = System(tmp_path, database_url, url, PREFIX, {})
    await system.start(("state",), wait=False)

    async def started() -> bool:  # the sweeper starts once the Redis client is made
        return any(m["msg"] == "sweeper started" for m in system.log_lines("state"))

    try:
        await wait_for(started)
        warnings = [
            m
            for m in system.log_lines("state")
            if m["level"] == "WARNING" and "REDIS_URL has no password" in m["msg"]
        ]
        assert [w["msg"].split(":")[0] for w in warnings] == (
            ["REDIS_URL has no password and 192.0.2.1 is not this host"] if warned else []
        )
    finally:
        await system.stop()
