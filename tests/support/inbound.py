"""The inbound message builder, made by `devtools.inbound`, shared with bench/."""

from devtools.inbound import inbound

__all__ = ["inbound"]
