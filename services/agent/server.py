"""The agent service's gRPC adapter."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
import grpc
from wa.v1 import agent_pb2, agent_pb2_grpc

from common import authz, config, customers, db, logs, retry, roles, sqlfile, telemetry, wire
from common.domain import TurnResult
from services.agent.settings import AgentSettings

from . import agents, inbound, window
from . import http as outbound
from .backends import Backend, OpenAIBackend, RulesBackend
from .breaker import CircuitBreaker
from .deadline import Deadline, TurnTimeout
from .graph import GraphClient, GraphError
from .operator import InvalidReply, OperatorReplies, OutsideWindow, SendUncertain
from .saves import DB_DOWN
from .transcription import WhisperTranscriber
from .turn import Agent, StaleFence, TurnFailed, UnknownMessage

log = logging.getLogger(__name__)
Q = sqlfile.load("services.agent", "queries.sql")

# How long after a Turns call ends its turns' sent replies are looked at again (_SentReplies):
# the caller records them with its final transitions within moments of reading the answers.
# The turns of a caller that died are resumed only once its heartbeat has expired (5 s after
# its last beat, at most a second before it died: services/state/sweeper.py), and a resumed
# turn still waits WHATSAPP_SEND_CONFIRM_SECONDS for a record before it sends again.
RECHECK_SECONDS = 2.0
# On the way out, how long the records not yet done may take (after the gRPC server's grace).
CLOSE_SECONDS = 3.0
# How long turns cut off at the end of a drain may take to unwind (their statements cancelled).
CUT_SECONDS = 1.0


class AgentServicer(agent_pb2_grpc.AgentServicer):
    def __init__(self, agent: Agent, replies: OperatorReplies | None = None) -> None:
        self.agent = agent
        # Turns of `Turns` calls still running, whether or not their caller still waits.
        self._running: set[asyncio.Task[None]] = set()
        # Records of sent replies that callers may not have recorded (_SentReplies), pending.
        self._records: set[asyncio.Task[None]] = set()
        self._closing = asyncio.Event()
        self.replies = replies or OperatorReplies(agent.pool, agent.catalog, agent.graph)

    async def Reply(
        self, request: agent_pb2.ReplyRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ReplyResponse:
        if request.correlation_id:
            logs.correlation_id.set(request.correlation_id)
        # The caller's deadline is the turn's: every call and wait of the turn ends before it.
        try:
            return await self._turn(request, Deadline.after(context.time_remaining()))
        except _Refused as refused:
            await context.abort(refused.code, refused.details)
            raise  # abort raises; this keeps the type checker informed

    async def Turns(
        self,
        requests: AsyncIterator[agent_pb2.TurnsRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[agent_pb2.TurnsResponse]:
        """Each turn read runs at once, beside the others; each answer is written as its turn
        ends, with those of the turns that ended meanwhile when the caller reads several per
        message. The call ends when the caller has stopped writing and every turn is
        answered."""
        answers: asyncio.Queue[_Answer | None] = asyncio.Queue()
        running: set[asyncio.Task[None]] = set()
        more = _asks_more(context)
        sent = _SentReplies(self._record_unanswered)
        context.add_done_callback(sent.call_ended)
        if more:
            # Says at once, before any answer, that several turns may come per message.
            await context.send_initial_metadata((wire.TURNS_MORE,))

        def start(request: agent_pb2.TurnsRequest) -> None:
            # A fresh context: each turn continues its own message's trace.
            task = asyncio.create_task(
                self._streamed(request, answers.put_nowait, sent),
                name=f"turn-{request.turn.message_id}",
                context=contextvars.Context(),
            )
            running.add(task)
            self._running.add(task)
            task.add_done_callback(running.discard)
            task.add_done_callback(self._running.discard)

        async def read() -> None:
            try:
                async for request in requests:
                    start(request)
                    for also in request.more:
                        start(also)
            finally:
                if running:
                    await asyncio.wait(set(running))
                answers.put_nowait(None)

        reader = asyncio.create_task(read(), name="turns-reader")
        try:
            ended = False
            while not ended and (answer := await answers.get()) is not None:
                first = _response(answer)
                # The turns that ended while the last message was written go with it.
                while more and not answers.empty():
                    also = answers.get_nowait()
                    if also is None:
                        ended = True
                        break
                    _response(also, first.more.add())
                yield first
            await reader  # raises what ended the reading (the caller went away)
            sent.answered()
        finally:
            # A caller that goes away stops the reading, not the turns: like Reply's, each
            # runs to its end (self._running keeps them), so that a send is never cut off
            # from its record.
            reader.cancel()

    async def _streamed(
        self,
        request: agent_pb2.TurnsRequest,
        answer: Callable[[_Answer], None],
        sent: _SentReplies,
    ) -> None:
        turn = request.turn
        with telemetry.continued(
            "agent.turn",
            request.traceparent,
            turn.correlation_id,
            message_id=turn.message_id,
            conversation_id=turn.conversation_id,
        ):
            try:
                # Not shielded: this task is the turn's own already, and a caller that goes
                # away cancels only the reading (Turns), never it.
                result = await self._turn(
                    turn, Deadline.after(request.timeout_seconds), shield=False
                )
            except _Refused as refused:
                answer((request.id, refused))
                return
        if result.sent_unrecorded:
            sent.add(turn.message_id, result.reply_message_id)
        answer((request.id, result))

    def _record_unanswered(self, replies: dict[str, str], after: float) -> None:
        """Records, in the background and `after` seconds on, replies whose turns' callers
        may not have recorded them (_SentReplies)."""
        task = asyncio.create_task(self._record(replies, after), name="record-unanswered-sends")
        self._records.add(task)
        task.add_done_callback(self._records.discard)

    async def _record(self, replies: dict[str, str], after: float) -> None:
        if after and not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(after):
                    await self._closing.wait()  # on the way out: at once
        ids = list(replies)
        for attempt in range(3):
            try:
                # Housekeeping after a call's end, many messages' at once: no trace of its own.
                with telemetry.untraced():
                    recorded = await self.agent.pool.fetch(
                        Q["record_unanswered_sends"], ids, [replies[m] for m in ids]
                    )
                break
            except Exception as exc:
                if attempt < 2:
                    # A resumed turn starts once the dead holder's heartbeat has expired, and
                    # then waits WHATSAPP_SEND_CONFIRM_SECONDS for a record: time for another
                    # try (at least 0.5 s on, with jitter).
                    await asyncio.sleep(0.5 + retry.full_jitter(attempt + 1, 0.25, 1.0))
                    continue
                # Left as before: the resumed turn waits for the replies' status webhooks.
                log.warning(
                    "could not record replies sent that their caller may not have recorded: %r",
                    exc,
                    extra={"message_ids": ids, "after_seconds": after},
                )
                return
        if recorded:
            # (None, nearly always: the caller had recorded them. A caller that went away, or
            # one that had not recorded them RECHECK_SECONDS after the call ended.)
            log.warning(
                "recorded replies sent that their caller had not recorded",
                extra={
                    "message_ids": [r["message_id"] for r in recorded],
                    "after_seconds": after,
                },
            )

    async def finish_turns(self, until: float) -> None:
        """Scale-in, once the gRPC server has stopped (no turn starts any more): the turns still
        running (those whose calls the server's grace cut, or whose callers went away) run
        until `until` (the loop's clock: the drain's end, AGENT_DRAIN_SECONDS after the stop,
        as long as the server's grace). Those still running then are cut off: their callers
        ask again elsewhere under a new fencing token, and a reply one had sent waits for its
        record or its status webhook there (turn.py)."""
        loop = asyncio.get_running_loop()
        while self._running and (left := until - loop.time()) > 0:
            await asyncio.wait(set(self._running), timeout=left)
        if not self._running:
            return
        cut = set(self._running)
        log.warning(
            "cutting off turns still running at the end of the drain",
            extra={
                "turns": len(cut),
                "message_ids": sorted(t.get_name().removeprefix("turn-") for t in cut),
            },
        )
        for task in cut:
            task.cancel()
        await asyncio.wait(cut, timeout=CUT_SECONDS)

    async def close(self) -> None:
        """On the way out (SIGTERM), once the gRPC server has stopped: the records waiting to
        look again are done at once, not RECHECK_SECONDS on; those not done within
        CLOSE_SECONDS are left to the replies' status webhooks (the pool closes next)."""
        self._closing.set()
        loop = asyncio.get_running_loop()
        until = loop.time() + CLOSE_SECONDS
        await asyncio.sleep(0)  # the calls the stop cancelled end, and start their records
        while self._records and (left := until - loop.time()) > 0:
            await asyncio.wait(set(self._records), timeout=left)

    async def _turn(
        self, request: agent_pb2.ReplyRequest, deadline: Deadline, *, shield: bool = True
    ) -> agent_pb2.ReplyResponse:
        """Runs one turn; a turn refused (or that did not run) raises _Refused with the status
        its call ends with."""
        try:
            turn = self.agent.reply(wire.turn_from_proto(request), deadline)
            # Shielded (a task of its own): once a turn runs, a caller that goes away (a
            # killed state service) must not cut it between the Graph API send and recording
            # that send. The turn still ends by the deadline.
            out = await (asyncio.shield(turn) if shield else turn)
        except StaleFence as exc:
            log.warning("refused a stale turn: %s", exc)
            raise _Refused(grpc.StatusCode.FAILED_PRECONDITION, str(exc)) from exc
        except UnknownMessage as exc:
            raise _Refused(grpc.StatusCode.NOT_FOUND, f"no message {exc}") from exc
        except TurnTimeout as exc:
            log.warning("the turn ran out of time: %s", exc)
            out = _failed(TurnTimeout.error_class, str(exc))
        except TurnFailed as exc:
            log.warning("the turn failed: %s", exc)
            out = _failed(exc.error_class, str(exc), retryable=exc.retryable)
        except DB_DOWN as exc:
            # Before the model was called (see Agent._think): the turn did not run.
            raise _Refused(grpc.StatusCode.UNAVAILABLE, f"database: {exc!r}") from exc
        except Exception as exc:
            # Anything else is a failed attempt with its error, bounded by the dead-letter
            # queue: "did not run" would retry it without end, the model paid each time.
            log.exception("the turn failed on an unexpected error")
            out = _failed(f"AgentError.{type(exc).__name__}", str(exc)[:500] or repr(exc))
        return wire.result_to_proto(out)

    async def GetStatus(
        self, request: agent_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetStatusResponse:
        backend = self.agent.backend
        return agent_pb2.GetStatusResponse(backend=backend.name, breaker_state=backend.status())

    async def SendOperatorReply(
        self, request: agent_pb2.SendOperatorReplyRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.SendOperatorReplyResponse:
        if not request.customer.strip():
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "name a customer: a phone number or a BSUID"
            )
        deadline = Deadline.after(context.time_remaining())
        try:
            # Shielded like a turn: a caller that goes away must not cut the send off from
            # its record.
            sent = await asyncio.shield(
                self.replies.send(
                    customer=request.customer,
                    phone_number_id=request.phone_number_id,
                    text=request.text,
                    idempotency_key=request.idempotency_key,
                    operator=operator_name(request.operator, context),
                    correlation_id=logs.correlation_id.get(),
                    deadline=deadline,
                )
            )
        except customers.UnknownCustomer as exc:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except (customers.AmbiguousCustomer, InvalidReply) as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except OutsideWindow as exc:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        except SendUncertain as exc:
            await context.abort(grpc.StatusCode.ABORTED, str(exc))
        except GraphError as exc:
            code = (
                grpc.StatusCode.FAILED_PRECONDITION
                if exc.code == "131047"  # Meta's own "more than 24 hours" refusal
                else grpc.StatusCode.ABORTED
            )
            outcome = "not sent" if exc.status else "may or may not have been sent"
            await context.abort(code, f"the Graph API send failed ({outcome}): {exc}")
        except TurnTimeout as exc:
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, str(exc))
        return agent_pb2.SendOperatorReplyResponse(
            reply_message_id=sent.reply_message_id,
            duplicate=sent.duplicate,
            conversation_id=sent.conversation_id,
            phone_number_id=sent.phone_number_id,
        )


def operator_name(named: str, context: grpc.aio.ServicerContext) -> str:
    """Who answers, for the audit: the person the caller names and the identity its
    certificate proves (`operator`)."""
    identity = authz.identity(context) or "unauthenticated"
    named = " ".join(named.split())[:100]
    return f"{named} (via {identity})" if named else identity


def _asks_more(context: grpc.aio.ServicerContext) -> bool:
    """The caller reads several answers per TurnsResponse (wire.TURNS_MORE)."""
    return wire.TURNS_MORE in (context.invocation_metadata() or ())


def _response(
    answer: _Answer, into: agent_pb2.TurnsResponse | None = None
) -> agent_pb2.TurnsResponse:
    """`answer` as a TurnsResponse, written into `into` (an element of another's `more`)."""
    turn_id, result = answer
    response = agent_pb2.TurnsResponse() if into is None else into
    response.id = turn_id
    if isinstance(result, _Refused):
        response.code = result.code.value[0]
        response.details = result.details
    else:
        response.result.CopyFrom(result)
    return response


class _SentReplies:
    """The replies a Turns call's turns sent and left to its caller to record with each
    turn's final transition (the request's defer_sent_record), by message id. A caller that
    dies before it records one (a killed state service) leaves a send in flight with no id,
    and the turn resumed after the crash would wait for its status webhook and, without one,
    send the reply again: so the agent records them itself, where no reply is recorded yet
    (recording one the caller did record is harmless, and costs no lock).

    A call that ends before it wrote every answer (its caller went away) has them recorded at
    once, and those of its turns that end later as they end. Every other call's are looked
    at again RECHECK_SECONDS after it ended, one statement for the call: its caller may have
    died after the answers were written (gRPC may end a call as if normally even when they
    were written into a connection that was dying) or before its final transitions
    committed. Left to the replies' status webhooks, as before: a caller that dies more than
    RECHECK_SECONDS after the call ended with its transitions still uncommitted, or while a
    call it had not half-closed still looks alive (a host that vanished, until HTTP/2
    keepalive notices), and an agent that dies first."""

    __slots__ = ("_answered", "_record", "gone", "sent")

    def __init__(self, record: Callable[[dict[str, str], float], None]) -> None:
        self._record = record
        self.sent: dict[str, str] = {}
        self._answered = False
        self.gone = False

    def add(self, message_id: str, reply_id: str) -> None:
        if self.gone:
            self._record({message_id: reply_id}, 0.0)
        else:
            self.sent[message_id] = reply_id

    def answered(self) -> None:
        """The call wrote every answer and ends normally (its caller finished writing)."""
        self._answered = True

    def call_ended(self, context: grpc.aio.ServicerContext) -> None:
        # Its caller gone, a call ends before its answers are written, and grpc may still
        # report it neither cancelled nor failed.
        if not self._answered:
            self.gone = True
        if self.sent:
            self._record(self.sent, 0.0 if self.gone else RECHECK_SECONDS)
        self.sent = {}


class _Refused(Exception):
    """A turn refused, or that did not run: its call ends with this status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


# A turn's answer on a `Turns` call: its id and its result, or why it was refused.
_Answer = tuple[int, agent_pb2.ReplyResponse | _Refused]


def _failed(error_class: str, message: str, *, retryable: bool = True) -> TurnResult:
    return TurnResult(
        outcome="failed", error_class=error_class, error_message=message, retryable=retryable
    )


def make_backend(settings: AgentSettings, http: aiohttp.ClientSession) -> Backend:
    if settings.agent_backend == "openai":
        return OpenAIBackend(
            http,
            base_url=settings.openai_base_url,
            api_key=settings.openai_api_key.reveal(),
            model=settings.agent_model,
            timeout=settings.model_timeout_seconds,
            max_retries=settings.agent_max_retries,
            breaker=CircuitBreaker(
                "openai",
                failure_threshold=settings.breaker_threshold,
                reset_after=settings.breaker_reset_seconds,
            ),
        )
    return RulesBackend()


def make_reader(
    settings: AgentSettings, http: aiohttp.ClientSession, graph: GraphClient
) -> inbound.Reader:
    """Voice notes are transcribed only with TRANSCRIPTION_URL set (and media downloaded only
    with the business token); the model call's timeout and retries bound the transcription."""
    transcriber = None
    if settings.transcription_url:
        transcriber = WhisperTranscriber(
            http,
            base_url=settings.transcription_url,
            api_key=settings.transcription_api_key.reveal(),
            model=settings.transcription_model,
            timeout=settings.model_timeout_seconds,
            max_retries=settings.agent_max_retries,
        )
    else:
        log.info("TRANSCRIPTION_URL is not set: voice notes get the fallback reply")
    return inbound.Reader(
        media=graph if graph.enabled else None,
        transcriber=transcriber,
        max_bytes=settings.media_max_bytes,
    )


@contextlib.asynccontextmanager
async def setup(
    server: grpc.aio.Server, settings: AgentSettings, stopping: asyncio.Event
) -> AsyncIterator[list[str]]:
    try:
        catalog = agents.load(settings.agent_config)
    except agents.AgentConfigError as exc:
        raise config.ConfigError(str(exc)) from exc
    # Load the tokenizer before serving (about half a second of CPU), not on the first turn.
    window.load_encoding()
    pool = await db.create_pool(
        settings.require_database(),
        max_size=settings.pool_size("agent"),
        application_name="wa-agent",
    )
    await roles.refuse_privileged(pool, settings)
    async with outbound.session() as http:
        graph = GraphClient(
            http,
            timeout=settings.graph_timeout_seconds,
            base_url=settings.api_base_url,
            version=settings.api_version,
            access_token=settings.access_token.reveal(),
            max_retries=settings.graph_max_retries,
        )
        if not graph.enabled:
            log.warning("WHATSAPP_ACCESS_TOKEN is not set: replies are recorded, not sent")
        agent = Agent(
            pool,
            catalog,
            make_backend(settings, http),
            graph,
            token_limit=settings.agent_token_limit,
            context_max_messages=settings.context_max_messages,
            confirm_seconds=settings.send_confirm_seconds,
            reader=make_reader(settings, http, graph),
            fallback_reply=settings.fallback_reply,
            window_template=settings.window_template_reply(),
        )
        servicer = AgentServicer(agent, OperatorReplies(pool, catalog, graph))
        agent_pb2_grpc.add_AgentServicer_to_server(servicer, server)
        drain_ends = asyncio.create_task(
            _after(stopping, settings.drain_seconds), name="drain-deadline"
        )
        try:
            yield [agent_pb2.DESCRIPTOR.services_by_name["Agent"].full_name]
        finally:
            stopping.set()  # also when the server failed rather than was told to stop
            # The server has stopped (its grace is the drain): the turns' time to finish.
            await servicer.finish_turns(await drain_ends)
            await servicer.close()  # no call ends any more
            await agent.saves.close()  # the batches of saves in flight, before their pool
            await pool.close()


async def _after(stopping: asyncio.Event, seconds: float) -> float:
    """The loop's time `seconds` after `stopping` is set."""
    await stopping.wait()
    return asyncio.get_running_loop().time() + seconds
