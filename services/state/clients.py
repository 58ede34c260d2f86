"""gRPC adapters of the agent and dlq ports."""

from __future__ import annotations

import grpc
from opentelemetry import trace
from wa.v1 import dlq_pb2, dlq_pb2_grpc

from common import telemetry, wire

from .ports import AgentUnavailable, DlqUnavailable, Failure, TurnResult
from .store import WorkItem
from .turn_calls import TurnCalls, TurnError, UnclaimedSend

# Codes that mean "the turn did not run", as opposed to "the turn ran and failed". Only these
# are retried by the driver without counting: an error of a turn that ran (UNKNOWN, INTERNAL:
# an exception in the agent; DEADLINE_EXCEEDED: it ran out of time) may have paid for the model
# and is a failed attempt, bounded by the dead-letter queue's attempts.
_UNAVAILABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
_RAN_AND_FAILED = {
    grpc.StatusCode.DEADLINE_EXCEEDED: "TurnTimeout",
    grpc.StatusCode.UNKNOWN: "AgentError",
    grpc.StatusCode.INTERNAL: "AgentError",
}


class GrpcAgent:
    def __init__(
        self, channel: grpc.aio.Channel, timeout: float, unclaimed: UnclaimedSend | None = None
    ) -> None:
        # `unclaimed`: a reply sent by a turn whose answer came after its driver stopped
        # waiting (turn_calls.py).
        self.calls = TurnCalls(channel, unclaimed=unclaimed)
        self.timeout = timeout

    async def reply(self, item: WorkItem, token: int) -> TurnResult:
        # The item carries its turn's fencing token (`token`, the one it was claimed with).
        # Sampled or not: an unsampled message's turn must stay unsampled in the agent too
        # (with no parent there, the agent's span would start a sampled trace of its own).
        span = trace.get_current_span()
        try:
            resp = await self.calls.turn(
                wire.turn_to_proto(item),
                self.timeout,
                telemetry.traceparent_of(span) if span.get_span_context().is_valid else "",
            )
        except TurnError as exc:
            if exc.code in _UNAVAILABLE:
                raise AgentUnavailable(str(exc)) from exc
            if exc.code == grpc.StatusCode.FAILED_PRECONDITION:
                # The agent refused a stale fencing token: this holder lost the conversation.
                from .store import StaleFence

                raise StaleFence(exc.details or "stale fencing token") from exc
            if exc.code in _RAN_AND_FAILED:
                return TurnResult(
                    outcome="failed",
                    error_class=_RAN_AND_FAILED[exc.code],
                    error_message=str(exc),
                    retryable=True,
                )
            return TurnResult(
                outcome="failed",
                error_class=f"Agent{exc.code.name.title().replace('_', '')}",
                error_message=exc.details,
                retryable=False,
            )
        return wire.result_from_proto(resp)


class GrpcDlq:
    def __init__(self, channel: grpc.aio.Channel, timeout: float = 5.0) -> None:
        self.stub = dlq_pb2_grpc.DlqStub(channel)
        self.timeout = timeout

    async def enqueue(self, failure: Failure) -> None:
        try:
            await self.stub.Enqueue(wire.failure_to_proto(failure), timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise DlqUnavailable(f"{exc.code().name}: {exc.details()}") from exc

    async def resolve(self, message_id: str, correlation_id: str) -> None:
        try:
            await self.stub.Resolve(
                dlq_pb2.ResolveRequest(message_id=message_id, correlation_id=correlation_id),
                timeout=self.timeout,
                # Right after a dlq replica restarts the channel may still be backing off its
                # reconnect: wait for it within the timeout rather than fail fast and leave the
                # item to the stranded-item recovery.
                wait_for_ready=True,
            )
        except grpc.aio.AioRpcError as exc:
            raise DlqUnavailable(f"{exc.code().name}: {exc.details()}") from exc
