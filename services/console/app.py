"""The console's pages and actions (Starlette, Jinja2 templates, htmx).

Every page but /login, /healthz and /static needs a session; every POST needs the session's
CSRF token (a form field `csrf`, or the `X-CSRF-Token` header htmx sends); every action needs
the admin role. Reads go through store.as_operator (row level security per operator); actions
go through the services' gRPC APIs (actions.py) and are recorded in the audit trail first.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import math
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from common import db

from . import actions, charts, operators, store
from .settings import ConsoleSettings

log = logging.getLogger("services.console")

HERE = Path(__file__).parent
COOKIE = "wa_console"
LOGIN_COOKIE = "wa_console_login"  # the login form's CSRF token (double submit)
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
TICKS = {"sent": "✓", "delivered": "✓✓", "read": "✓✓", "failed": "✗"}

templates = Jinja2Templates(directory=str(HERE / "templates"))
templates.env.globals["ticks"] = TICKS
# Bidirectional overrides and isolates a customer typed (U+202E reverses what follows it):
# shown as what they are, so that no text a customer wrote can disguise what comes after it.
BIDI_CONTROLS = {c: f"<U+{c:04X}>" for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A))}
templates.env.filters["shown"] = lambda text: str(text).translate(BIDI_CONTROLS) if text else text


class NotLoggedIn(Exception):
    pass


def _plain_loopback(request: Request) -> bool:
    """Plain http from this machine (`make run`): a browser keeps no Secure cookie from an
    http origin other than localhost, and test clients none at all, so only there is the
    cookie sent without Secure. Anything else (https, or a proxy in front) gets Secure."""
    if request.url.scheme == "https" or request.client is None:
        return False
    try:
        return ipaddress.ip_address(request.client.host).is_loopback
    except ValueError:
        return False


def _cookie(response: Response, request: Request, name: str, value: str, max_age: int) -> None:
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        httponly=True,
        secure=not _plain_loopback(request),
        samesite="strict",
        path="/",
    )


def _pool(request: Request) -> asyncpg.Pool:
    pool: asyncpg.Pool = request.app.state.pool
    return pool


async def _session(request: Request) -> operators.Session:
    token = request.cookies.get(COOKIE, "")
    async with _pool(request).acquire() as conn:
        sess = await operators.session(conn, token)
    if sess is None:
        raise NotLoggedIn
    return sess


async def _form(request: Request, sess: operators.Session, *, act: bool) -> FormData:
    """The POST's form once its CSRF token matches (and, for an action, the role allows it)."""
    form = await request.form()
    given = request.headers.get("x-csrf-token") or str(form.get("csrf", ""))
    if not operators.csrf_ok(sess.csrf_token, given):
        raise HTTPException(403, "CSRF token missing or wrong: reload the page")
    if act and not sess.operator.may_act:
        raise HTTPException(403, "a viewer cannot act: ask an admin")
    return form


def _page(request: Request, name: str, sess: operators.Session | None, **ctx: Any) -> Response:
    settings: ConsoleSettings = request.app.state.settings
    return templates.TemplateResponse(
        request,
        name,
        {"session": sess, "jaeger": settings.jaeger_ui_url.rstrip("/"), **ctx},
    )


def _htmx(request: Request) -> bool:
    return request.headers.get("hx-request") == "true"


# -- login -----------------------------------------------------------------------------------


async def login_page(request: Request) -> Response:
    token = secrets.token_urlsafe(24)
    resp = _page(request, "login.html", None, login_csrf=token, error="")
    _cookie(resp, request, LOGIN_COOKIE, token, 600)
    return resp


LOGIN_REFUSED = "wrong name or password, or too many failed logins: try again in a few minutes"


async def login(request: Request) -> Response:
    settings: ConsoleSettings = request.app.state.settings
    form = await request.form()
    expected = request.cookies.get(LOGIN_COOKIE, "")
    if not expected or not operators.csrf_ok(expected, str(form.get("csrf", ""))):
        raise HTTPException(403, "CSRF token missing or wrong: reload the login page")
    name = str(form.get("name", "")).strip()
    password = str(form.get("password", ""))
    # One answer for a wrong name, a wrong password and a locked name: a lock-out said as
    # such told anyone at the login page which names are operators'.
    error = LOGIN_REFUSED
    token = None
    async with _pool(request).acquire() as conn:
        try:
            token = await operators.login(
                conn,
                name,
                password,
                max_failures=settings.max_failed_logins,
                window=datetime.timedelta(minutes=settings.lockout_minutes),
                session_ttl=datetime.timedelta(hours=settings.session_hours),
            )
        except operators.LockedOut as exc:
            log.info("console login refused: the name is locked", extra={"until": str(exc)})
        if token is not None:
            await operators.record(conn, name, "login", name)
    if token is None:
        log.info("console login refused", extra={"operator": name})
        new = secrets.token_urlsafe(24)
        resp = _page(request, "login.html", None, login_csrf=new, error=error)
        resp.status_code = 401
        _cookie(resp, request, LOGIN_COOKIE, new, 600)
        return resp
    resp = RedirectResponse("/", status_code=303)
    _cookie(resp, request, COOKIE, token, int(settings.session_hours * 3600))
    resp.delete_cookie(LOGIN_COOKIE, path="/")
    return resp


