"""The console's small pure parts: trace links from a traceparent, server-drawn charts,
password hashes."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from services.console import charts, passwords
from services.console.app import trace_id


def test_a_traceparent_gives_its_trace_id() -> None:
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert trace_id(tp) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert trace_id("") == ""
    assert trace_id("00-short-00f067aa0ba902b7-01") == ""


@given(st.text())
def test_any_text_gives_a_trace_id_of_its_own_or_none(text: str) -> None:
    got = trace_id(text)
    assert got == "" or (len(got) == 32 and got in text)


def test_charts_draw_one_bar_per_known_value_and_escape_titles() -> None:
    svg = str(charts.bars([0, 2, None, 4], "<b>rate</b>", " s"))
    assert svg.count("<rect") == 3  # None: no bar
    assert "<b>" not in svg and "&lt;b&gt;rate" in svg
    heights = [float(h) for h in re.findall(r'height="([\d.]+)"', svg)]
    assert max(heights) == charts.HEIGHT and min(heights) == 0.0


def test_a_password_verifies_only_against_its_own_hash() -> None:
    stored = passwords.hash_password("correct horse battery")
    assert stored.startswith(f"scrypt${passwords.N}${passwords.R}${passwords.P}$")
    assert passwords.verify("correct horse battery", stored)
    assert not passwords.verify("correct horse batterY", stored)
    assert passwords.hash_password("correct horse battery") != stored  # salted
    for broken in ("", "plain", "scrypt$1$2", "bcrypt$a$b$c$d$e", stored.replace("scrypt", "x")):
        assert not passwords.verify("correct horse battery", broken)
    assert passwords.weak("short") and passwords.weak("twelve chars") is None
