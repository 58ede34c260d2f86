"""The operator console without a browser: its real process against the real system and
database, driven over HTTP as a browser would (cookies, forms, CSRF tokens)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from common import roles
from tests.conftest import StartSystem
from tests.support import payloads
from tests.support.console import (
    NUMBER_A,
    NUMBER_B,
    PASSWORD,
    add_operator,
    csrf_of,
    delivery_to,
    logged_in,
    login,
    wa_operator,
)
from tests.support.fakes import FakeGraph, FakeModel
from tests.support.system import System

pytestmark = pytest.mark.e2e


@pytest.fixture
async def console(start_system: StartSystem) -> AsyncIterator[System]:
    system = await start_system()
    await system.start_console()
    add_operator(system, "ada", "admin")
    add_operator(system, "vic", "viewer")
    add_operator(system, "lim", "admin", numbers=NUMBER_A)
    yield system


async def wait_for(check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not met"
        await asyncio.sleep(0.2)


async def test_no_page_or_action_without_a_session(console: System) -> None:
    async with httpx.AsyncClient(base_url=console.console_url) as anon:
        for path in ("/", "/conversations", "/conversations/1", "/dlq", "/audit", "/handoffs"):
            resp = await anon.get(path)
            assert resp.status_code == 303 and resp.headers["location"] == "/login", path
        for path in ("/dlq/dry-run", "/dlq/run", "/logout"):
            resp = await anon.post(path, data={"scope": "all", "action": "retry"})
            assert resp.status_code == 401, path
        # An htmx poll is told where to go instead of being redirected into a fragment.
        resp = await anon.get("/conversations", headers={"HX-Request": "true"})
        assert resp.status_code == 401 and resp.headers["hx-redirect"] == "/login"
        # A forged cookie is no session.
        anon.cookies.set("wa_console", "forged")
        assert (await anon.get("/")).status_code == 303


async def test_forms_without_the_csrf_token_are_refused(console: System) -> None:
    async with logged_in(console, "ada") as (client, token):
        for data in ({}, {"csrf": "wrong"}):
            resp = await client.post("/dlq/dry-run", data={**data, "scope": "all"})
            assert resp.status_code == 403, data
            assert "CSRF" in resp.text
        ok = await client.post("/dlq/dry-run", data={"csrf": token, "scope": "all"})
        assert ok.status_code == 200
        # The header htmx sends counts as the form field does.
        ok = await client.post(
            "/dlq/dry-run", data={"scope": "all"}, headers={"X-CSRF-Token": token}
        )
        assert ok.status_code == 200
        # Logging out needs it too.
        assert (await client.post("/logout")).status_code == 403
    # The login form has its own (double-submit) token.
    async with httpx.AsyncClient(base_url=console.console_url) as anon:
        resp = await anon.post("/login", data={"name": "ada", "password": PASSWORD})
        assert resp.status_code == 403


async def test_cookies_are_httponly_strict_and_pages_forbid_framing(console: System) -> None:
    async with httpx.AsyncClient(base_url=console.console_url) as client:
        page = await client.get("/login")
        resp = await client.post(
            "/login", data={"csrf": csrf_of(page.text), "name": "ada", "password": PASSWORD}
        )
    cookie = resp.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie
    # Plain http on loopback (make run): no Secure, said in README; elsewhere Secure.
    assert "Secure" not in cookie
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


async def test_a_viewer_sees_but_cannot_act(console: System) -> None:
    async with logged_in(console, "vic") as (client, token):
        for path in ("/", "/conversations", "/audit", "/handoffs"):
            assert (await client.get(path)).status_code == 200, path
        overview = (await client.get("/")).text
        for component in ("postgres", "redis", "state", "agent", "dlq", "gateway"):
            assert re.search(rf"<td>{component}</td><td class=\"ok\">healthy", overview), component
        page = await client.get("/dlq")
        assert page.status_code == 200
        assert "cannot retry or purge" in page.text
        for path in ("/dlq/dry-run", "/dlq/run"):
            resp = await client.post(path, data={"csrf": token, "scope": "all"})
            assert resp.status_code == 403, path
            assert "viewer cannot act" in resp.text
    pool = await console.db()
    assert (
        await pool.fetchval("SELECT count(*) FROM wa_console_audit WHERE action LIKE 'dlq%'") == 0
    )


async def test_five_failed_logins_lock_the_name_even_for_the_right_password(
    console: System,
) -> None:
    refused = "wrong name or password, or too many failed logins"
    for _ in range(5):
        client, resp = await login(console, "ada", "not the password")
        await client.aclose()
        assert resp.status_code == 401 and refused in resp.text
    client, resp = await login(console, "ada", PASSWORD)
    await client.aclose()
    assert resp.status_code == 401 and refused in resp.text
    # Said as a name that is no operator's is: the lock-out does not tell who is one.
    for _ in range(7):
        client, unknown = await login(console, "nobody-here", "not the password")
        await client.aclose()
        assert unknown.status_code == 401
    assert _message(unknown.text) == _message(resp.text) and refused in _message(resp.text)
    # Another name is not locked; the lock-out is in the audit trail.
    client, resp = await login(console, "vic", PASSWORD)
    await client.aclose()
    assert resp.status_code == 303
    pool = await console.db()
    assert await pool.fetchval(
        "SELECT count(*) FROM wa_console_audit WHERE action = 'locked out' AND operator = 'ada'"
    )


def _message(page: str) -> str:
    """The login page's error line."""
    found = re.search(r'class="error"[^>]*>([^<]*)<', page)
    assert found, page
    return found.group(1)


