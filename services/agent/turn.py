"""One agent turn: context, routing, the model, the stored reply, and its delivery.

The reply text is stored (fenced) before it is sent, so a turn that is run again after a crash
sends the stored text instead of paying for the model twice, and a reply already sent is never
sent again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import time
from typing import Any

import asyncpg
import orjson
from opentelemetry import trace

from common import sqlfile, telemetry
from common.domain import TurnRequest, TurnResult

from . import debounce, inbound, limits, replies, service_window, window
from .agents import AgentCatalog
from .backends import Backend, ModelError, clean_text
from .deadline import SEND_MARGIN_SECONDS, UNBOUNDED, Deadline, TurnTimeout
from .graph import GraphClient, GraphError
from .saves import DB_DOWN, Save, Saves
from .settings import FALLBACK_REPLY

log = logging.getLogger(__name__)
tracer = telemetry.tracer(__name__)
Q = sqlfile.load("services.agent", "queries.sql")


class StaleFence(Exception):
    pass


class UnknownMessage(Exception):
    pass


class TurnFailed(Exception):
    """The turn ran (the model may have been paid for) and failed: never "did not run"."""

    def __init__(self, message: str, *, error_class: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.retryable = retryable


class Agent:
    def __init__(
        self,
        pool: asyncpg.Pool,
        catalog: AgentCatalog,
        backend: Backend,
        graph: GraphClient,
        *,
        token_limit: int,
        context_max_messages: int = 100,
        confirm_seconds: float = 10.0,
        reader: inbound.Reader | None = None,
        fallback_reply: str = FALLBACK_REPLY,
        window_template: replies.Structured | None = None,
    ) -> None:
        self.pool = pool
        self.catalog = catalog
        self.backend = backend
        self.graph = graph
        self.token_limit = token_limit
        self.context_max_messages = max(2, context_max_messages)
        self.confirm_seconds = confirm_seconds
        # Reads what each message says (buttons, captions, voice notes...); the fallback
        # reply answers what cannot be read.
        self.reader = reader or inbound.Reader()
        self.fallback_reply = fallback_reply
        # Sent instead of a reply outside the 24-hour window (WHATSAPP_WINDOW_TEMPLATE).
        self.window_template = window_template
        self._background: set[asyncio.Task[None]] = set()
        # Turns that finish together save together: one statement and commit (saves.py).
        self.saves = Saves(pool)

    async def reply(self, req: TurnRequest, deadline: Deadline = UNBOUNDED) -> TurnResult:
        """The turn, every call of it ending before `deadline` (raises TurnTimeout past it)."""
        result = await self._turn(req, deadline)
        if result.outcome == "replied" and self.catalog.get(result.agent_type).handoff:
            if result.sent_unrecorded:
                # The hand-off's own transaction records nothing of the send: recorded here.
                await self._fenced(req, "record_sent", req.message_id, result.reply_message_id)
            # Its message is sent: the state service hands the conversation to a person.
            return dataclasses.replace(result, handoff=True, sent_unrecorded=False)
        return result

    async def _state(self, req: TurnRequest) -> TurnState:
        """The turn's stored state: as the statement that started the turn read it, else
        (an older caller) read now."""
        if req.has_state:
            return TurnState.of_request(req)
        row = await self.pool.fetchrow(Q["turn_state"], req.message_id)
        if row is None:
            raise UnknownMessage(req.message_id)
        return TurnState.of_row(row)

    async def _turn(self, req: TurnRequest, deadline: Deadline) -> TurnResult:
        state = await self._state(req)
        # A debounced burst this message's reply answers too: saved with the reply, so a run
        # resumed after a crash answers the same one (services/agent/debounce.py).
        absorbed = state.absorbed
        if state.reply_message_id:
            # Sent by an earlier run of this turn that died before it was marked replied.
            return TurnResult(
                outcome="replied",
                reply_text=state.reply_text or "",
                reply_message_id=state.reply_message_id,
                agent_type=state.agent_type or "",
                absorbed_message_ids=absorbed,
            )
        reply_text = state.reply_text
        agent_type = state.agent_type or ""
        structured = stored_reply(state.reply_payload)
        parts: list[str] = []
        if reply_text is not None:
            parts = (
                limits.fit(reply_text, self.catalog.get(agent_type).long_replies)
                if structured is None
                else [reply_text]  # one interactive message or template
            )
        if state.send_started and self.graph.enabled and len(parts) == 1:
            # A previous run died while sending: the customer may have the reply already.
            # Its status webhook carries our callback data and confirms it; only when no
            # confirmation comes is the reply sent again (at least once beats lost).
            confirmed = await self._await_confirmation(req, deadline)
            if confirmed is not None:
                return dataclasses.replace(confirmed, absorbed_message_ids=absorbed)
        if self.graph.enabled and not (req.wa_id or req.user_id):
            # The customer's number changed and Meta named no user id for them: the old number
            # is not theirs any more (db/migrations/0038). Nothing to send to, so no model call.
            # (After the wait above: a send already made may yet be confirmed.)
            return TurnResult(
                outcome="failed",
                error_class="NoRecipient",
                error_message="the customer's phone number changed and no new number or "
                "business-scoped user id is known for them",
                retryable=False,
                agent_type=agent_type,
                absorbed_message_ids=absorbed,
            )
        closed = window_closed(state, structured)
        if closed is not None:
            result = await self._outside_window(req, agent_type, closed, deadline)
            return dataclasses.replace(result, absorbed_message_ids=absorbed)
        burst = debounce.NONE
        if reply_text is None:
            current = self.catalog.get(state.context_agent_type or self.catalog.default)
            if current.debounce_seconds > 0 and state.message_type in debounce.KINDS:
                burst = await debounce.gather(
                    self.pool,
                    req.conversation_id,
                    req.message_id,
                    current.debounce_seconds,
                    deadline,
                )
                absorbed = burst.message_ids
        # The reply quotes the newest message it answers, and that one is marked read (which
        # marks the earlier ones read too).
        quote = absorbed[-1] if absorbed else req.message_id
        if self.graph.enabled and reply_text is None:
            # Once per turn, while the model works: a run resumed after the model answered
            # only sends what is stored, and its first run marked the message already.
            task = asyncio.create_task(self._mark_read(req, quote))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        # Saving a new reply marks its send as started too (it follows at once).
        send_started = reply_text is None
        fallback = ""  # (a resumed turn's reply was stored; why it was the fallback is not)
        if reply_text is None:
            try:
                reply_text, agent_type, structured, fallback = await self._think(
                    req,
                    state.context_agent_type,
                    state.context,
                    deadline,
                    message=(state.message_type, state.payload),
                    burst=burst,
                )
            except ModelError as exc:
                await self._session_error(req, agent_type or self.catalog.default)
                return TurnResult(
                    outcome="failed",
                    error_class=exc.error_class,
                    error_message=str(exc),
                    retryable=exc.retryable,
                )
            parts = (
                limits.fit(reply_text, self.catalog.get(agent_type).long_replies)
                if structured is None
                else [reply_text]
            )
        if len(parts) > 1 and self.graph.enabled:
            result = await self._deliver_parts(
                req, reply_text, parts, agent_type, deadline, quote=quote
            )
        else:
            result = await self._deliver(
                req,
                reply_text,
                agent_type,
                send_started=send_started,
                deadline=deadline,
                quote=quote,
                structured=structured,
                defer_record=req.defer_sent_record,
            )
        if fallback:
            result = dataclasses.replace(result, fallback=fallback)
        return _answering(result, absorbed)

    async def _outside_window(
        self, req: TurnRequest, agent_type: str, reason: str, deadline: Deadline
    ) -> TurnResult:
        """No free-form reply may be sent (service_window): the model is not asked, a stored
        reply is not sent. The configured template is, stored first like a reply (so it is
        sent once); without one the turn fails for good and its message is dead-lettered."""
        template = self.window_template
        if template is None:
            log.warning(
                "no reply: %s, and no WHATSAPP_WINDOW_TEMPLATE",
                reason,
                extra={"message_id": req.message_id},
            )
            return TurnResult(
                outcome="failed",
                error_class=service_window.ERROR_CLASS,
                error_message=f"no reply sent: {reason}; only a message template may be sent "
                "now (WHATSAPP_WINDOW_TEMPLATE)",
                retryable=False,
                agent_type=agent_type,
            )
        text = replies.as_text(template)
        await self._fenced(
            req, "save_window_template", req.message_id, text, replies.to_json(template)
        )
        log.info("sending the window template: %s", reason, extra={"message_id": req.message_id})
        return await self._deliver(
            req, text, agent_type, send_started=True, deadline=deadline, structured=template
        )

    def _confirm_window(self, deadline: Deadline) -> float:
        """How long to wait for a status webhook: WHATSAPP_SEND_CONFIRM_SECONDS, but at most
        half of what remains of the turn, the other half being for sending again."""
        return max(0.0, min(self.confirm_seconds, deadline.remaining() / 2))

    async def _await_confirmation(
        self, req: TurnRequest, deadline: Deadline = UNBOUNDED
    ) -> TurnResult | None:
        wait = self._confirm_window(deadline)
        log.warning(
            "a send was in flight when its turn died; waiting for its status webhook",
            extra={"message_id": req.message_id, "wait_seconds": wait},
        )
        until = time.monotonic() + wait
        while True:
            state = await self.pool.fetchrow(Q["reply_state"], req.message_id)
            if state is not None and state["reply_message_id"]:
                return TurnResult(
                    outcome="replied",
                    reply_text=state["reply_text"] or "",
                    reply_message_id=state["reply_message_id"],
                    agent_type=state["agent_type"] or "",
                    confirmed_by_status=state["reply_confirmed_by"] is not None,
                )
            if time.monotonic() >= until:
                log.warning(
                    "no status webhook confirmed the interrupted send; sending again",
                    extra={"message_id": req.message_id},
                )
                return None
            await asyncio.sleep(0.25)

    async def _await_part_confirmation(
        self, req: TurnRequest, part: int, deadline: Deadline
    ) -> str | None:
        wait = self._confirm_window(deadline)
        log.warning(
            "a part's send was in flight when its turn died; waiting for its status webhook",
            extra={"message_id": req.message_id, "part": part, "wait_seconds": wait},
        )
        until = time.monotonic() + wait
        while True:
            sent_id = await self.pool.fetchval(Q["reply_part_sent_id"], req.message_id, part)
            if sent_id:
                return str(sent_id)
            if time.monotonic() >= until:
                log.warning(
                    "no status webhook confirmed the interrupted part; sending it again",
                    extra={"message_id": req.message_id, "part": part},
                )
                return None
            await asyncio.sleep(0.25)

    async def _mark_read(self, req: TurnRequest, message_id: str) -> None:
        try:
            # Bounded by a deadline, not wait_for: no extra task and timer per turn.
            await self.graph.mark_read(req.phone_number_id, message_id, Deadline.after(5))
        except Exception as exc:
            log.info("mark-as-read failed (the turn goes on): %s", exc)

    async def _think(
        self,
        req: TurnRequest,
        context_agent: str | None,
        context: list[dict[str, Any]] | None,
        deadline: Deadline = UNBOUNDED,
        message: tuple[str, Any] = ("text", None),
        burst: debounce.Burst = debounce.NONE,
    ) -> tuple[str, str, replies.Structured | None, str]:
        """The reply, its agent type, its buttons or list if any, and why the fallback reply
        answered ("" when the model did). `message`: the stored message's type and Meta's
        object of it."""
        history: list[dict[str, Any]] = list(context) if context is not None else []
        current = self.catalog.resume_from(context_agent)
        said = await self._understand(req, *message, deadline)
        if isinstance(said, inbound.Fallback):
            return await self._fall_back(req, current, said)
        # A debounced burst (text messages, debounce.py) is one user message: the texts in
        # order, one a line.
        text = _lines([said.text, *burst.texts]) or said.text
        routed = self.catalog.route(current, _lines([said.route_text, *burst.texts]), said.choice)
        agent = self.catalog.get(routed)
        user = window.user_message(clean_text(text), req.message_id)
        history.append(user)
        costs = [m.get("tokens") or window.message_tokens(m) for m in history]
        limit = min(self.token_limit, agent.token_limit or self.token_limit)
        win = window.fit(agent.system_prompt, history, limit, costs)
        started = time.perf_counter()
        with tracer.start_as_current_span("agent.model") as span:
            telemetry.annotate(span, correlation_id=req.correlation_id, agent_type=agent.name)
            span.set_attribute("wa.model.backend", self.backend.name)
            span.set_attribute("wa.model.window_tokens", win.tokens)
            if burst.message_ids:
                span.set_attribute("wa.turn.burst_messages", 1 + len(burst.message_ids))
            try:
                completion = await self.backend.complete(
                    agent,
                    win.messages,
                    probe=req.probe,
                    prompt_tokens=win.tokens,
                    deadline=deadline,
                )
            except ModelError as exc:
                span.set_status(trace.StatusCode.ERROR, str(exc))
                raise
        latency_ms = int((time.perf_counter() - started) * 1000)
        structured = completion.reply
        # Buttons or a list: the stored text says what was offered (the context remembers it).
        text = clean_text(replies.as_text(structured) if structured else completion.text)
        if agent.long_replies == "trim" and structured is None:
            # What the customer will read is what the context remembers.
            text = limits.trim(text)
        if not text.strip():
            raise ModelError(
                "model answered an empty reply", retryable=True, error_class="EmptyReply"
            )
        # A long reply's parts record their own sends; only a one-message reply is marked here.
        single = structured is not None or limits.length(text) <= limits.TEXT_BODY_MAX
        reply: dict[str, Any] = {"role": "assistant", "content": text}
        reply_tokens = window.message_tokens(reply)
        reply["tokens"] = reply_tokens
        history.append(reply)
        # Only the newest messages are kept (AGENT_CONTEXT_MAX_MESSAGES): the stored context
        # stops growing. The window above already had what it could use. The save writes the
        # turn's two messages only, and the database drops what falls out of the bound.
        kept = bounded(history, self.context_max_messages)
        token_count = sum(m.get("tokens") or window.message_tokens(m) for m in kept)
        try:
            fence = await self.saves.save(
                Save(
                    conversation_id=req.conversation_id,
                    token=req.fence_token,
                    message_id=req.message_id,
                    agent_type=agent.name,
                    previous_agent_type=current,
                    appended=[user, reply],
                    keep=self.context_max_messages,
                    token_count=token_count,
                    reply_text=text,
                    tokens_in=completion.tokens_in,
                    tokens_out=completion.tokens_out,
                    latency_ms=latency_ms,
                    correlation_id=req.correlation_id,
                    send_started=self.graph.enabled and single,
                    reply_payload=replies.to_json(structured) if structured else None,
                    absorbed=list(burst.message_ids) or None,
                )
            )
        except DB_DOWN as exc:
            # The model has answered: running the turn again would pay for it again, so this
            # is a failed attempt (bounded by the dead-letter queue), not "did not run".
            raise TurnFailed(
                f"could not store the model's answer: {exc!r}", error_class="DatabaseUnavailable"
            ) from exc
        _check_fence(req, fence)
        return text, agent.name, structured, ""

    async def _understand(
        self, req: TurnRequest, message_type: str, payload: Any, deadline: Deadline
    ) -> inbound.Said | inbound.Fallback:
        try:
            return await self.reader.understand(message_type, payload, req.text, deadline)
        except inbound.InboundError as exc:
            # A transcription may have been paid for: a failed attempt, bounded by the DLQ.
            raise TurnFailed(
                str(exc), error_class=exc.error_class, retryable=exc.retryable
            ) from exc

    async def _fall_back(
        self, req: TurnRequest, current: str, said: inbound.Fallback
    ) -> tuple[str, str, None, str]:
        """The fallback reply, stored (fenced, marked as being sent) like a model's answer so
        that it is sent exactly once; the model is not called, the context not changed."""
        agent_type = self.catalog.get(current).name
        log.info(
            "answered with the fallback reply",
            extra={"message_id": req.message_id, "reason": said.reason},
        )
        trace.get_current_span().set_attribute("wa.inbound.fallback", said.reason)
        await self._fenced(
            req,
            "save_fallback",
            req.message_id,
            self.fallback_reply,
            agent_type,
            self.graph.enabled and limits.length(self.fallback_reply) <= limits.TEXT_BODY_MAX,
        )
        return self.fallback_reply, agent_type, None, said.reason

    async def _fenced(self, req: TurnRequest, query: str, *args: Any) -> None:
        """One write of the turn (queries.sql), applied only while the turn's fence token is
        still its conversation's; raises StaleFence (nothing written) once it is not."""
        fence = await self.pool.fetchval(Q[query], *args, req.conversation_id, req.fence_token)
        _check_fence(req, fence)

    async def _still_holder(self, req: TurnRequest) -> None:
        """Before a send is tried again (after a wait, e.g. a Retry-After): the conversation
        may have been taken over meanwhile (its driver died, the sweeper broke its lease) and
        the new holder's turn may send this reply itself. Raises StaleFence then. Costs a
        round trip only on a retry, never on a first attempt."""
        _check_fence(req, await self.pool.fetchval(Q["fence_token"], req.conversation_id))

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
        self,
        req: TurnRequest,
        text: str,
        agent_type: str,
        *,
        send_started: bool,
        deadline: Deadline = UNBOUNDED,
        quote: str = "",
        structured: replies.Structured | None = None,
        defer_record: bool = False,
    ) -> TurnResult:
        """`defer_record`: the sent id is not recorded here but returned as `sent_unrecorded`,
        for the caller to record with the turn's final transition (one row update fewer). Until
        it does, the message looks as a turn cut off mid-send leaves it (send started, no id):
        a run resumed then waits for the reply's status webhook before it sends again."""
        if not self.graph.enabled:
            log.info(
                "no WHATSAPP_ACCESS_TOKEN: reply recorded, not sent",
                # Its length, never its words: logs are no place for a conversation.
                extra={"message_id": req.message_id, "reply_chars": len(text)},
            )
            return TurnResult(outcome="replied", reply_text=text, agent_type=agent_type)
        with tracer.start_as_current_span("agent.graph_send") as span:
            telemetry.annotate(
                span,
                correlation_id=req.correlation_id,
                message_id=req.message_id,
                phone_number_id=req.phone_number_id,
            )
            # Nothing is sent that the deadline could cut off. (A reply saved as being sent
            # and not sent leaves its next turn waiting for a confirmation: only time lost.)
            deadline.check("send the reply", SEND_MARGIN_SECONDS)
            if structured is None:
                limits.check_text(text, req.message_id)
            else:
                replies.check(structured)
                span.set_attribute("wa.reply.kind", structured.kind)
            if not send_started:
                await self._fenced(req, "send_started", req.message_id)
            try:
                if structured is None:
                    sent = await self.graph.send_text(
                        req.phone_number_id,
                        req.wa_id,
                        text,
                        reply_to=quote or req.message_id,
                        # Its status webhook names the turn's message, whichever one it quotes.
                        callback_data=req.message_id,
                        deadline=deadline,
                        user_id=req.user_id,
                        before_retry=lambda: self._still_holder(req),
                    )
                else:
                    sent = await self.graph.send_structured(
                        req.phone_number_id,
                        req.wa_id,
                        structured,
                        reply_to=quote or req.message_id,
                        callback_data=req.message_id,
                        deadline=deadline,
                        user_id=req.user_id,
                        before_retry=lambda: self._still_holder(req),
                    )
            except GraphError as exc:
                span.set_status(trace.StatusCode.ERROR, str(exc))
                # Only an answer proves the send did not go through; after a timeout the
                # next turn waits for the status webhook instead of sending blindly again.
                if exc.status:
                    await self._fenced(req, "record_send_error", req.message_id, exc.code)
                if exc.code == service_window.GRAPH_CODE and (
                    structured is None or structured.kind != "template"
                ):
                    # The window closed before the send: a template, or the dead-letter queue.
                    return await self._outside_window(
                        req,
                        agent_type,
                        f"{service_window.REASON} (Graph API error {exc.code})",
                        deadline,
                    )
                return TurnResult(
                    outcome="failed",
                    reply_text=text,
                    error_class=f"GraphError{exc.code}",
                    error_message=str(exc),
                    retryable=exc.retryable,
                    agent_type=agent_type,
                )
        if not defer_record:
            await self._fenced(req, "record_sent", req.message_id, sent.message_id)
        log.info(
            "reply sent",
            extra={
                "message_id": req.message_id,
                "reply_id": sent.message_id,
                "attempts": sent.attempts,
            },
        )
        return TurnResult(
            outcome="replied",
            reply_text=text,
            reply_message_id=sent.message_id,
            agent_type=agent_type,
            sent_unrecorded=defer_record,
        )

    async def _deliver_parts(
        self,
        req: TurnRequest,
        text: str,
        parts: list[str],
        agent_type: str,
        deadline: Deadline,
        *,
        quote: str = "",
    ) -> TurnResult:
        """A reply too long for one message, as consecutive messages. The split is recorded
        before the first is sent, and each part's send like a whole reply's: a run resumed
        after a crash starts at the first unsent part, and waits for the status webhook of
        one that was in flight (its callback data is `<message id>#<part>`)."""
        rows = await self.pool.fetch(
            Q["reply_parts"], req.message_id, parts, req.conversation_id, req.fence_token
        )
        _check_fence(req, rows[0]["fence_token"] if rows else None)
        rows = [r for r in rows if r["part"] is not None]
        bodies = [r["body"] for r in rows]
        sent_ids: list[str | None] = [r["sent_id"] for r in rows]
        started = [r["send_started_at"] is not None for r in rows]
        last_sent: int | None = None  # a part sent by this run, not yet recorded
        with tracer.start_as_current_span("agent.graph_send") as span:
            telemetry.annotate(
                span,
                correlation_id=req.correlation_id,
                message_id=req.message_id,
                phone_number_id=req.phone_number_id,
            )
            span.set_attribute("wa.reply.parts", len(bodies))
            for n, body in enumerate(bodies):
                if sent_ids[n]:
                    continue
                if started[n]:
                    confirmed = await self._await_part_confirmation(req, n, deadline)
                    if confirmed is not None:
                        sent_ids[n] = confirmed
                        continue
                callback = f"{req.message_id}#{n}"
                try:
                    deadline.check("send the next part", SEND_MARGIN_SECONDS)
                    limits.check_text(body, callback)
                except TurnTimeout:
                    await self._record_part(req, last_sent, sent_ids, None)
                    raise
                # Recording the previous part and starting this one: one round trip.
                await self._record_part(req, last_sent, sent_ids, n)
                last_sent = None
                try:
                    sent = await self.graph.send_text(
                        req.phone_number_id,
                        req.wa_id,
                        body,
                        # Only the first part quotes the customer's message.
                        reply_to=(quote or req.message_id) if n == 0 else "",
                        callback_data=callback,
                        deadline=deadline,
                        user_id=req.user_id,
                        before_retry=lambda: self._still_holder(req),
                    )
                except GraphError as exc:
                    span.set_status(trace.StatusCode.ERROR, str(exc))
                    if exc.status:
                        await self._fenced(
                            req, "record_part_send_error", req.message_id, n, exc.code
                        )
                    if exc.code == service_window.GRAPH_CODE:
                        reason = f"{service_window.REASON} (Graph API error {exc.code})"
                        return await self._outside_window(req, agent_type, reason, deadline)
                    return TurnResult(
                        outcome="failed",
                        reply_text=text,
                        error_class=f"GraphError{exc.code}",
                        error_message=f"part {n + 1} of {len(bodies)}: {exc}",
                        retryable=exc.retryable,
                        agent_type=agent_type,
                    )
                sent_ids[n] = sent.message_id
                last_sent = n
        await self._record_part(req, last_sent, sent_ids, None)
        final = sent_ids[-1] or ""
        await self._fenced(req, "record_sent", req.message_id, final)
        log.info(
            "reply sent in parts",
            extra={"message_id": req.message_id, "reply_id": final, "parts": len(bodies)},
        )
        return TurnResult(
            outcome="replied",
            reply_text=text,
            reply_message_id=final,
            agent_type=agent_type,
            parts=len(bodies),
        )

    async def _record_part(
        self, req: TurnRequest, sent: int | None, sent_ids: list[str | None], start: int | None
    ) -> None:
        if sent is None and start is None:
            return
        await self._fenced(
            req,
            "reply_part_sent",
            req.message_id,
            -1 if sent is None else sent,
            "" if sent is None else sent_ids[sent],
            -1 if start is None else start,
        )


