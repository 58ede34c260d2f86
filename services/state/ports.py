"""What the state service's driver needs from the agent and dlq services (gRPC in production,
in-memory fakes in unit tests)."""

from __future__ import annotations

from typing import Protocol

from common.domain import Failure, TurnResult

from .store import WorkItem

__all__ = ["AgentPort", "DlqPort", "Failure", "TurnResult"]


class AgentUnavailable(Exception):
    """The agent could not be reached or did not answer in time: the turn did not happen."""


class DlqUnavailable(Exception):
    pass


class AgentPort(Protocol):
    async def reply(self, item: WorkItem, token: int) -> TurnResult: ...


class DlqPort(Protocol):
    async def enqueue(self, failure: Failure) -> None: ...

    async def resolve(self, message_id: str, correlation_id: str) -> None: ...
