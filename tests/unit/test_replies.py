"""Reply buttons, lists and templates: whatever text they are given, what is sent passes
WhatsApp's documented limits (as the fake Graph API checks them) or is refused before sending;
a model's tool call becomes one, plain text, or a ModelError, never anything else; the 24-hour
rule."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.agent import agents, replies, service_window
from services.agent.backends import ModelError, _completion
from services.agent.limits import LimitError
from tests.support.fakes import FakeGraph, tool_call

ROOT = Path(__file__).resolve().parents[2]
TEXT = st.text(st.characters(codec="utf-8"), max_size=90)
OPTION = st.builds(
    replies.Option,
    id=st.text("abcdefghij-0123456789", min_size=1, max_size=30),
    title=TEXT,
    description=TEXT,
)


def sent_body(reply: replies.Structured) -> dict[str, Any]:
    return {"to": "15550001111", **replies.graph_content(reply)}


@given(
    body=TEXT.map(lambda t: t * 20),
    header=TEXT,
    footer=TEXT,
    buttons=st.lists(OPTION, min_size=0, max_size=4),
    button=TEXT,
    sections=st.lists(
        st.builds(replies.Section, title=TEXT, rows=st.lists(OPTION, max_size=6).map(tuple)),
        max_size=3,
    ),
    kind=st.sampled_from(["buttons", "list"]),
)
def test_a_fitted_reply_is_one_meta_accepts_or_is_refused_before_sending(
    body: str,
    header: str,
    footer: str,
    buttons: list[replies.Option],
    button: str,
    sections: list[replies.Section],
    kind: Any,
) -> None:
    reply = replies.Structured(
        kind=kind,
        body=body,
        header=header,
        footer=footer,
        buttons=tuple(buttons) if kind == "buttons" else (),
        button=button,
        sections=tuple(sections) if kind == "list" else (),
    )
    try:
        fitted = replies.fit(reply)
    except LimitError:
        return
    replies.check(fitted)
    assert FakeGraph.structured_limit_error(sent_body(fitted)) is None
    # Stored and read back, it is the same message.
    assert replies.from_json(json.loads(json.dumps(replies.to_json(fitted)))) == fitted


def test_too_long_titles_are_trimmed_and_too_many_options_refused() -> None:
    long = replies.Structured(
        kind="buttons",
        body="Pick one",
        buttons=(replies.Option("a", "A much too long button title"), replies.Option("b", "B")),
    )
    fitted = replies.fit(long)
    assert fitted.buttons[0].title == "A much too long\u2026"
    assert len(fitted.buttons[0].title) <= replies.BUTTON_TITLE_MAX
    four = replies.Structured(
        kind="buttons", body="x", buttons=tuple(replies.Option(str(n), str(n)) for n in range(4))
    )
    with pytest.raises(LimitError, match="1 to 3"):
        replies.fit(four)
    rows = tuple(replies.Option(str(n), f"Row {n}") for n in range(11))
    eleven = replies.Structured(
        kind="list", body="x", button="Open", sections=(replies.Section("", rows),)
    )
    with pytest.raises(LimitError, match="10 rows"):
        replies.fit(eleven)


def test_eleven_configured_rows_refuse_the_configuration(tmp_path: Path) -> None:
    shipped = (ROOT / "config" / "agents.toml").read_text()
    rows = ", ".join(f'{{ id = "r{n}", title = "Row {n}" }}' for n in range(11))
    config = tmp_path / "agents.toml"
    config.write_text(
        shipped.replace(
            "[agents.payments]",
            f'[[agents.bookings.choices.sections]]\ntitle = "More"\nrows = [{rows}]\n\n'
            "[agents.payments]",
            1,
        )
    )
    with pytest.raises(agents.AgentConfigError, match=r"agents\.bookings\.choices.*10 rows"):
        agents.load(config)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c, max_size=4),
    max_leaves=12,
)


@given(
    name=st.sampled_from(["reply_with_buttons", "reply_with_list", "other", ""]),
    arguments=JSON.map(json.dumps) | st.text(max_size=40),
    content=st.none() | st.text(max_size=20),
)
def test_any_tool_call_becomes_a_reply_text_or_a_model_error(
    name: str, arguments: str, content: str | None
) -> None:
    _, body, _ = tool_call(name, arguments, content)
    try:
        completion = _completion(body, 1)
    except ModelError as exc:
        assert exc.retryable
        return
    assert completion.text.strip()
    if completion.reply is not None:
        assert FakeGraph.structured_limit_error(sent_body(completion.reply)) is None


def test_the_window_is_24_hours_from_the_customers_last_message() -> None:
    now = dt.datetime(2026, 12, 2, 12, tzinfo=dt.UTC)
    assert service_window.check(now - dt.timedelta(hours=23, minutes=59), now) is None
    closed = service_window.check(now - dt.timedelta(hours=24), now)
    assert closed is not None and service_window.REASON in closed
    assert service_window.check(None, now) is not None
