"""What the state service's driver needs from the agent and dlq services (gRPC in production,
in-memory fakes in unit tests)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .store import WorkItem


class AgentUnavailable(Exception):
    """The agent could not be reached or did not answer in time: the turn did not happen."""


class DlqUnavailable(Exception):
    pass


@dataclass(frozen=True)
class TurnResult:
    outcome: str  # replied | failed
    reply_text: str = ""
    reply_message_id: str = ""
    error_class: str = ""
    error_message: str = ""
    retryable: bool = True
    agent_type: str = ""
    detail: str = ""


@dataclass(frozen=True)
class Failure:
    message_id: str
    conversation_id: int
    error_class: str
    error_message: str
    retryable: bool
    payload_json: str
    correlation_id: str


class AgentPort(Protocol):
    async def reply(self, item: WorkItem, token: int) -> TurnResult: ...


class DlqPort(Protocol):
    async def enqueue(self, failure: Failure) -> None: ...

    async def resolve(self, message_id: str, correlation_id: str) -> None: ...
