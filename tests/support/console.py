"""Driving the operator console in tests: operators added with the real `wa operator add`,
logins through the real login form, deliveries to more than one business number."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from tests.support import payloads
from tests.support.system import System

WA = str(Path(sys.executable).parent / "wa")
PASSWORD = "correct horse battery"
NUMBER_A = payloads.PHONE_NUMBER_ID
NUMBER_B = "100000000000002"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def wa_operator(
    system: System, *args: str, stdin: str | None = None, password: str | None = PASSWORD
) -> subprocess.CompletedProcess[str]:
    """`wa operator ...` as an operator runs it (WA_OPERATOR_PASSWORD unless None)."""
    env = {**os.environ, **system.env}
    env.pop("DATABASE_URL", None)
    env.pop("WA_OPERATOR_PASSWORD", None)
    if password is not None:
        env["WA_OPERATOR_PASSWORD"] = password
    return subprocess.run(
        [WA, "operator", *args], env=env, input=stdin, capture_output=True, text=True, timeout=60
    )


def add_operator(system: System, name: str, role: str, numbers: str = "") -> None:
    args = ["add", name, "--role", role] + (["--numbers", numbers] if numbers else [])
    done = wa_operator(system, *args)
    assert done.returncode == 0, done.stderr


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, html[:500]
    return found.group(1)


async def login(
    system: System, name: str, password: str = PASSWORD
) -> tuple[httpx.AsyncClient, httpx.Response]:
    """A client with the console's cookies, and the login's answer (303 when logged in)."""
    client = httpx.AsyncClient(base_url=system.console_url, timeout=30)
    page = await client.get("/login")
    resp = await client.post(
        "/login", data={"csrf": csrf_of(page.text), "name": name, "password": password}
    )
    return client, resp


@contextlib.asynccontextmanager
async def logged_in(system: System, name: str) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    """A logged-in client and its session's CSRF token."""
    client, resp = await login(system, name)
    try:
        assert resp.status_code == 303, resp.text
        page = await client.get("/conversations")
        yield client, csrf_of(page.text)
    finally:
        await client.aclose()


def delivery_to(number: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    doc = payloads.delivery(messages=messages)
    doc["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] = number
    return doc
