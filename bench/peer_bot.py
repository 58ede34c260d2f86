"""The peer: a minimal pywa bot that answers each text message with one quoted text reply,
served the way pywa documents for production (`pywa run`: its own Starlette app on uvicorn),
with webhook signature validation on. `bench.peer` starts it as

    python -m pywa run --entrypoint bench.peer_bot:wa --port PORT [--workers N]

and configures it through the environment, which also reaches uvicorn's worker processes:

    PEER_GRAPH_URL     the Graph API stand-in (bench/graph.py), e.g. http://127.0.0.1:9000
    PEER_CLIENT        `sync` (pywa.WhatsApp, handlers in AnyIO's thread pool; pywa's default)
                       or `async` (pywa_async.WhatsApp, handlers on the event loop)
    PEER_THREADS       sync only: AnyIO's thread limit, i.e. handlers in flight (default: 40)
    PEER_CONNECTIONS   the httpx pool's connection limit (default: httpx's, 100)
    PEER_POOL_TIMEOUT  seconds a request may wait for a pooled connection, `none` for ever
                       (default: httpx's, 5 s, like its other timeouts)
    PEER_TYPING        `1`: mark each message read with a typing indicator before replying
                       (`Message.indicate_typing`), as our agent does (its mark_read)
    PEER_APP_SECRET, PEER_VERIFY_TOKEN, PEER_TOKEN, PEER_PHONE_ID

pywa has no setting for the Graph API's URL (it sets `https://graph.facebook.com/vX` as the
base URL of the httpx client it is given), so the bot hands it its own httpx client and points
that client's base URL at the stand-in afterwards, keeping pywa's path and version.

pywa is an optional extra (`uv sync --extra peer`), so it is imported only inside `_build`:
this module type-checks and imports without it.
"""

from __future__ import annotations

import functools
import os
from typing import Any
from urllib.parse import urlsplit

import httpx


def _limits() -> httpx.Limits:
    connections = os.environ.get("PEER_CONNECTIONS")
    if not connections:
        return httpx.Limits(max_connections=100, max_keepalive_connections=20)  # httpx's own
    return httpx.Limits(max_connections=int(connections), max_keepalive_connections=None)


def _timeout() -> httpx.Timeout:
    pool = os.environ.get("PEER_POOL_TIMEOUT")
    if not pool:
        return httpx.Timeout(5.0)  # httpx's own
    return httpx.Timeout(5.0, pool=None if pool == "none" else float(pool))


def _point_at_standin(session: httpx.Client | httpx.AsyncClient) -> None:
    graph = urlsplit(os.environ["PEER_GRAPH_URL"])
    session.base_url = session.base_url.copy_with(
        scheme=graph.scheme, host=graph.hostname, port=graph.port
    )


def _typing() -> bool:
    return os.environ.get("PEER_TYPING") == "1"


def _common() -> dict[str, Any]:
    return {
        "phone_id": os.environ.get("PEER_PHONE_ID", "100000000000001"),
        "token": os.environ.get("PEER_TOKEN", "test-access-token"),
        "app_secret": os.environ["PEER_APP_SECRET"],
        "verify_token": os.environ.get("PEER_VERIFY_TOKEN", "test-verify-token"),
        "validate_updates": True,
    }


def _build_sync() -> object:
    import pywa.server
    from pywa import WhatsApp, filters, handlers, types

    threads = os.environ.get("PEER_THREADS")
    if threads:
        # pywa's documented knob: its app's lifespan sets AnyIO's default thread limiter.
        pywa.server.ANYIO_THREADS_LIMIT = int(threads)
    session = httpx.Client(limits=_limits(), timeout=_timeout())
    wa = WhatsApp(session=session, **_common())
    _point_at_standin(session)

    typing = _typing()

    def echo(client: WhatsApp, msg: types.Message) -> None:
        if typing:
            msg.indicate_typing()
        msg.reply_text(f"echo: {msg.text}", quote=True)

    wa.add_handlers(handlers.MessageHandler(echo, filters.text))
    return wa


def _build_async() -> object:
    from pywa_async import WhatsApp, filters, handlers, types

    session = httpx.AsyncClient(limits=_limits(), timeout=_timeout())
    wa = WhatsApp(session=session, **_common())
    _point_at_standin(session)

    typing = _typing()

    async def echo(client: WhatsApp, msg: types.Message) -> None:
        if typing:
            await msg.indicate_typing()
        await msg.reply_text(f"echo: {msg.text}", quote=True)

    wa.add_handlers(handlers.MessageHandler(echo, filters.text))
    return wa


@functools.cache
def _build() -> object:
    client = os.environ.get("PEER_CLIENT", "sync")
    if client == "sync":
        return _build_sync()
    if client == "async":
        return _build_async()
    raise ValueError(f"PEER_CLIENT must be sync or async, not {client!r}")


def __getattr__(name: str) -> object:
    # `pywa run --entrypoint bench.peer_bot:wa` looks `wa` up on this module (in every uvicorn
    # worker): built on first use, so that importing this module needs no pywa.
    if name == "wa":
        return _build()
    raise AttributeError(name)
