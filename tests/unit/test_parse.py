from __future__ import annotations

import dataclasses
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli import simulate
from common import wire
from services.gateway import parse
from tests.support import payloads
from tests.support.hostile import expected_text, hostile_deliveries

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


@pytest.mark.parametrize("status", ["sent", "delivered", "read"])
def test_the_benchmarks_statuses_are_read_as_metas(status: str) -> None:
    """bench.graph posts `status_delivery`s for every reply, to a phone number or a BSUID:
    each must be read as the status of that reply, for that recipient and business number."""
    by_phone = simulate.status_delivery(
        simulate.status_entry("wamid.OUT1", status, recipient_id="15550001111"),
        phone_number_id="100000000000009",
    )
    by_bsuid = simulate.status_delivery(
        simulate.status_entry(
            "wamid.OUT2", status, recipient_user_id="US.123", callback_data="wamid.IN2"
        )
    )
    read = [parse.parse(orjson.dumps(doc)).statuses for doc in (by_phone, by_bsuid)]
    assert [
        (s.message_id, s.status, s.recipient_id, s.recipient_user_id, s.callback_data)
        for [s] in read
    ] == [
        ("wamid.OUT1", status, "15550001111", "", ""),
        ("wamid.OUT2", status, "", "US.123", "wamid.IN2"),
    ]
    assert read[0][0].phone_number_id == "100000000000009"
    assert read[1][0].phone_number_id == payloads.PHONE_NUMBER_ID


def test_messages_without_id_sender_or_number_are_stored_as_skipped_not_dropped() -> None:
    no_id = payloads.message("text")
    del no_id["id"]
    no_sender = payloads.message("text")
    del no_sender["from"]
    doc = payloads.delivery(
        messages=[no_id, payloads.message("text")], statuses=[{"status": "read"}]
    )
    doc["entry"][0]["changes"][0]["value"]["messages"] += [7, no_sender]
    delivery = parse.parse(orjson.dumps(doc))
    assert [bool(m.skip_reason) for m in delivery.messages] == [True, False, True, True]
    assert "without an id" in delivery.messages[0].skip_reason
    assert "not a JSON object" in delivery.messages[2].skip_reason
    assert "without a sender" in delivery.messages[3].skip_reason
    assert delivery.messages[0].message_id.startswith(parse.INVALID_ID_PREFIX)
    assert len(delivery.dropped) == 1  # the status: it answers nothing and has no id
    # Meta's retry of the same delivery names the same messages (duplicates stay duplicates).
    again = parse.parse(orjson.dumps(doc))
    assert [m.message_id for m in again.messages] == [m.message_id for m in delivery.messages]
    other = dict(no_id, text={"body": "another"})
    (m,) = parse.parse(orjson.dumps(payloads.delivery(messages=[other]))).messages
    assert m.message_id != delivery.messages[0].message_id

    metadata = doc["entry"][0]["changes"][0]["value"]["metadata"]
    del metadata["phone_number_id"]
    for m in parse.parse(orjson.dumps(doc)).messages:
        assert "without metadata.phone_number_id" in m.skip_reason


