"""The converters between the domain types and wa.v1: nothing lost either way, and a field on
one side only is refused when the converter is built."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wa.v1 import agent_pb2, common_pb2

from common import domain, wire

text = st.text(st.characters(exclude_categories=["Cs"]), max_size=20)
seconds = st.integers(min_value=0, max_value=253_402_300_799)


@given(st.builds(domain.Message, timestamp=seconds))
def test_a_message_crosses_the_wire_unchanged(message: domain.Message) -> None:
    pb = common_pb2.InboundMessage.FromString(wire.message_to_proto(message).SerializeToString())
    assert wire.message_from_proto(pb) == message


@given(
    st.builds(
        domain.Status,
        status=st.sampled_from(["sent", "delivered", "read", "failed"]),
        timestamp=seconds,
    )
)
def test_a_status_crosses_the_wire_unchanged(status: domain.Status) -> None:
    pb = common_pb2.StatusUpdate.FromString(wire.status_to_proto(status).SerializeToString())
    assert pb.status != common_pb2.DELIVERY_STATUS_UNSPECIFIED
    assert wire.status_from_proto(pb) == status


@given(st.builds(domain.Event, timestamp=seconds))
def test_an_event_crosses_the_wire_unchanged(event: domain.Event) -> None:
    assert wire.event_from_proto(wire.event_to_proto(event)) == event


@given(
    st.builds(
        domain.TurnRequest,
        conversation_id=st.integers(0, 2**62),
        fence_token=st.integers(0, 2**62),
    )
)
def test_a_turn_request_crosses_the_wire_unchanged(turn: domain.TurnRequest) -> None:
    assert wire.turn_from_proto(wire.turn_to_proto(turn)) == turn


@given(
    st.builds(
        domain.TurnResult,
        outcome=st.sampled_from(["replied", "failed"]),
        parts=st.integers(1, 100),
    )
)
def test_a_turn_result_crosses_the_wire_unchanged(result: domain.TurnResult) -> None:
    pb = wire.result_to_proto(result)
    assert pb.error.error_class == result.error_class
    assert wire.result_from_proto(pb) == result


def test_an_unset_timestamp_is_zero_seconds() -> None:
    message = domain.Message("m", "1", "2", "", "text", 0, "", "{}")
    pb = wire.message_to_proto(message)
    assert not pb.HasField("timestamp")
    assert wire.message_from_proto(pb).timestamp == 0


def test_a_field_on_one_side_only_is_refused() -> None:
    @dataclasses.dataclass
    class Short:
        backend: str

    @dataclasses.dataclass
    class Long:
        backend: str
        breaker_state: str
        extra: str

    with pytest.raises(TypeError, match="breaker_state"):
        wire.to_proto(Short, agent_pb2.GetStatusResponse)
    with pytest.raises(TypeError, match="extra"):
        wire.from_proto(agent_pb2.GetStatusResponse, Long)


def test_enum_names_are_the_domain_words() -> None:
    assert wire.MESSAGE_STATUS[common_pb2.MESSAGE_STATUS_DEAD_LETTERED] == "dead_lettered"
    assert wire.MESSAGE_STATUS[common_pb2.MESSAGE_STATUS_UNSPECIFIED] == ""
    assert wire.DLQ_STATUS_NUMBER["pending"] == 1
