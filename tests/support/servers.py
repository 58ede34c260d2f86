"""PostgreSQL and Redis for the tests: they live in `devtools.servers`, shared with bench/."""

from devtools.servers import Postgres, Redis, with_database

__all__ = ["Postgres", "Redis", "with_database"]