async def test_malformed_values_are_refused_with_a_400_never_a_500(console: System) -> None:
    """What PostgreSQL cannot take (a NUL, an id past bigint, a span past any date) is the
    request's fault: a 400 with the page's usual headers, and the next request on the same
    connection is served."""
    huge = "99999999999999999999"
    async with logged_in(console, "ada") as (client, token):
        for path in (
            f"/conversations/{huge}",
            f"/conversations/{huge}/live",
            f"/conversations?before=2020-01-01_{huge}",
            "/conversations?q=%00",
            "/conversations?agent=%00",
            "/dlq?error_class=%00",
        ):
            resp = await client.get(path)
            assert resp.status_code == 400, (path, resp.status_code)
            assert resp.headers["x-frame-options"] == "DENY"
        for path in ("/conversations?hours=1e12", "/conversations?hours=inf", "/dlq?hours=1e300"):
            assert (await client.get(path)).status_code == 200, path
        for data in (
            {"ids": huge, "action": "retry"},
            {"scope": "all", "hours": "1e300", "action": "retry"},
            {"scope": "all", "error_class": "\x00", "action": "retry"},
        ):
            resp = await client.post("/dlq/dry-run", data={"csrf": token, **data})
            assert resp.status_code in (200, 400), (data, resp.status_code)
        resp = await client.post(f"/conversations/{huge}/take-over", data={"csrf": token})
        assert resp.status_code in (400, 404), resp.status_code
        assert (await client.get("/")).status_code == 200


async def test_what_an_operator_sees_is_its_own_and_shown_as_typed(console: System) -> None:
    """The database's checks count every number's messages: not for an operator of one. A
    customer's right-to-left override is shown as what it is. A search for % finds a %. More
    dead letters than a page lists say so."""
    name = "Eve\u202eevil"
    msg = payloads.message("text", wa_id="15550009191")
    doc = delivery_to(NUMBER_A, [msg])
    doc["entry"][0]["changes"][0]["value"]["contacts"][0]["profile"]["name"] = name
    await console.deliver(doc)
    await console.wait_status([msg["id"]], {"replied"})
    pool = await console.db()
    cid = await pool.fetchval("SELECT id FROM webhook_conversations WHERE wa_id = '15550009191'")
    await pool.execute(
        "INSERT INTO webhook_dlq (message_id, conversation_id, error_class, status)"
        " SELECT 'wamid.many-' || n, $1, 'ModelHTTP500', 'dead' FROM generate_series(1, 101) n",
        cid,
    )
    async with logged_in(console, "ada") as (client, _):
        assert "dlq_dead" in (await client.get("/")).text
        page = (await client.get(f"/conversations/{cid}")).text
        assert "Eve&lt;U+202E&gt;evil" in page and "\u202e" not in page
        assert "15550009191" not in (await client.get("/conversations?q=%25")).text
        assert "The newest 100 are shown" in (await client.get("/dlq")).text
        # A message's dead letter is linked as itself, not as the whole list.
        own = await pool.fetchval(
            "INSERT INTO webhook_dlq (message_id, conversation_id, error_class, status)"
            " VALUES ($1, $2, 'ModelHTTP500', 'dead') RETURNING id",
            msg["id"],
            cid,
        )
        page = (await client.get(f"/conversations/{cid}/live")).text
        link = re.search(r'href="(/dlq\?message=[^"]+)">dead letter (\d+)<', page)
        assert link and int(link.group(2)) == own, page
        listed = (await client.get(link.group(1).replace("&amp;", "&"))).text
        assert re.findall(r'name="ids" value="(\d+)"', listed) == [str(own)]
    async with logged_in(console, "lim") as (client, _):
        overview = (await client.get("/")).text
        assert "dlq_dead" not in overview and "operators of every number only" in overview


