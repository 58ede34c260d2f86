"""Who may call what: each internal RPC answers only the identities (named by the caller's
certificate, see common/tls.py) that call it in this codebase; every other caller gets
PERMISSION_DENIED. Health and reflection answer any certificate of the system's CA.

The one table of the system's internal calls: a new RPC, or a new caller of one, is added
here (tests/unit/test_authz.py fails for an RPC missing from it).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from . import tls

CALLERS: dict[str, frozenset[str]] = {
    method: frozenset(callers)
    for method, callers in {
        # services/gateway (acknowledging deliveries; /readyz via common/components.py).
        "/wa.v1.State/IngestBatch": {"gateway"},
        "/wa.v1.State/Ingests": {"gateway"},
        "/wa.v1.State/CheckDependencies": {"gateway", "operator", "console"},
        # services/dlq (redrive).
        "/wa.v1.State/Redrive": {"dlq"},
        # cli/ and the console.
        "/wa.v1.State/GetTimeline": {"operator"},
        "/wa.v1.State/GetStats": {"operator"},
        "/wa.v1.State/GetSystemHealth": {"operator", "console"},
        "/wa.v1.State/Prune": {"operator"},
        "/wa.v1.State/Forget": {"operator"},
        "/wa.v1.State/ListHandoffs": {"operator"},
        "/wa.v1.State/ReleaseHandoff": {"operator", "console"},
        "/wa.v1.State/TakeOver": {"operator", "console"},
        # services/state (turns); GetStatus: the dlq's breaker check, readiness, `wa health`.
        "/wa.v1.Agent/Reply": {"state"},
        "/wa.v1.Agent/Turns": {"state"},
        "/wa.v1.Agent/GetStatus": {"dlq", "gateway", "operator", "console"},
        # cli/ and the console: an operator's answer to a customer.
        "/wa.v1.Agent/SendOperatorReply": {"operator", "console"},
        # services/state (failed turns in, resolved ones out).
        "/wa.v1.Dlq/Enqueue": {"state"},
        "/wa.v1.Dlq/Resolve": {"state"},
        # cli/ and the console (services/console: Retry and Purge only, its reads are SQL).
        "/wa.v1.Dlq/List": {"operator"},
        "/wa.v1.Dlq/Get": {"operator"},
        "/wa.v1.Dlq/Retry": {"operator", "console"},
        "/wa.v1.Dlq/Purge": {"operator", "console"},
    }.items()
}
# Any certificate of the CA: probes, `wa health`, grpcurl.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


_PREFIX = tls.URI_PREFIX.encode()


def identity(context: grpc.aio.ServicerContext) -> str:
    """The caller's identity: the `spiffe://wa-agents/<identity>` name of its certificate ("" if
    it has none). Read from the peer's names (a fraction of a microsecond) rather than from
    `auth_context()`, which copies every property of the connection, certificate PEM included,
    at each call (~20 us)."""
    for name in context.peer_identities() or ():
        if name.startswith(_PREFIX):
            return str(name[len(_PREFIX) :].decode())
    return ""


class Authorize(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Checks each call's caller against CALLERS before its handler runs.

    Innermost of the server's interceptors, so that what it wraps is the servicer's own
    handler, one per method for the server's life: the wrapped handler is built once per
    method and reused, and a call pays one lookup of its caller and one set membership.
    """

    def __init__(self, callers: dict[str, frozenset[str]] = CALLERS) -> None:
        self._callers = callers
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = _guarded(handler, method, self._callers.get(method, frozenset()))
        self._wrapped[method] = (handler, wrapped)
        return wrapped


def _guarded(
    handler: grpc.RpcMethodHandler, method: str, allowed: frozenset[str]
) -> grpc.RpcMethodHandler:
    inner = handler.unary_unary

    def refusal(context: grpc.aio.ServicerContext) -> str | None:
        """Why the caller may not call the method; None when it may."""
        caller = identity(context)
        if caller in allowed:
            return None
        return f"{caller or 'a certificate naming no identity'} may not call {method}"

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if (why := refusal(context)) is not None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
        return await inner(request, context)

    if inner is not None:
        return handler._replace(unary_unary=unary_unary)

    streams = handler.stream_stream
    if streams is not None:
        # Checked once, when the call opens: every message of the call is the same caller's.
        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            if (why := refusal(context)) is not None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
            async for answer in streams(requests, context):
                yield answer

        return handler._replace(stream_stream=stream_stream)

    # No internal RPC is unary-stream or stream-unary today: one that is is refused until a
    # check of its kind is written here.
    async def refused(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED, f"{method} streams: common/authz.py cannot check it"
        )

    kind = next(k for k in ("unary_stream", "stream_unary") if getattr(handler, k))
    return handler._replace(**{kind: refused})