async def logout(request: Request) -> Response:
    sess = await _session(request)
    await _form(request, sess, act=False)
    async with _pool(request).acquire() as conn:
        await operators.logout(conn, request.cookies.get(COOKIE, ""))
        await operators.record(conn, sess.operator.name, "logout", sess.operator.name)
    resp = RedirectResponse("/login", status_code=303)
    resp.delete_cookie(COOKIE, path="/")
    return resp


# -- pages -----------------------------------------------------------------------------------


async def overview(request: Request) -> Response:
    sess = await _session(request)
    settings: ConsoleSettings = request.app.state.settings
    async with store.as_operator(_pool(request), sess.operator.name) as conn:
        data = await store.overview(conn)
        audit = await store.audit(conn, limit=10)
    components, checks = await actions.health(settings, settings.gateway_url)
    if sess.operator.numbers:
        # The database's checks count every business number's messages and dead letters: an
        # operator limited to some numbers sees its own figures above, not those.
        checks = []
    ctx = {
        "data": data,
        "components": components,
        "checks": checks,
        "checks_limited": bool(sess.operator.numbers),
        "audit": audit,
        "rate_chart": charts.bars(data["per_minute"], "messages per minute, last hour"),
        "p95_chart": charts.bars(
            data["p95"], "acknowledged-to-reply p95 per 5 minutes, last hour", " s"
        ),
        "now": datetime.datetime.now(datetime.UTC),
    }
    name = "overview_body.html" if _htmx(request) else "overview.html"
    return _page(request, name, sess, **ctx)


# The longest span of hours a filter takes: ten years (beyond, PostgreSQL's intervals and
# dates overflow).
MAX_HOURS = 24 * 3660.0


def _float(value: str) -> float:
    try:
        hours = float(value)
    except ValueError:
        return 0.0
    return min(max(0.0, hours), MAX_HOURS) if math.isfinite(hours) else 0.0


async def conversations(request: Request) -> Response:
    sess = await _session(request)
    q = request.query_params
    before_at = None
    before_id = 0
    if q.get("before"):
        at, _, ident = q["before"].partition("_")
        try:
            before_at = datetime.datetime.fromisoformat(at)
            before_id = int(ident)
        except ValueError:
            raise HTTPException(400, "bad page cursor") from None
    f = store.ConversationFilter(
        q=q.get("q", "")[:100],
        state=q.get("state", "") if q.get("state") in ("idle", "active") else "",
        agent_type=q.get("agent", "")[:64],
        number=q.get("number", "")[:64],
        since_hours=_float(q.get("hours", "")),
        before_at=before_at,
        before_id=before_id,
    )
    async with store.as_operator(_pool(request), sess.operator.name) as conn:
        rows = await store.conversations(conn, f)
        choices = await store.filter_choices(conn)
    more = len(rows) > store.PAGE
    rows = rows[: store.PAGE]
    next_cursor = ""
    if more:
        last = rows[-1]
        next_cursor = f"{last['last_activity_at'].isoformat()}_{last['id']}"
    params = {k: v for k, v in q.items() if k != "before" and v}
    name = "conversations_rows.html" if _htmx(request) else "conversations.html"
    return _page(
        request,
        name,
        sess,
        rows=rows,
        f=f,
        choices=choices,
        next_cursor=next_cursor,
        params=params,
        first_page=before_at is None,
    )


async def _conversation_data(request: Request, sess: operators.Session) -> dict[str, Any]:
    try:
        conversation_id = int(request.path_params["cid"])
    except ValueError:
        raise HTTPException(404, "no such conversation") from None
    async with store.as_operator(_pool(request), sess.operator.name) as conn:
        conv = await store.conversation(conn, conversation_id)
        if conv is None:
            # Another number's conversation is as absent as one that never was.
            raise HTTPException(404, "no such conversation")
        msgs = await store.messages(conn, conversation_id)
        answers = await store.operator_replies(conn, conversation_id)
        trans = await store.transitions(conn, conversation_id)
    # One thread: customers' messages (with the bot's replies) and operators' answers by time.
    chat = [{"kind": "in", "at": m["received_at"], "m": m} for m in msgs]
    chat += [{"kind": "op", "at": a["created_at"], "m": a} for a in answers]
    chat.sort(key=lambda item: item["at"])
    return {"conv": conv, "chat": chat, "transitions": trans}