async def test_an_action_while_the_state_service_is_down_is_a_503_in_plain_words(
    console: System,
) -> None:
    msg = payloads.message("text", wa_id="15550009292")
    await console.deliver(delivery_to(NUMBER_A, [msg]))
    await console.wait_status([msg["id"]], {"replied"})
    pool = await console.db()
    cid = await pool.fetchval("SELECT id FROM webhook_conversations WHERE wa_id = '15550009292'")
    await console.sup.stop(["state"])
    async with logged_in(console, "ada") as (client, token):
        resp = await client.post(f"/conversations/{cid}/take-over", data={"csrf": token})
        assert resp.status_code == 503, resp.status_code
        assert "the state service did not answer: try again shortly" in resp.text
        assert "connections to all backends" not in resp.text
    # The trail says that it was tried, and that it failed.
    actions = await pool.fetch(
        "SELECT action, detail FROM wa_console_audit WHERE target = $1 ORDER BY id",
        f"conversation {cid}",
    )
    assert [a["action"] for a in actions] == ["take-over", "take-over failed"]
    assert "did not answer" in json.loads(actions[1]["detail"])["error"]


async def test_an_operator_limited_to_one_number_cannot_open_anothers_conversation(
    console: System,
) -> None:
    mine = payloads.message("text", wa_id="15550002001", text={"body": "number A"})
    theirs = payloads.message("text", wa_id="15550002002", text={"body": "number B"})
    await console.deliver(delivery_to(NUMBER_A, [mine]))
    await console.deliver(delivery_to(NUMBER_B, [theirs]))
    await console.wait_status([mine["id"], theirs["id"]], {"replied"})
    pool = await console.db()
    ids = {
        r["phone_number_id"]: r["id"]
        for r in await pool.fetch("SELECT id, phone_number_id FROM webhook_conversations")
    }
    async with logged_in(console, "lim") as (client, _):
        assert (await client.get(f"/conversations/{ids[NUMBER_A]}")).status_code == 200
        other = await client.get(f"/conversations/{ids[NUMBER_B]}")
        assert other.status_code == 404
        assert "number B" not in other.text
        listed = await client.get("/conversations")
        assert "15550002001" in listed.text and "15550002002" not in listed.text
        # Searching for it by phone finds nothing either.
        found = await client.get("/conversations", params={"q": "15550002002"})
        assert "No conversation matches" in found.text
    async with logged_in(console, "ada") as (client, _):
        assert (await client.get(f"/conversations/{ids[NUMBER_B]}")).status_code == 200
        assert "<td>lim</td>" in (await client.get("/audit")).text
    # The audit trail too: a limited operator sees its own actions, not another's login.
    async with logged_in(console, "lim") as (client, _):
        audit = (await client.get("/audit")).text
        assert "<td>lim</td>" in audit and "<td>ada</td>" not in audit

    # Enforced by the database, not only by the pages: the same query as the console's
    # role, naming the limited operator, returns nothing of the other number.
    conn = await asyncpg.connect(console.env[roles.VARIABLES["operator"]])
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('wa.console_operator', 'lim', true)")
            seen = await conn.fetch(
                "SELECT c.id FROM webhook_conversations c WHERE c.id = $1", ids[NUMBER_B]
            )
            messages = await conn.fetch(
                "SELECT message_id FROM processed_webhook_messages WHERE phone_number_id = $1",
                NUMBER_B,
            )
            assert seen == [] and messages == []
            assert await conn.fetchval(
                "SELECT count(*) FROM webhook_conversations WHERE id = $1", ids[NUMBER_A]
            )
        async with conn.transaction():
            # An operator name the console does not know sees nothing at all.
            await conn.execute("SELECT set_config('wa.console_operator', 'nobody', true)")
            assert await conn.fetchval("SELECT count(*) FROM webhook_conversations") == 0
    finally:
        await conn.close()


