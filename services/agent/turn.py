"""One agent turn: context, routing, the model, the stored reply, and its delivery.

The reply text is stored (fenced) before it is sent, so a turn that is run again after a crash
sends the stored text instead of paying for the model twice, and a reply already sent is never
sent again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
from opentelemetry import trace

from common import sqlfile, telemetry

from . import window
from .agents import AgentCatalog
from .backends import Backend, ModelError
from .graph import GraphClient, GraphError

log = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)
Q = sqlfile.load("services.agent", "queries.sql")


class StaleFence(Exception):
    pass


class UnknownMessage(Exception):
    pass


@dataclass(frozen=True)
class TurnRequest:
    message_id: str
    conversation_id: int
    fence_token: int
    phone_number_id: str
    wa_id: str
    text: str
    correlation_id: str
    probe: bool = False


@dataclass(frozen=True)
class TurnOutcome:
    outcome: str  # replied | failed
    reply_text: str = ""
    reply_message_id: str = ""
    error_class: str = ""
    error_message: str = ""
    retryable: bool = True
    agent_type: str = ""
    # Sent by a run that died before recording it, and confirmed by its status webhook.
    confirmed_by_status: bool = False


class Agent:
    def __init__(
        self,
        pool: asyncpg.Pool,
        catalog: AgentCatalog,
        backend: Backend,
        graph: GraphClient,
        *,
        token_limit: int,
        confirm_seconds: float = 10.0,
    ) -> None:
        self.pool = pool
        self.catalog = catalog
        self.backend = backend
        self.graph = graph
        self.token_limit = token_limit
        self.confirm_seconds = confirm_seconds
        self._background: set[asyncio.Task[None]] = set()

    async def reply(self, req: TurnRequest) -> TurnOutcome:
        state = await self.pool.fetchrow(Q["turn_state"], req.message_id)
        if state is None:
            raise UnknownMessage(req.message_id)
        if state["reply_message_id"]:
            # Sent by an earlier run of this turn that died before it was marked replied.
            return TurnOutcome(
                outcome="replied",
                reply_text=state["reply_text"] or "",
                reply_message_id=state["reply_message_id"],
                agent_type=state["agent_type"] or "",
            )
        if state["send_started_at"] is not None and self.graph.enabled:
            # A previous run died while sending: the customer may have the reply already.
            # Its status webhook carries our callback data and confirms it; only when no
            # confirmation comes is the reply sent again (at least once beats lost).
            confirmed = await self._await_confirmation(req)
            if confirmed is not None:
                return confirmed
        if self.graph.enabled:
            task = asyncio.create_task(self._mark_read(req))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        reply_text = state["reply_text"]
        agent_type = state["agent_type"] or ""
        # Saving a new reply marks its send as started too (it follows at once).
        send_started = reply_text is None
        if reply_text is None:
            try:
                reply_text, agent_type = await self._think(
                    req, state["context_agent_type"], state["context"]
                )
            except ModelError as exc:
                await self._session_error(req, agent_type or self.catalog.default)
                return TurnOutcome(
                    outcome="failed",
                    error_class=exc.error_class,
                    error_message=str(exc),
                    retryable=exc.retryable,
                )
        return await self._deliver(req, reply_text, agent_type, send_started=send_started)

    async def _await_confirmation(self, req: TurnRequest) -> TurnOutcome | None:
        log.warning(
            "a send was in flight when its turn died; waiting for its status webhook",
            extra={"message_id": req.message_id, "wait_seconds": self.confirm_seconds},
        )
        deadline = time.monotonic() + self.confirm_seconds
        while True:
            state = await self.pool.fetchrow(Q["reply_state"], req.message_id)
            if state is not None and state["reply_message_id"]:
                return TurnOutcome(
                    outcome="replied",
                    reply_text=state["reply_text"] or "",
                    reply_message_id=state["reply_message_id"],
                    agent_type=state["agent_type"] or "",
                    confirmed_by_status=True,
                )
            if time.monotonic() >= deadline:
                log.warning(
                    "no status webhook confirmed the interrupted send; sending again",
                    extra={"message_id": req.message_id},
                )
                return None
            await asyncio.sleep(0.25)

    async def _mark_read(self, req: TurnRequest) -> None:
        try:
            await asyncio.wait_for(self.graph.mark_read(req.phone_number_id, req.message_id), 5)
        except Exception as exc:
            log.info("mark-as-read failed (the turn goes on): %s", exc)

    async def _think(
        self, req: TurnRequest, context_agent: str | None, context: list[dict[str, Any]] | None
    ) -> tuple[str, str]:
        history: list[dict[str, Any]] = list(context) if context is not None else []
        current = context_agent or self.catalog.default
        routed = self.catalog.route(current, req.text)
        agent = self.catalog.get(routed)
        user: dict[str, Any] = {"role": "user", "content": req.text, "message_id": req.message_id}
        user["tokens"] = window.message_tokens(user)
        history.append(user)
        costs = [m.get("tokens") or window.message_tokens(m) for m in history]
        limit = min(self.token_limit, agent.token_limit)
        win = window.fit(
            agent.system_prompt,
            [{"role": m["role"], "content": m["content"]} for m in history],
            limit,
            costs,
        )
        started = time.perf_counter()
        with tracer.start_as_current_span("agent.model") as span:
            telemetry.annotate(span, correlation_id=req.correlation_id, agent_type=agent.name)
            span.set_attribute("wa.model.backend", self.backend.name)
            span.set_attribute("wa.model.window_tokens", win.tokens)
            try:
                completion = await self.backend.complete(
                    agent, win.messages, probe=req.probe, prompt_tokens=win.tokens
                )
            except ModelError as exc:
                span.set_status(trace.StatusCode.ERROR, str(exc))
                raise
        latency_ms = int((time.perf_counter() - started) * 1000)
        if not completion.text:
            raise ModelError(
                "model answered an empty reply", retryable=True, error_class="EmptyReply"
            )
        reply: dict[str, Any] = {"role": "assistant", "content": completion.text}
        reply_tokens = window.message_tokens(reply)
        reply["tokens"] = reply_tokens
        history.append(reply)
        token_count = sum(costs) + reply_tokens
        fence = await self.pool.fetchval(
            Q["save_turn"],
            req.conversation_id,
            req.fence_token,
            req.message_id,
            agent.name,
            current,
            history,
            token_count,
            completion.text,
            completion.tokens_in,
            completion.tokens_out,
            latency_ms,
            req.correlation_id,
            self.graph.enabled,
        )
        if fence != req.fence_token:
            raise StaleFence(
                f"conversation {req.conversation_id} is held with token {fence}, "
                f"not {req.fence_token}"
            )
        return completion.text, agent.name

    async def _session_error(self, req: TurnRequest, agent_type: str) -> None:
        try:
            await self.pool.execute(
                Q["session_metrics"],
                req.conversation_id,
                agent_type,
                0,
                0,
                0,
                0,
                1,
                req.correlation_id,
            )
        except Exception:
            log.exception("could not record the session error")

    async def _deliver(
        self, req: TurnRequest, text: str, agent_type: str, *, send_started: bool
    ) -> TurnOutcome:
        if not self.graph.enabled:
            log.info(
                "no WHATSAPP_ACCESS_TOKEN: reply recorded, not sent",
                extra={"message_id": req.message_id, "reply": text},
            )
            return TurnOutcome(outcome="replied", reply_text=text, agent_type=agent_type)
        with tracer.start_as_current_span("agent.graph_send") as span:
            telemetry.annotate(
                span,
                correlation_id=req.correlation_id,
                message_id=req.message_id,
                phone_number_id=req.phone_number_id,
            )
            if not send_started:
                await self.pool.execute(Q["send_started"], req.message_id)
            try:
                sent = await self.graph.send_text(
                    req.phone_number_id, req.wa_id, text, reply_to=req.message_id
                )
            except GraphError as exc:
                span.set_status(trace.StatusCode.ERROR, str(exc))
                await self.pool.execute(Q["record_send_error"], req.message_id, exc.code)
                return TurnOutcome(
                    outcome="failed",
                    reply_text=text,
                    error_class=f"GraphError{exc.code}",
                    error_message=str(exc),
                    retryable=exc.retryable,
                    agent_type=agent_type,
                )
        await self.pool.execute(Q["record_sent"], req.message_id, sent.message_id)
        log.info(
            "reply sent",
            extra={
                "message_id": req.message_id,
                "reply_id": sent.message_id,
                "attempts": sent.attempts,
            },
        )
        return TurnOutcome(
            outcome="replied",
            reply_text=text,
            reply_message_id=sent.message_id,
            agent_type=agent_type,
        )
