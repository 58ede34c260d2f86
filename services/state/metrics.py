"""Prometheus metrics of the state service."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

INGESTED = Counter("wa_state_ingested_total", "Messages offered to ingest", ["result"])
OUTCOMES = Counter("wa_messages_total", "Messages by final outcome of a turn", ["outcome"])
TURN_SECONDS = Histogram(
    "wa_turn_seconds",
    "Duration of one agent turn as seen by the state service",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)
LOCK_CONTENDED = Counter("wa_lock_contended_total", "Conversation lock attempts that found it held")
LOCK_ERRORS = Counter("wa_lock_errors_total", "Conversation lock attempts that failed (Redis)")
ACTIVE_CONVERSATIONS = Gauge("wa_active_conversations", "Conversations being driven here")
RECOVERED = Counter("wa_sweeper_recovered_total", "Work the sweeper picked up again", ["kind"])
SWEEPS = Counter("wa_sweeper_runs_total", "Sweeper runs", ["result"])
HANDBACK = Counter(
    "wa_handback_total",
    "Conversations a stopping replica handed back (given), or that this one took (taken)",
    ["direction"],
)
STALE_WRITES = Counter("wa_stale_fence_total", "Writes refused because a later holder owns it")
DELIVERY_FAILED = Counter(
    "wa_reply_delivery_failed_total",
    "Delivery statuses `failed` stored: Meta could not deliver a message of ours",
)
PRUNED = Counter(
    "wa_retention_pruned_rows_total", "Rows deleted by retention (prune passes)", ["table"]
)
CLEARED = Counter(
    "wa_retention_cleared_values_total",
    "Values cleared by retention in rows it keeps: a customer's name and username beside an"
    " opt-out, counted once per conversation",
    ["column"],
)
PRUNE_RUNS = Counter(
    "wa_retention_prune_runs_total",
    "Background prune passes (ok, busy: another ran, error)",
    ["result"],
)
FORGOTTEN = Counter("wa_retention_forget_total", "Customers erased by `wa forget`")
