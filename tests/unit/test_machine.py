"""The state machines: legal paths only, terminal states stay terminal (hypothesis drives
random event sequences)."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from services.state import machine

STATES = sorted(machine.MESSAGE_STATES)


def test_the_happy_paths_are_legal() -> None:
    path: list[str | None] = [None, "received", "processing", "replied"]
    for a, b in itertools.pairwise(path):
        assert b is not None
        machine.check_message(a, b)
    for a, b in [
        (None, "skipped"),
        ("processing", "failed"),
        ("failed", "dead_lettered"),
        ("dead_lettered", "received"),
        ("processing", "received"),
    ]:
        machine.check_message(a, b)


@pytest.mark.parametrize("terminal", sorted(machine.TERMINAL))
@pytest.mark.parametrize("target", STATES)
def test_terminal_states_never_move(terminal: str, target: str) -> None:
    with pytest.raises(machine.IllegalTransition):
        machine.check_message(terminal, target)


@given(st.lists(st.sampled_from(STATES), max_size=30))
def test_any_sequence_accepted_by_the_machine_is_a_path_of_the_graph(events: list[str]) -> None:
    current: str | None = None
    accepted = []
    for event in events:
        try:
            machine.check_message(current, event)
        except machine.IllegalTransition as exc:
            assert exc.from_state == current and exc.to_state == event
            continue
        assert event in machine.MESSAGE_TRANSITIONS[current]
        accepted.append(event)
        current = event
    # replied/skipped are reached at most once and end the path.
    ends = [i for i, s in enumerate(accepted) if s in machine.TERMINAL]
    assert not ends or ends == [len(accepted) - 1]


class MessageLifecycle(RuleBasedStateMachine):
    """Random events against one message; invariants hold after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.state: str | None = None
        self.replies = 0
        self.history: list[str] = []

    @rule(target_state=st.sampled_from(STATES))
    def event(self, target_state: str) -> None:
        before = self.state
        try:
            machine.check_message(self.state, target_state)
        except machine.IllegalTransition:
            assert self.state == before
            return
        self.state = target_state
        self.history.append(target_state)
        if target_state == machine.REPLIED:
            self.replies += 1

    @invariant()
    def at_most_one_reply(self) -> None:
        assert self.replies <= 1

    @invariant()
    def processing_only_after_received(self) -> None:
        for a, b in zip(self.history, self.history[1:], strict=False):
            if b == machine.PROCESSING:
                assert a == machine.RECEIVED


TestMessageLifecycle = MessageLifecycle.TestCase


def test_conversation_machine() -> None:
    machine.check_conversation(None, "idle")
    machine.check_conversation("idle", "active")
    machine.check_conversation("active", "idle")
    machine.check_conversation("active", "active")
    with pytest.raises(machine.IllegalTransition):
        machine.check_conversation("idle", "idle")


def _legal(check: Callable[[str | None, str], None], a: str, b: str) -> bool:
    try:
        check(a, b)
    except machine.IllegalTransition:
        return False
    return True


def test_the_sources_the_database_is_given_are_exactly_the_legal_moves() -> None:
    # The database applies a move only from these states (wa_transition_message, the claim
    # and release statements): they must say what check_message / check_conversation say.
    for a, b in itertools.product(STATES, STATES):
        assert (a in machine.message_sources(b)) == _legal(machine.check_message, a, b), (a, b)
    for a, b in itertools.product(["idle", "active"], ["idle", "active"]):
        assert (a in machine.conversation_sources(b)) == _legal(machine.check_conversation, a, b), (
            a,
            b,
        )
