"""The validated state machines of messages and conversations."""

from __future__ import annotations

from typing import Final

RECEIVED: Final = "received"
PROCESSING: Final = "processing"
REPLIED: Final = "replied"
SKIPPED: Final = "skipped"
FAILED: Final = "failed"
DEAD_LETTERED: Final = "dead_lettered"

MESSAGE_STATES: Final = frozenset({RECEIVED, PROCESSING, REPLIED, SKIPPED, FAILED, DEAD_LETTERED})
TERMINAL: Final = frozenset({REPLIED, SKIPPED})

# None is "not stored yet".
MESSAGE_TRANSITIONS: Final[dict[str | None, frozenset[str]]] = {
    None: frozenset({RECEIVED, SKIPPED}),
    RECEIVED: frozenset({PROCESSING, SKIPPED}),
    # back to received: the turn could not run (agent unreachable) or its holder died.
    PROCESSING: frozenset({REPLIED, SKIPPED, FAILED, RECEIVED}),
    FAILED: frozenset({DEAD_LETTERED, RECEIVED}),
    DEAD_LETTERED: frozenset({RECEIVED}),
    REPLIED: frozenset(),
    SKIPPED: frozenset(),
}

# A message answered by the turn of an earlier message of its conversation (a debounced burst,
# services/agent/debounce.py) leaves received for replied with that turn's final transition, and
# only then: it never had a turn of its own. Not in MESSAGE_TRANSITIONS, which no other move
# may take this way.
ABSORBED_FROM: Final = (RECEIVED,)

IDLE: Final = "idle"
ACTIVE: Final = "active"
CONVERSATION_TRANSITIONS: Final[dict[str | None, frozenset[str]]] = {
    None: frozenset({IDLE}),
    IDLE: frozenset({ACTIVE}),
    # active -> active: a new holder took over (the previous one died or stalled).
    ACTIVE: frozenset({IDLE, ACTIVE}),
}


# The reason recorded when an operator redrives a message; its next turn may probe the model.
OPERATOR_REDRIVE = "redriven by an operator"


class IllegalTransition(Exception):
    def __init__(self, entity: str, from_state: str | None, to_state: str) -> None:
        super().__init__(f"illegal {entity} transition {from_state or '(new)'} -> {to_state}")
        self.entity = entity
        self.from_state = from_state
        self.to_state = to_state


def check_message(from_state: str | None, to_state: str) -> None:
    if to_state not in MESSAGE_TRANSITIONS.get(from_state, frozenset()):
        raise IllegalTransition("message", from_state, to_state)


def _sources(transitions: dict[str | None, frozenset[str]]) -> dict[str, list[str]]:
    states = {to for targets in transitions.values() for to in targets}
    return {
        to: sorted(s for s, targets in transitions.items() if s is not None and to in targets)
        for to in states
    }


_MESSAGE_SOURCES: Final = _sources(MESSAGE_TRANSITIONS)
_CONVERSATION_SOURCES: Final = _sources(CONVERSATION_TRANSITIONS)


def message_sources(to_state: str) -> list[str]:
    """The stored states a message may leave for `to_state` (the database applies a move
    only from one of them)."""
    return _MESSAGE_SOURCES.get(to_state, [])


def conversation_sources(to_state: str) -> list[str]:
    return _CONVERSATION_SOURCES.get(to_state, [])


def check_conversation(from_state: str | None, to_state: str) -> None:
    if to_state not in CONVERSATION_TRANSITIONS.get(from_state, frozenset()):
        raise IllegalTransition("conversation", from_state, to_state)
