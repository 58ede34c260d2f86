from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gateway import parse
from tests.support import payloads

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)


def test_every_message_type_is_parsed_with_its_text() -> None:
    messages = [payloads.message(kind) for kind in payloads.ALL_MESSAGE_TYPES]
    delivery = parse.parse(orjson.dumps(payloads.delivery(messages=messages)))
    assert [m.type for m in delivery.messages] == list(payloads.ALL_MESSAGE_TYPES)
    by_type = {m.type: m for m in delivery.messages}
    assert by_type["text"].text == "hello"
    assert by_type["image"].text == "a photo"
    assert by_type["interactive"].text == "Yes"
    assert by_type["button"].text == "Yes"
    assert by_type["location"].text == "Office, 1 Main St"
    assert by_type["reaction"].text == "\U0001f44d"
    for m in delivery.messages:
        assert m.phone_number_id == payloads.PHONE_NUMBER_ID
        assert m.contact_name == "Test Customer"
        assert orjson.loads(m.payload_json)["id"] == m.message_id
        assert m.timestamp > 0


def test_statuses_with_errors() -> None:
    doc = payloads.delivery(
        statuses=[payloads.status("wamid.X", "failed"), payloads.status("wamid.X", "read")]
    )
    delivery = parse.parse(orjson.dumps(doc))
    assert [(s.status, s.error_code) for s in delivery.statuses] == [
        ("failed", "131047"),
        ("read", ""),
    ]


def test_events_without_ids_are_dropped_not_crashing() -> None:
    bad = payloads.message("text")
    del bad["id"]
    doc = payloads.delivery(messages=[bad, payloads.message("text")], statuses=[{"status": "read"}])
    delivery = parse.parse(orjson.dumps(doc))
    assert len(delivery.messages) == 1
    assert len(delivery.dropped) == 2


@pytest.mark.parametrize("body", [b"[]", b"1", b'"x"', b"null"])
def test_non_objects_are_not_deliveries(body: bytes) -> None:
    with pytest.raises(parse.NotADelivery):
        parse.parse(body)


def test_non_json_raises_value_error() -> None:
    with pytest.raises(ValueError):
        parse.parse(b"{nope")


@settings(max_examples=300)
@given(doc=st.dictionaries(st.text(max_size=10), json_values, max_size=5))
def test_any_json_object_parses_without_exceptions(doc: dict[str, Any]) -> None:
    parse.parse_obj(doc)


@settings(max_examples=300)
@given(
    value=json_values,
    messages=st.lists(json_values, max_size=3),
    statuses=st.lists(json_values, max_size=3),
)
def test_any_shape_inside_a_delivery_parses_without_exceptions(
    value: Any, messages: list[Any], statuses: list[Any]
) -> None:
    doc = {
        "entry": [
            {
                "changes": [
                    {
                        "value": {
                            "metadata": value,
                            "messages": messages,
                            "statuses": statuses,
                            "contacts": value,
                        }
                    }
                ]
            }
        ]
    }
    delivery = parse.parse_obj(doc)
    for m in delivery.messages:
        assert m.message_id and m.wa_id


@given(text=st.text(max_size=500))
def test_text_round_trips(text: str) -> None:
    doc = payloads.delivery(messages=[payloads.message("text", text={"body": text})])
    (m,) = parse.parse(orjson.dumps(doc)).messages
    # NUL cannot be stored by PostgreSQL; everything else arrives as typed.
    assert m.text == text.replace("\x00", "")
    assert "\\u0000" not in m.payload_json
