"""Named SQL queries kept in `.sql` files: blocks that start with `-- name: NAME`."""

from __future__ import annotations

import re
from importlib import resources

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)


def load(package: str, filename: str) -> dict[str, str]:
    text = (resources.files(package) / filename).read_text()
    parts = _NAME.split(text)
    queries = {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}
    if not queries:
        raise ValueError(f"no named queries in {package}/{filename}")
    return queries