def _answering(result: TurnResult, absorbed: tuple[str, ...]) -> TurnResult:
    """`result`, saying that it answers `absorbed` too; itself when it already says so (no
    burst, nearly every turn: dataclasses.replace costs a turn a few µs)."""
    if result.absorbed_message_ids == absorbed:
        return result
    return dataclasses.replace(result, absorbed_message_ids=absorbed)


def _lines(texts: list[str]) -> str:
    return "\n".join(t for t in texts if t.strip())


@dataclasses.dataclass(frozen=True, slots=True)
class TurnState:
    """What a turn starts from: its message, the reply an earlier run stored and its send
    state, the conversation's context, and the 24-hour window's start and now."""

    message_type: str
    payload: Any  # Meta's message object
    context: list[dict[str, Any]] | None
    context_agent_type: str | None
    reply_text: str | None
    reply_payload: Any  # the stored structured reply (replies.to_json), None for text
    reply_message_id: str | None
    agent_type: str | None
    send_started: bool
    absorbed: tuple[str, ...]
    last_customer_at: dt.datetime | None
    db_now: dt.datetime

    @classmethod
    def of_row(cls, row: Any) -> TurnState:
        """From queries.sql turn_state (its JSON decoded by the pool)."""
        return cls(
            message_type=row["message_type"],
            payload=row["payload"],
            context=row["context"],
            context_agent_type=row["context_agent_type"],
            reply_text=row["reply_text"],
            reply_payload=row["reply_payload"],
            reply_message_id=row["reply_message_id"],
            agent_type=row["agent_type"],
            send_started=row["send_started_at"] is not None,
            absorbed=tuple(row["absorbed_message_ids"] or ()),
            last_customer_at=row["last_customer_at"],
            db_now=row["db_now"],
        )

    @classmethod
    def of_request(cls, req: TurnRequest) -> TurnState:
        """From the request (read by the statement that started the turn: wa_start_turn)."""
        return cls(
            message_type=req.message_type,
            payload=orjson.loads(req.payload_json) if req.payload_json else None,
            context=orjson.loads(req.context_json) if req.context_json else None,
            context_agent_type=req.context_agent_type or None,
            reply_text=req.reply_text if req.has_reply else None,
            reply_payload=orjson.loads(req.reply_payload_json) if req.reply_payload_json else None,
            reply_message_id=req.reply_message_id or None,
            agent_type=req.agent_type or None,
            send_started=req.send_started,
            absorbed=req.absorbed_message_ids,
            last_customer_at=_datetime(req.last_customer_at) if req.last_customer_at else None,
            db_now=_datetime(req.db_now),
        )


def _datetime(seconds: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def stored_reply(payload: Any) -> replies.Structured | None:
    """The structured reply stored before its send (reply_payload), if any."""
    return replies.from_json(payload) if payload is not None else None


def window_closed(state: TurnState, stored: replies.Structured | None) -> str | None:
    """Why a free-form reply may not be sent now (service_window); None when it may, or when
    what is stored is the template sent outside the window."""
    if stored is not None and stored.kind == "template":
        return None
    return service_window.check(state.last_customer_at, state.db_now)


def bounded(history: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The newest `limit` messages of a context (oldest dropped first)."""
    return history[-limit:] if len(history) > limit else history


def _check_fence(req: TurnRequest, fence: int | None) -> None:
    if fence != req.fence_token:
        held = f"conversation {req.conversation_id} is held with token {fence}"
        raise StaleFence(f"{held}, not {req.fence_token}")
