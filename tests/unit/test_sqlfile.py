"""Named queries are sent without the comments above them: a database span is named by the
statement's first word, never "--"."""

from __future__ import annotations

import pytest

from common import sqlfile


@pytest.mark.parametrize("package", ["services.state", "services.agent", "services.dlq"])
def test_every_query_starts_with_its_statement(package: str) -> None:
    queries = sqlfile.load(package, "queries.sql")
    assert queries
    for name, query in queries.items():
        assert query.split(None, 1)[0].upper() in {"SELECT", "WITH", "INSERT", "UPDATE"}, name
