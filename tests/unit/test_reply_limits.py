"""What the agent sends stays within WhatsApp's documented limits, and what a model answers is
repaired or refused as one failed attempt, never an exception that escapes the turn."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.agent import agents, limits
from services.agent.backends import ModelError, _completion

TEXT = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8"), max_size=12),
        st.sampled_from([" ", "\n", "\n\n", ". ", "! ", "\u200d", "\u0301", "\U0001f600"]),
    ),
    max_size=300,
).map("".join)


@given(TEXT, st.integers(min_value=8, max_value=300))
def test_a_split_keeps_every_word_in_order_and_each_part_within_the_limit(
    text: str, limit: int
) -> None:
    parts = limits.split(text, limit)
    assert all(p.strip() and limits.length(p) <= limit for p in parts)
    # Only whitespace at the cuts is dropped: nothing else is lost, repeated or reordered.
    assert "".join("".join(parts).split()) == "".join(text.split())


@given(TEXT, st.integers(min_value=8, max_value=300))
def test_a_trim_is_one_message_within_the_limit(text: str, limit: int) -> None:
    trimmed = limits.trim(text, limit)
    assert limits.length(trimmed) <= limit
    if limits.length(text.strip()) > limit:
        assert trimmed.endswith(limits.ELLIPSIS)
    else:
        assert trimmed == text.strip()


def test_a_split_cuts_at_paragraphs_then_sentences_then_words() -> None:
    para = "First sentence here. Second one follows!"
    text = "\n\n".join([para] * 4)
    parts = limits.split(text, len(para) * 2 + 5)
    assert parts == ["\n\n".join([para] * 2)] * 2
    parts = limits.split("One two three. Four five six. Seven eight nine.", 32)
    assert parts == ["One two three. Four five six.", "Seven eight nine."]
    assert limits.split("abc defgh ijk", 9) == ["abc defgh", "ijk"]
    assert limits.split("abc defgh ijk", 8) == ["abc", "defgh", "ijk"]


def test_a_hard_cut_never_splits_a_character_that_renders_as_one() -> None:
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # one emoji of five code points
    parts = limits.split(family * 10, 9)
    assert all(limits.length(p) <= 9 for p in parts)
    assert all(not p.startswith("\u200d") for p in parts)
    accented = "e\u0301" * 20
    assert all(not p.startswith("\u0301") for p in limits.split(accented, 7))


def test_the_limits_are_checked_before_sending() -> None:
    limits.check_text("x" * 4096, "m" * 512)
    for body, callback in (
        ("x" * 4097, ""),
        ("\U0001f600" * 2049, ""),
        (" ", ""),
        ("x", "m" * 513),
    ):
        with pytest.raises(limits.LimitError):
            limits.check_text(body, callback)


def chat(message: Any, usage: Any = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "message": message}], "usage": usage}


@pytest.mark.parametrize(
    ("body", "text", "tokens"),
    [
        (chat({"content": "he\x00llo\x00"}, {"prompt_tokens": 3}), "hello", (3, 0)),
        (chat({"content": "ok"}, {"prompt_tokens": None, "completion_tokens": "x"}), "ok", (0, 0)),
        (chat({"content": "ok"}, "garbage"), "ok", (0, 0)),
        (chat({"content": "ok"}, {"prompt_tokens": -4, "completion_tokens": 2.0}), "ok", (0, 2)),
        (
            chat({"content": [{"type": "text", "text": "one "}, {"type": "image_url"}, "two"]}),
            "one two",
            (0, 0),
        ),
        (chat({"content": "lone \ud800 surrogate"}), "lone ? surrogate", (0, 0)),
    ],
)
def test_a_repairable_answer_is_repaired(body: Any, text: str, tokens: tuple[int, int]) -> None:
    completion = _completion(body, 1)
    assert (completion.text, completion.tokens_in, completion.tokens_out) == (text, *tokens)


@pytest.mark.parametrize(
    "body",
    [
        {"choices": []},
        {"choices": None},
        {},
        [],
        "text",
        chat(None),
        chat({"content": None}),
        chat({"content": " \x00 "}),
        chat({"content": [{"type": "image_url", "image_url": {}}]}),
        chat({"content": {"text": "a dict"}}),
    ],
)
def test_an_answer_without_text_is_a_retryable_model_error(body: Any) -> None:
    with pytest.raises(ModelError) as caught:
        _completion(body, 1)
    assert caught.value.retryable


def test_model_and_long_replies_are_optional_and_long_replies_is_validated(
    tmp_path: Path,
) -> None:
    base = (
        'default = "a"\n[agents.a]\ndescription = "x"\nsystem_prompt = "p"\n'
        "temperature = 0.1\ntoken_limit = 10\nkeywords = []\n"
    )
    path = tmp_path / "agents.toml"
    path.write_text(base)
    agent = agents.load(path).get("a")
    assert (agent.model, agent.long_replies) == ("", "split")
    path.write_text(base + 'long_replies = "trim"\nmodel = "m"\n')
    agent = agents.load(path).get("a")
    assert (agent.model, agent.long_replies) == ("m", "trim")
    path.write_text(base + 'long_replies = "drop"\n')
    with pytest.raises(agents.AgentConfigError, match=r"agents.toml:8: long_replies"):
        agents.load(path)


def test_a_reply_never_becomes_more_than_ten_messages_nor_a_shower_of_fragments() -> None:
    # Thousands of combining marks on one letter: no character boundary to cut at.
    marks = limits.fit("a" + "\u0301" * 6000, "split")
    assert len(marks) == 2 and all(limits.length(p) <= limits.TEXT_BODY_MAX for p in marks)
    # An answer of twenty full messages: ten, the last one ending in an ellipsis.
    long = limits.fit(("word " * 1000 + "\n\n") * 20, "split")
    assert len(long) == limits.MAX_PARTS
    assert long[-1].endswith(limits.ELLIPSIS)
    assert all(limits.length(p) <= limits.TEXT_BODY_MAX for p in long)


@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF)))
def test_length_counts_utf16_code_units(text: str) -> None:
    """ASCII, the BMP, astral characters (two units) and lone surrogates (one) alike."""
    assert limits.length(text) == len(text) + sum(1 for c in text if ord(c) > 0xFFFF)
    assert limits.length(text + "\ud83d") == limits.length(text) + 1
