"""Agent domain pieces without a network: configuration, token window, breaker, rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.agent import agents, window
from services.agent.backends import RulesBackend
from services.agent.breaker import CLOSED, HALF_OPEN, OPEN, BreakerOpen, CircuitBreaker

ROOT = Path(__file__).resolve().parents[2]


def test_the_shipped_configuration_has_six_agent_types() -> None:
    catalog = agents.load(ROOT / "config" / "agents.toml")
    assert catalog.default == "concierge"
    assert {"concierge", "bookings", "payments", "support", "marketplace", "handoff"} <= set(
        catalog.agents
    )
    assert catalog.route("concierge", "Can I BOOK a table?") == "bookings"
    assert catalog.route("bookings", "I want a refund") == "payments"
    assert catalog.route("payments", "thanks!") == "payments"
    assert catalog.route("payments", "let me talk to a human") == "handoff"


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ('default = "a"\n[agents.a]\ndescription = "x"\n', 2, "missing"),
        (
            'default = "a"\n[agents.a]\ndescription = "x"\nsystem_prompt = "p"\nmodel = "m"\n'
            'temperature = "hot"\ntoken_limit = 10\nkeywords = []\n',
            6,
            "wrong type",
        ),
        (
            'default = "a"\n[agents.a]\ndescription = "x"\nsystem_prompt = "p"\nmodel = "m"\n'
            "temperature = 0.1\ntoken_limit = -1\nkeywords = []\n",
            7,
            "positive",
        ),
        (
            'default = "a"\n[agents.a]\ndescription = "x"\nsystem_prompt = "p"\nmodel = "m"\n'
            'temperature = 0.1\ntoken_limit = 1\nkeywords = []\ncolour = "red"\n',
            9,
            "not a known",
        ),
        (
            'default = "b"\n[agents.a]\ndescription = "x"\nsystem_prompt = "p"\nmodel = "m"\n'
            "temperature = 0.1\ntoken_limit = 1\nkeywords = []\n",
            1,
            "not defined",
        ),
        ("default = \n", 1, "line 1"),
    ],
)
def test_invalid_configuration_names_the_line(
    tmp_path: Path, text: str, line: int, words: str
) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(text)
    with pytest.raises(agents.AgentConfigError) as info:
        agents.load(path)
    message = str(info.value)
    assert words in message
    assert f"{path}:{line}" in message or f"line {line}" in message


def _history(n: int, words: int) -> list[dict[str, str]]:
    return [
        {"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i} " + "word " * words}
        for i in range(n)
    ]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), words=st.integers(0, 120), limit=st.integers(60, 2000))
def test_the_window_fits_keeps_the_newest_and_drops_oldest_first(
    n: int, words: int, limit: int
) -> None:
    history = _history(n, words)
    win = window.fit("You are helpful.", history, limit)
    assert win.messages[0] == {"role": "system", "content": "You are helpful."}
    kept = win.messages[1:]
    total = sum(window.message_tokens(m) for m in win.messages) + window.REPLY_PRIMING
    assert total <= limit
    assert kept, "the newest message is never dropped"
    assert kept[-1]["content"] in history[-1]["content"]
    # Everything but the newest message is kept whole, as a suffix of the history.
    assert kept[:-1] == history[len(history) - len(kept) : -1]
    assert win.dropped == n - len(kept)


def test_only_an_oversized_newest_message_is_cut_keeping_its_end() -> None:
    huge = {"role": "user", "content": "start " + "filler " * 2000 + "the actual question?"}
    win = window.fit("sys", [{"role": "user", "content": "old"}, huge], 300)
    assert len(win.messages) == 2
    assert win.messages[1]["content"].endswith("the actual question?")
    assert win.tokens <= 300


def test_breaker_opens_fails_fast_probes_and_closes() -> None:
    now = [0.0]
    breaker = CircuitBreaker("t", failure_threshold=3, reset_after=10, clock=lambda: now[0])
    for _ in range(3):
        breaker.before_call()
        breaker.failure()
    assert breaker.state == OPEN
    with pytest.raises(BreakerOpen):
        breaker.before_call()
    now[0] = 10.5
    assert breaker.state == HALF_OPEN
    breaker.before_call()  # the probe
    with pytest.raises(BreakerOpen):
        breaker.before_call()  # only one probe at a time
    breaker.failure()
    assert breaker.state == OPEN
    now[0] = 21
    breaker.before_call()
    breaker.success()
    assert breaker.state == CLOSED


async def test_rules_backend_is_deterministic_and_useful() -> None:
    catalog = agents.load(ROOT / "config" / "agents.toml")
    backend = RulesBackend()
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "Hello!"}]
    first = await backend.complete(catalog.get("concierge"), msgs)
    again = await backend.complete(catalog.get("concierge"), msgs)
    assert first == again and "help" in first.text.lower()
    echo = await backend.complete(
        catalog.get("bookings"),
        [{"role": "system", "content": "s"}, {"role": "user", "content": "table for 4 at 8"}],
    )
    assert "table for 4 at 8" in echo.text and "booking" in echo.text
    assert echo.tokens_in > 0 and echo.tokens_out > 0