def trace_id(traceparent: str) -> str:
    parts = traceparent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else ""


templates.env.globals["trace_id"] = trace_id


async def conversation(request: Request) -> Response:
    sess = await _session(request)
    data = await _conversation_data(request, sess)
    return _page(request, "conversation.html", sess, **data)


async def conversation_live(request: Request) -> Response:
    sess = await _session(request)
    data = await _conversation_data(request, sess)
    return _page(request, "conversation_live.html", sess, **data)


def _dlq_filter(params: Any) -> store.DlqFilter:
    status = params.get("status", "")
    return store.DlqFilter(
        status=status if status in (*store.OPEN_DLQ, "resolved", "purged") else "",
        error_class=str(params.get("error_class", ""))[:200],
        since_hours=_float(str(params.get("hours", ""))),
        message_id=str(params.get("message", ""))[:256],
    )


async def dlq(request: Request) -> Response:
    sess = await _session(request)
    f = _dlq_filter(request.query_params)
    async with store.as_operator(_pool(request), sess.operator.name) as conn:
        items = await store.dlq_items(conn, f)
        choices = await store.filter_choices(conn)
        audit = await store.audit(conn, limit=10)
    name = "dlq_rows.html" if _htmx(request) else "dlq.html"
    # A poll sends the ticked items along (hx-include): they stay ticked in the new rows.
    ticked = set(request.query_params.getlist("ids"))
    params = {k: v for k, v in request.query_params.items() if k != "ids" and v}
    return _page(
        request,
        name,
        sess,
        items=items,
        shown_max=store.DLQ_SHOWN,
        f=f,
        choices=choices,
        audit=audit,
        ticked=ticked,
        params=params,
    )


async def _selected(conn: Any, form: FormData) -> list[int]:
    """The ids a bulk action means: every item matching the filter (`scope=all`), or those
    ticked; either way only those the operator may see (row level security)."""
    if form.get("scope") == "all":
        return await store.dlq_matching_ids(conn, _dlq_filter(form))
    ids = []
    for value in form.getlist("ids"):
        with contextlib.suppress(ValueError):
            ids.append(int(str(value)))
    return await store.visible_dlq_ids(conn, ids[: store.BULK_MAX])


async def dlq_dry_run(request: Request) -> Response:
    sess = await _session(request)
    form = await _form(request, sess, act=True)
    action = "purge" if form.get("action") == "purge" else "retry"
    async with store.as_operator(_pool(request), sess.operator.name) as conn:
        ids = await _selected(conn, form)
    return _page(
        request,
        "dlq_confirm.html",
        sess,
        ids=ids,
        action=action,
        capped=len(ids) >= store.BULK_MAX,
    )


async def dlq_run(request: Request) -> Response:
    sess = await _session(request)
    form = await _form(request, sess, act=True)
    action = "purge" if form.get("action") == "purge" else "retry"
    settings: ConsoleSettings = request.app.state.settings
    async with store.as_operator(_pool(request), sess.operator.name) as conn:
        ids = await _selected(conn, form)
        numbers = await conn.fetch(
            "SELECT c.phone_number_id, array_agg(d.id ORDER BY d.id) AS ids FROM webhook_dlq d "
            "LEFT JOIN webhook_conversations c ON c.id = d.conversation_id "
            "WHERE d.id = ANY($1::bigint[]) GROUP BY 1",
            ids,
        )
        # Recorded before it runs: an action cut short by a crash is still in the trail.
        for row in numbers:
            await operators.record(
                conn,
                sess.operator.name,
                f"dlq {action}",
                f"{len(row['ids'])} item(s)",
                row["phone_number_id"],
                {"ids": list(row["ids"])},
            )
    jobs: actions.Jobs = request.app.state.jobs
    job = jobs.start(settings, action, sess.operator.name, ids)
    return _page(request, "dlq_job.html", sess, job=job)


async def dlq_job(request: Request) -> Response:
    sess = await _session(request)
    jobs: actions.Jobs = request.app.state.jobs
    job = jobs.get(int(request.path_params["jid"]))
    if job is None or job.operator != sess.operator.name:
        raise HTTPException(404, "no such job")
    return _page(request, "dlq_job.html", sess, job=job)


async def audit(request: Request) -> Response:
    sess = await _session(request)
    async with store.as_operator(_pool(request), sess.operator.name) as conn:
        rows = await store.audit(conn, limit=200)
    return _page(request, "audit.html", sess, audit=rows)


async def handoffs(request: Request) -> Response:
    sess = await _session(request)
    async with store.as_operator(_pool(request), sess.operator.name) as conn:
        rows = await store.handoffs(conn)
    name = "handoffs_list.html" if _htmx(request) else "handoffs.html"
    return _page(request, name, sess, handoffs=rows, new_key=_new_key)