async def test_an_admin_bulk_retries_after_the_dry_run_count_and_it_is_audited(
    start_system: StartSystem, model: FakeModel
) -> None:
    model.down = True
    system = await start_system(
        **model.env(
            DLQ_MAX_ATTEMPTS="1",
            AGENT_MAX_RETRIES="0",
            DLQ_POLL_SECONDS="0.2",
            AGENT_BREAKER_THRESHOLD="100",
        )
    )
    await system.start_console()
    add_operator(system, "ada", "admin")
    msgs = [
        payloads.message("text", wa_id=f"1555000300{i}", text={"body": f"fail {i}"})
        for i in range(3)
    ]
    for m in msgs:
        await system.deliver(delivery_to(NUMBER_A, [m]))
    await system.wait_status([m["id"] for m in msgs], {"dead_lettered"}, timeout=60)
    pool = await system.db()

    async def all_dead() -> bool:
        n = await pool.fetchval("SELECT count(*) FROM webhook_dlq WHERE status = 'dead'")
        return bool(n == 3)

    await wait_for(all_dead, timeout=60)
    model.down = False
    purged_message = await pool.fetchval("SELECT message_id FROM webhook_dlq ORDER BY id LIMIT 1")
    first_id = await pool.fetchval("SELECT min(id) FROM webhook_dlq")
    async with logged_in(system, "ada") as (client, token):

        async def bulk(action: str, form: dict[str, Any], count: int) -> None:
            """Dry run (its count checked), then the run, followed to its end."""
            dry = await client.post("/dlq/dry-run", data={"csrf": token, "action": action, **form})
            assert re.search(rf'class="count">{count}<', dry.text), dry.text
            ids = re.findall(r'name="ids" value="(\d+)"', dry.text)
            run = await client.post("/dlq/run", data={"csrf": token, "action": action, "ids": ids})
            assert run.status_code == 200
            job = re.search(r"/dlq/jobs/(\d+)", run.text)
            if job:  # still running: its progress page says when it is done

                async def finished() -> bool:
                    page = await client.get(f"/dlq/jobs/{job.group(1)}")
                    return 'class="finished"' in page.text

                await wait_for(finished)

        # One ticked item purged; then every other matching item retried.
        await bulk("purge", {"scope": "selected", "ids": str(first_id)}, 1)
        await bulk("retry", {"scope": "all"}, 2)
        rest = [m["id"] for m in msgs if m["id"] != purged_message]
        await system.wait_status(rest, {"replied"}, timeout=60)
        assert (await system.statuses())[purged_message] == "dead_lettered"
        assert await pool.fetchval("SELECT status FROM webhook_dlq WHERE id = $1", first_id) == (
            "purged"
        )
        audit = await client.get("/audit")
        assert "dlq retry" in audit.text and "2 item(s)" in audit.text
        assert "dlq purge" in audit.text and "1 item(s)" in audit.text


async def test_conversations_are_paged_by_keyset_and_filtered(console: System) -> None:
    msgs = [
        payloads.message("text", wa_id=f"155500070{i:02d}", text={"body": f"page {i}"})
        for i in range(55)
    ]
    await console.deliver(delivery_to(NUMBER_A, msgs))
    await console.wait_status([m["id"] for m in msgs], {"replied"}, timeout=120)
    async with logged_in(console, "ada") as (client, _):
        first = await client.get("/conversations")
        shown = set(re.findall(r"\+(155500070\d\d)", first.text))
        assert len(shown) == 50
        older = re.search(r'href="(/conversations\?[^"]*before=[^"]+)"', first.text)
        assert older, "a link to the next page"
        second = await client.get(older.group(1).replace("&amp;", "&"))
        rest = set(re.findall(r"\+(155500070\d\d)", second.text))
        assert len(rest) == 5 and not rest & shown
        assert "before=" not in second.text, "the last page links to no further one"
        assert 'rel="first"' not in first.text
        newest = re.search(r'href="([^"]*)" rel="first"', second.text)
        assert newest and newest.group(1) == "/conversations?", "a link back to the newest"
        filtered = await client.get(older.group(1).replace("&amp;", "&") + "&q=1555")
        back = re.search(r'href="([^"]*)" rel="first"', filtered.text)
        assert back and back.group(1) == "/conversations?q=1555", "with the same filters"
        active = await client.get("/conversations", params={"state": "active", "q": "1555"})
        assert "No conversation matches" in active.text  # all replied: idle again
        other = await client.get("/conversations", params={"number": NUMBER_B})
        assert "No conversation matches" in other.text