@pytest.mark.parametrize(
    "phone_number_id",
    [
        "123/../../me?fields=",
        "10000 1",
        "\uff11\uff12\uff13",
        "\u0661\u0662",
        "-1",
        "1.5",
        "9" * 65,
    ],
)
def test_a_phone_number_id_that_is_not_digits_is_skipped(phone_number_id: str) -> None:
    doc = payloads.delivery(messages=[payloads.message("text")])
    doc["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = phone_number_id
    (m,) = parse.parse(orjson.dumps(doc)).messages
    assert m.skip_reason == "phone_number_id is not a Cloud API id (digits only)"
    assert m.text == "hello"


@pytest.mark.parametrize(
    "timestamp",
    ["99999999999999999999", str(2**63), 2**63, "-5", -5, 0, "", "1e9", "soon", None, 1.5e300],
)
def test_a_timestamp_no_clock_holds_is_skipped_with_a_reason(timestamp: Any) -> None:
    doc = payloads.delivery(messages=[payloads.message("text", timestamp=timestamp)])
    (m,) = parse.parse(json.dumps(doc).encode()).messages
    assert m.skip_reason.startswith("timestamp is not a time")
    assert m.timestamp == 0
    wire.message_to_proto(m)  # a Timestamp holds it (unset)


def test_a_backslash_u0000_typed_by_a_customer_is_kept_as_typed() -> None:
    typed = "my log says \\u0000 and \\\\u0000 here"
    doc = payloads.delivery(messages=[payloads.message("text", text={"body": typed})])
    (m,) = parse.parse(orjson.dumps(doc)).messages
    assert m.text == typed
    assert orjson.loads(m.payload_json)["text"]["body"] == typed


def test_lone_surrogates_and_nul_escapes_are_repaired_not_refused() -> None:
    # orjson refuses the body; the message is still read, the surrogate as U+FFFD.
    body = payloads.delivery(messages=[payloads.message("text", text={"body": "a\ud800b\x00"})])
    raw = json.dumps(body).encode()
    assert b"\\ud800" in raw and b"\\u0000" in raw
    (m,) = parse.parse(raw).messages
    assert m.text == "a\ufffdb"
    assert orjson.loads(m.payload_json)["text"]["body"] == "a\ufffdb"
    assert not m.skip_reason


def test_a_payload_nested_deeper_than_json_encoders_go_is_kept_capped() -> None:
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(400):
        node["x"] = {}
        node = node["x"]
    doc = payloads.delivery(messages=[payloads.message("text", extra=deep)])
    (m,) = parse.parse(json.dumps(doc).encode()).messages
    assert m.text == "hello"
    assert parse.DEEPER in m.payload_json


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
    assert len(delivery.messages) == len(messages)
    for m in delivery.messages:
        assert m.message_id and (m.wa_id or m.skip_reason)


@given(text=st.text(max_size=500))
def test_text_round_trips(text: str) -> None:
    doc = payloads.delivery(messages=[payloads.message("text", text={"body": text})])
    (m,) = parse.parse(json.dumps(doc).encode()).messages
    assert m.text == expected_text(text)
    assert orjson.loads(m.payload_json)["text"]["body"] == m.text
    assert m.skip_reason == ("" if m.text.strip() else "text message without text")


@pytest.mark.parametrize("text", [{"body": ""}, {"body": " \n\t "}, {}, "not an object", None])
def test_a_text_message_without_text_is_stored_skipped_not_answered(text: Any) -> None:
    # WhatsApp sends no empty text; a reply would answer "" (the rules agent echoed it).
    doc = payloads.delivery(messages=[payloads.message("text", text=text)])
    (m,) = parse.parse(orjson.dumps(doc)).messages
    assert m.type == "text" and m.skip_reason == "text message without text"


@pytest.mark.parametrize("kind", ["text", "image", "audio", "interactive"])
def test_a_message_in_a_group_is_stored_skipped_not_answered_privately(kind: str) -> None:
    # Meta's group messages webhook: `from` is the member who wrote, `group_id` the group.
    doc = payloads.delivery(
        messages=[payloads.message(kind, group_id="Y2FwaV9ncm91cDpFWEFNUExFX0dST1VQX0lE")]
    )
    (m,) = parse.parse(orjson.dumps(doc)).messages
    assert m.type == kind and m.wa_id == payloads.message(kind)["from"]
    assert m.skip_reason == (
        "a message in a WhatsApp group: only one-to-one conversations are answered"
    )
    one_to_one = payloads.delivery(messages=[payloads.message(kind)])
    assert parse.parse(orjson.dumps(one_to_one)).messages[0].skip_reason == ""


@pytest.mark.parametrize("kind", ["page", "instagram", "user", 7])
def test_another_products_webhook_yields_nothing(kind: Any) -> None:
    # One Meta app may serve Messenger or Instagram as well, signing with the same secret: a
    # message-shaped entry of theirs is not a WhatsApp customer's, and is never answered.
    doc = {**payloads.delivery(messages=[payloads.message("text")]), "object": kind}
    delivery = parse.parse(orjson.dumps(doc))
    assert not delivery.messages and not delivery.statuses and not delivery.events
    assert delivery.dropped and "is not WhatsApp's" in delivery.dropped[0]
    # WhatsApp's own, and a body without `object` (as some tools post), are read as ever.
    for same in ("whatsapp_business_account", None):
        doc = {**doc, "object": same} if same else {k: v for k, v in doc.items() if k != "object"}
        assert len(parse.parse(orjson.dumps(doc)).messages) == 1


def assert_storable(value: str) -> None:
    assert "\x00" not in value
    value.encode("utf-8")  # no lone surrogate


def assert_delivery_storable(delivery: parse.Delivery) -> None:
    """Every value protobuf, the state service and PostgreSQL will be given holds."""
    for m in delivery.messages:
        for f in dataclasses.fields(m):
            if isinstance(value := getattr(m, f.name), str):
                assert_storable(value)
        assert 0 < len(m.message_id) <= parse.MAX_ID_CHARS
        assert len(m.wa_id) <= parse.MAX_ID_CHARS and len(m.phone_number_id) <= 64
        assert 0 <= m.timestamp <= parse.MAX_TIMESTAMP
        assert m.skip_reason or (m.phone_number_id.isdigit() and m.wa_id and m.timestamp > 0)
        assert isinstance(orjson.loads(m.payload_json), dict)
        wire.message_to_proto(m).SerializeToString()
    for s in delivery.statuses:
        for f in dataclasses.fields(s):
            if isinstance(value := getattr(s, f.name), str):
                assert_storable(value)
        assert 0 <= s.timestamp <= parse.MAX_TIMESTAMP
        assert 0 < len(s.message_id) <= parse.MAX_ID_CHARS
        wire.status_to_proto(s).SerializeToString()


@settings(max_examples=400)
@given(doc=hostile_deliveries())
def test_parse_yields_only_storable_values_from_any_delivery(doc: dict[str, Any]) -> None:
    # As Python objects (no encoder in between) and as the bytes a sender would post.
    assert_delivery_storable(parse.parse_obj(doc))
    try:
        body = json.dumps(doc).encode()
    except ValueError:  # a NaN or infinity: JSON has none
        return
    delivery = parse.parse(body)
    assert_delivery_storable(delivery)
    messages = doc["entry"][0]["changes"][0]["value"]["messages"]
    assert len(delivery.messages) == len(messages)
