"""Process-wide runtime settings each service applies once started, before it takes traffic.

CPython's cyclic collector runs a generation-0 pass every few hundred net allocations and
promotes what survives. With tracing on, each finished span waits in the export queue for a
few hundred milliseconds, survives two passes and lands in the oldest generation, whose
collections then walk the whole heap (every module, protobuf descriptor and gRPC object
loaded at start): long pauses in the gateway (figures in docs/benchmarks.md). Freezing what
start-up allocated takes that out of every pass, and rarer young passes let queued spans be
exported and freed before they are ever promoted (bench.ack tracing's method). Cyclic garbage
still gets collected, at worst after 20,000 allocations.
"""

from __future__ import annotations

import gc
import logging
from typing import TypeVar

from . import config, logs, telemetry, tls

S = TypeVar("S", bound=config.Base)

GC_THRESHOLDS = (20_000, 50, 100)


def settle() -> None:
    """Call once the process has loaded and built what it keeps for its whole life."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def load_settings(cls: type[S], service: str) -> S:
    """The service's settings, its JSON logs, its telemetry (`OTEL_*` of `.env` included) and
    its gRPC transport (the certificate of identity `service`); a setting that cannot be parsed
    or a certificate that cannot be read ends the process like any other bad configuration:
    one CRITICAL line, exit code 2."""
    try:
        settings = cls.from_env()
    except config.ConfigError as exc:
        # LOG_LEVEL itself may be the bad value: the one line is logged at the default level.
        logs.setup(service, "INFO")
        logging.getLogger(f"services.{service}").critical("configuration error: %s", exc)
        raise SystemExit(2) from exc
    logs.setup(service, settings.log_level)
    try:
        tls.configure(settings, service)
    except config.ConfigError as exc:
        logging.getLogger(f"services.{service}").critical("configuration error: %s", exc)
        raise SystemExit(2) from exc
    config.export_otel_from_dotenv()
    telemetry.init_telemetry(service, fast_path=settings.otel_fast_path)
    return settings
