"""Human handoff's pieces without a network: the `handoff` setting, where a turn starts after
a release, naming a customer, the 24-hour window."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common import customers
from services.agent import agents
from services.agent.operator import window_refusal

ROOT = Path(__file__).resolve().parents[2]
AGENT = (
    '[agents.{name}]\ndescription = "x"\nsystem_prompt = "p"\ntemperature = {temperature}\n'
    "token_limit = 10\nkeywords = [{keywords}]\n{extra}"
)


def _config(tmp_path: Path, extra: str = "", temperature: str = "0.1") -> Path:
    path = tmp_path / "agents.toml"
    path.write_text(
        'default = "front"\n'
        + AGENT.format(name="front", temperature="0.1", keywords="", extra="")
        + AGENT.format(name="person", temperature=temperature, keywords='"human"', extra=extra)
    )
    return path


def test_the_shipped_handoff_agent_hands_off_and_no_other_does() -> None:
    catalog = agents.load(ROOT / "config" / "agents.toml")
    assert [a.name for a in catalog.agents.values() if a.handoff] == ["handoff"]


def test_handoff_is_a_bool_setting(tmp_path: Path) -> None:
    assert agents.load(_config(tmp_path, "handoff = true\n")).agents["person"].handoff
    assert not agents.load(_config(tmp_path)).agents["person"].handoff
    with pytest.raises(agents.AgentConfigError, match=r":14: agents.person.handoff has the wrong"):
        agents.load(_config(tmp_path, 'handoff = "yes"\n'))
    # A bool is still refused where a number is meant.
    with pytest.raises(agents.AgentConfigError, match="temperature has the wrong type"):
        agents.load(_config(tmp_path, temperature="true"))


def test_a_turn_after_a_release_starts_from_the_default_agent(tmp_path: Path) -> None:
    catalog = agents.load(_config(tmp_path, "handoff = true\n"))
    assert catalog.resume_from("person") == "front"
    assert catalog.resume_from(None) == "front"
    assert catalog.resume_from("front") == "front"
    # Asking for a person again still routes there.
    assert catalog.route(catalog.resume_from("person"), "a human please") == "person"


@given(
    st.text(alphabet="0123456789", min_size=1, max_size=15),
    st.lists(st.sampled_from([" ", "-", "(", ")", "."]), max_size=4),
)
def test_a_phone_number_is_its_digits_however_it_is_written(digits: str, seps: list[str]) -> None:
    written = "+" + "".join(d + (seps[i] if i < len(seps) else "") for i, d in enumerate(digits))
    assert customers.key(written) == digits


@given(st.from_regex(r"[A-Z]{2}\.[0-9A-Za-z]{5,30}", fullmatch=True))
def test_a_bsuid_is_kept_as_given(bsuid: str) -> None:
    assert customers.key(f" {bsuid} ") == bsuid


def test_choosing_the_customer_conversation() -> None:
    a = {"id": 1, "phone_number_id": "A"}
    a_older = {"id": 2, "phone_number_id": "A"}
    b = {"id": 3, "phone_number_id": "B"}
    assert customers.choose([a, a_older], "155", "") is a
    with pytest.raises(customers.AmbiguousCustomer, match="--number"):
        customers.choose([a, b], "155", "")
    with pytest.raises(customers.UnknownCustomer, match="on business number C"):
        customers.choose([], "155", "C")


def test_the_24_hour_window() -> None:
    now = dt.datetime(2026, 1, 2, 12, tzinfo=dt.UTC)
    assert window_refusal(now - dt.timedelta(hours=23, minutes=59), now) is None
    late = window_refusal(now - dt.timedelta(hours=24, seconds=1), now)
    assert late is not None and late.startswith("outside the 24-hour window")
    assert window_refusal(None, now) is not None
