"""Databases as an earlier release left them, for tests of an upgrade in place: they are made
by `devtools.servers`, shared with bench/."""

from devtools.servers import migrated_before

__all__ = ["migrated_before"]