async def test_wa_operator_add_stores_only_a_scrypt_hash_and_refuses_weak_passwords(
    console: System,
) -> None:
    add = ("add", "sam", "--role", "viewer", "--password-stdin")
    weak = await asyncio.to_thread(wa_operator, console, *add, stdin="short\n", password=None)
    assert weak.returncode == 2 and "at least 12 characters" in weak.stderr
    done = await asyncio.to_thread(wa_operator, console, *add, stdin=f"{PASSWORD}\n", password=None)
    assert done.returncode == 0, done.stderr
    assert "sees every business number" in done.stdout
    pool = await console.db()
    stored = await pool.fetchval(
        "SELECT password_hash FROM wa_console_operators WHERE name = 'sam'"
    )
    assert stored.startswith("scrypt$32768$8$1$") and PASSWORD not in stored
    client, resp = await login(console, "sam")
    try:
        assert resp.status_code == 303
        assert (await client.get("/")).status_code == 200
        # Adding it again (a new password, role or numbers) ends its open sessions.
        again = await asyncio.to_thread(wa_operator, console, "add", "sam", "--role", "admin")
        assert again.returncode == 0, again.stderr
        assert (await client.get("/")).headers.get("location") == "/login"
    finally:
        await client.aclose()


async def test_wa_operator_list_and_remove(console: System) -> None:
    listed = await asyncio.to_thread(wa_operator, console, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["name"]: r for r in json.loads(listed.stdout)}
    assert rows["lim"]["numbers"] == [NUMBER_A] and rows["vic"]["role"] == "viewer"
    assert rows["ada"]["numbers"] == [] and not rows["ada"]["locked"]
    async with logged_in(console, "vic") as (client, _):
        gone = await asyncio.to_thread(wa_operator, console, "remove", "vic")
        assert gone.returncode == 0, gone.stderr
        assert (await client.get("/")).headers.get("location") == "/login"
    again = await asyncio.to_thread(wa_operator, console, "remove", "vic")
    assert again.returncode == 1 and "no operator vic" in again.stderr
    client, resp = await login(console, "vic")
    await client.aclose()
    assert resp.status_code == 401


async def test_take_over_answer_once_and_release_through_the_services(
    console: System, graph: FakeGraph
) -> None:
    first = payloads.message("text", wa_id="15550008001", text={"body": "I need a human"})
    await console.deliver(delivery_to(NUMBER_A, [first]))
    await console.wait_status([first["id"]], {"replied"})
    pool = await console.db()
    cid = await pool.fetchval("SELECT id FROM webhook_conversations WHERE wa_id = '15550008001'")
    bot_sends = len(graph.sends)
    async with logged_in(console, "vic") as (client, token):
        refused = await client.post(f"/conversations/{cid}/take-over", data={"csrf": token})
        assert refused.status_code == 403
    async with logged_in(console, "lim") as (client, token):
        other = await client.post(f"/conversations/{cid + 1000}/take-over", data={"csrf": token})
        assert other.status_code == 404
    async with logged_in(console, "ada") as (client, token):
        taken = await client.post(f"/conversations/{cid}/take-over", data={"csrf": token})
        assert taken.status_code == 303, taken.text
        page = await client.get("/handoffs")
        assert "+15550008001" in page.text and "Waiting for a person" in page.text
        key = re.search(r'name="key" value="([^"]+)"', page.text)
        assert key
        form = {"csrf": token, "key": key.group(1), "text": "Hi, Ada here.", "back": "handoffs"}
        # The same form sent twice (a double click, a retried request) sends once.
        for _ in range(2):
            sent = await client.post(f"/conversations/{cid}/reply", data=form)
            assert sent.status_code == 303, sent.text
        assert [s.body["text"]["body"] for s in graph.sends[bot_sends:]] == ["Hi, Ada here."]
        released = await client.post(
            f"/conversations/{cid}/release", data={"csrf": token, "back": "handoffs"}
        )
        assert released.status_code == 303, released.text
        assert "Nobody is waiting" in (await client.get("/handoffs")).text
        audit = (await client.get("/audit")).text
        for action in ("take-over", "reply", "release"):
            assert f"<td>{action}</td>" in audit, action
    # The trail names the reply by its key (both requests: it records what was asked); its
    # text, the customer's data, is only with the reply, which retention and `wa forget` delete.
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM wa_console_audit a WHERE a::text LIKE '%Ada here%'"
        )
        == 0
    )
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM wa_console_audit WHERE action = 'reply'"
            " AND jsonb_typeof(detail) = 'object' AND detail->>'key' = $1",
            key.group(1),
        )
        == 2
    )
