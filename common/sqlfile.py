"""Named SQL queries kept in `.sql` files: blocks that start with `-- name: NAME`."""

from __future__ import annotations

import re
from importlib import resources

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)
_LEADING_COMMENTS = re.compile(r"\A(?:\s*--[^\n]*\n)+")


def _statement(body: str) -> str:
    # The comments above a statement are for its reader, in the file. Sent along, they would
    # name its database span ("--" instead of the statement's first word) and be parsed on
    # every call.
    return _LEADING_COMMENTS.sub("", body.strip() + "\n").strip()


def load(package: str, filename: str) -> dict[str, str]:
    text = (resources.files(package) / filename).read_text()
    parts = _NAME.split(text)
    queries = {name: _statement(body) for name, body in zip(parts[1::2], parts[2::2], strict=True)}
    if not queries:
        raise ValueError(f"no named queries in {package}/{filename}")
    return queries