def _new_key() -> str:
    """A reply form's idempotency key: submitting the same form twice sends once."""
    return secrets.token_urlsafe(16)


templates.env.globals["new_key"] = _new_key


async def handoff_action(request: Request) -> Response:
    """Take over, release or answer a conversation, through the state and agent services.
    The conversation is looked up as the operator first: another number's is not found."""
    sess = await _session(request)
    form = await _form(request, sess, act=True)
    settings: ConsoleSettings = request.app.state.settings
    action = request.path_params["action"]
    if action not in ("take-over", "release", "reply"):
        raise HTTPException(404, "no such action")
    async with store.as_operator(_pool(request), sess.operator.name) as conn:
        conv = await store.conversation(conn, int(request.path_params["cid"]))
        if conv is None:
            raise HTTPException(404, "no such conversation")
        text = str(form.get("text", "")).strip()
        if action == "reply" and not text:
            raise HTTPException(400, "write an answer first")
        key = str(form.get("key", "")) or _new_key()
        # The reply's key, not its text: the text is the customer's data, kept with the reply
        # (operator_replies), which retention and `wa forget` delete; the trail is kept.
        detail = {"key": key} if action == "reply" else {}
        await operators.record(
            conn,
            sess.operator.name,
            action,
            f"conversation {conv['id']}",
            conv["phone_number_id"],
            detail,
        )
    who = sess.operator.name
    try:
        if action == "take-over":
            await actions.take_over(settings, conv, who)
        elif action == "release":
            await actions.release(settings, conv, who)
        else:
            await actions.reply(settings, conv, text, key, who)
    except actions.Refused as exc:
        # The attempt is in the trail already (above, before it was made); so is its failure.
        async with store.as_operator(_pool(request), sess.operator.name) as conn:
            await operators.record(
                conn,
                sess.operator.name,
                f"{action} failed",
                f"conversation {conv['id']}",
                conv["phone_number_id"],
                {"error": str(exc)[:500], **detail},
            )
        if exc.down:
            raise HTTPException(503, f"{action} not done: {exc}") from None
        raise HTTPException(409, f"{action} refused: {exc}") from None
    back = str(form.get("back", ""))
    target = "/handoffs" if back == "handoffs" else f"/conversations/{conv['id']}"
    if _htmx(request):
        resp: Response = PlainTextResponse("done")
        resp.headers["HX-Redirect"] = target
        return resp
    return RedirectResponse(target, status_code=303)


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok")


# -- errors ----------------------------------------------------------------------------------


async def _not_logged_in(request: Request, exc: Exception) -> Response:
    if request.method != "GET" or _htmx(request):
        resp: Response = PlainTextResponse("log in first", status_code=401)
        resp.headers["HX-Redirect"] = "/login"
        return resp
    return RedirectResponse("/login", status_code=303)


async def _bad_value(request: Request, exc: Exception) -> Response:
    """A value PostgreSQL cannot take (a NUL character, an id past bigint, a span of hours
    past any date): the request is wrong, not the console."""
    return await _http_error(
        request, HTTPException(400, "a value in the request cannot be used: " + str(exc)[:200])
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if _htmx(request):
        return PlainTextResponse(exc.detail, status_code=exc.status_code)
    resp = _page(request, "error.html", None, status=exc.status_code, detail=exc.detail)
    resp.status_code = exc.status_code
    return resp


class SecurityHeaders:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                for key, value in SECURITY_HEADERS.items():
                    if key.lower().encode() not in present:
                        headers.append((key.lower().encode(), value.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def create_app(settings: ConsoleSettings) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.pool = await db.create_pool(
            settings.require_database(),
            min_size=1,
            max_size=settings.pool_size("console"),
            application_name="wa-console",
        )
        app.state.jobs = actions.Jobs()
        try:
            yield
        finally:
            await app.state.jobs.close()
            await app.state.pool.close()

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/login", login_page, methods=["GET"]),
            Route("/login", login, methods=["POST"]),
            Route("/logout", logout, methods=["POST"]),
            Route("/", overview),
            Route("/conversations", conversations),
            Route("/conversations/{cid}", conversation),
            Route("/conversations/{cid}/live", conversation_live),
            Route("/dlq", dlq),
            Route("/dlq/dry-run", dlq_dry_run, methods=["POST"]),
            Route("/dlq/run", dlq_run, methods=["POST"]),
            Route("/dlq/jobs/{jid:int}", dlq_job),
            Route("/audit", audit),
            Route("/handoffs", handoffs),
            Route(
                "/conversations/{cid:int}/{action:str}",
                handoff_action,
                methods=["POST"],
            ),
            Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
        ],
        exception_handlers={
            NotLoggedIn: _not_logged_in,
            HTTPException: _http_error,
            asyncpg.DataError: _bad_value,
        },
        lifespan=lifespan,
    )
    app.state.settings = settings
    return SecurityHeaders(app)
