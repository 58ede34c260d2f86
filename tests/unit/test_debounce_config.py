"""`debounce_seconds` in config/agents.toml: optional, off by default, bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.agent import agents

ROOT = Path(__file__).resolve().parents[2]
BASE = (
    'default = "a"\n[agents.a]\ndescription = "x"\nsystem_prompt = "p"\n'
    "temperature = 0.1\ntoken_limit = 10\nkeywords = []\n"
)


def test_off_unless_set_and_off_for_every_shipped_agent(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(BASE)
    assert agents.load(path).get("a").debounce_seconds == 0
    path.write_text(BASE + "debounce_seconds = 1.5\n")
    assert agents.load(path).get("a").debounce_seconds == 1.5
    path.write_text(BASE + "debounce_seconds = 2\n")
    assert agents.load(path).get("a").debounce_seconds == 2.0
    shipped = agents.load(ROOT / "config" / "agents.toml")
    assert {a.debounce_seconds for a in shipped.agents.values()} == {0.0}


@pytest.mark.parametrize("value", ["-1", "10.5", "nan", "inf", "true", '"1.5"'])
def test_out_of_bounds_or_not_a_number_names_the_line(tmp_path: Path, value: str) -> None:
    path = tmp_path / "agents.toml"
    path.write_text(BASE + f"debounce_seconds = {value}\n")
    with pytest.raises(agents.AgentConfigError, match=r"agents.toml:8: .*debounce_seconds"):
        agents.load(path)
