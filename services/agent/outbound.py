"""The one policy of the agent's outbound HTTP calls (the Graph API and the model): which
answers are worth another try, how long to wait before it (`Retry-After` or backoff with full
jitter), and when to stop (attempts, the turn's deadline). And what each documented Graph API
error code means for a reply: retry now, leave it to the dead-letter queue, or give up."""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime

from common import retry

from .deadline import Deadline

# HTTP statuses another try can fix, besides every 5xx: a timeout, a conflict, throttling.
# Any other 4xx is our request's fault and is never retried.
RETRYABLE_STATUSES = frozenset({408, 409, 429})
# A Retry-After longer than this is read as this: a server asking for more is treated as down.
RETRY_AFTER_CAP_SECONDS = 120.0


def retryable_status(status: int) -> bool:
    return status >= 500 or status in RETRYABLE_STATUSES


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds a `Retry-After` header (lower-case keys) asks for, in either of its forms
    (delta-seconds or an HTTP date), capped; None when absent or unreadable."""
    value = (headers or {}).get("retry-after")
    if not value:
        return None
    seconds = retry.parse_retry_after(value, RETRY_AFTER_CAP_SECONDS)
    if seconds is not None:
        return seconds
    try:
        at = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if at is None or at.tzinfo is None:
        return None
    return max(0.0, min(at.timestamp() - time.time(), RETRY_AFTER_CAP_SECONDS))


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries of one call: at most `max_retries` after the first attempt, each wait
    `Retry-After` when the server sent one, else full jitter on `backoff_base` up to
    `backoff_cap`; and no wait that would end within `margin` of the turn's deadline."""

    max_retries: int
    backoff_base: float
    backoff_cap: float
    margin: float = 0.0
    # Injected so that tests can see the waits without spending them.
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep

    def exhausted(self, attempt: int) -> bool:
        """Whether attempt number `attempt` (1-based) was the last one allowed."""
        return attempt > self.max_retries

    def delay(self, attempt: int, headers: Mapping[str, str] | None = None) -> float:
        """The wait after failed attempt number `attempt`."""
        asked = retry_after(headers)
        if asked is not None:
            return asked
        return retry.full_jitter(attempt, self.backoff_base, self.backoff_cap)

    def fits(self, delay: float, deadline: Deadline) -> bool:
        """Whether waiting `delay` still leaves the next attempt time before the deadline:
        when it does not, the failed attempt's error is the turn's, at once."""
        return deadline.allows(delay + self.margin)


class GraphAction(enum.Enum):
    """What a Graph API error means for the reply."""

    # Transient: tried again within the turn (bounded by the policy), then the turn fails
    # retryable and the dead-letter queue redrives it.
    RETRY = "retry"
    # Not fixed within seconds, but not the message's fault (our token, our account, a
    # temporary block): the turn fails at once, retryable; the dead-letter queue redrives it
    # after its backoff, and an operator can once the cause is fixed.
    DLQ = "dlq"
    # No later try can succeed for this message: the turn fails, not retryable, and the item
    # is dead at once (only an operator redrives it).
    GIVE_UP = "give_up"


@dataclass(frozen=True)
class GraphCode:
    action: GraphAction
    name: str


_R, _D, _G = GraphAction.RETRY, GraphAction.DLQ, GraphAction.GIVE_UP

# The Cloud API's documented error codes
# (https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes).
GRAPH_CODES: dict[int, GraphCode] = {
    # Authorization: our token or app, never the message; fixed by an operator.
    0: GraphCode(_D, "AuthException: the app user could not be authenticated"),
    3: GraphCode(_D, "API method: the app lacks the capability or permission"),
    10: GraphCode(_D, "permission denied or removed"),
    190: GraphCode(_D, "access token expired or invalid (WHATSAPP_ACCESS_TOKEN)"),
    131005: GraphCode(_D, "access denied (permission)"),
    # Throttling: the same request succeeds once the window has passed.
    4: GraphCode(_R, "too many calls from the app"),
    17: GraphCode(_R, "too many calls from the user"),
    341: GraphCode(_R, "application limit reached"),
    80007: GraphCode(_R, "WhatsApp Business Account rate limit"),
    130429: GraphCode(_R, "Cloud API throughput rate limit"),
    131048: GraphCode(_R, "spam rate limit: too many messages from this number"),
    131056: GraphCode(_R, "pair rate limit: too many messages to this customer"),
    # Integrity: the account, not the message; lifted in time or by an appeal.
    368: GraphCode(_D, "temporarily blocked for policy violations"),
    131031: GraphCode(_D, "business account locked"),
    130497: GraphCode(_G, "business account may not message users in this country"),
    # Temporary failures on Meta's side.
    1: GraphCode(_R, "unknown API error: invalid request or server error"),
    2: GraphCode(_R, "API service temporarily unavailable"),
    131000: GraphCode(_R, "something went wrong (generic)"),
    131016: GraphCode(_R, "service unavailable"),
    133004: GraphCode(_R, "server temporarily unavailable"),
    131057: GraphCode(_D, "business account in maintenance mode"),
    # The message or its recipient: the same request fails the same way.
    33: GraphCode(_G, "parameter value not valid (phone number id deleted?)"),
    100: GraphCode(_G, "invalid parameter"),
    130472: GraphCode(_G, "the customer's number is part of an experiment"),
    131008: GraphCode(_G, "required parameter missing"),
    131009: GraphCode(_G, "parameter value not valid"),
    131021: GraphCode(_G, "recipient cannot be the sender"),
    131026: GraphCode(_G, "message undeliverable (no WhatsApp, old app, terms not accepted)"),
    131037: GraphCode(_D, "the number needs its display name approved"),
    131042: GraphCode(_D, "business eligibility: payment issue"),
    131045: GraphCode(_D, "incorrect certificate: the number is not registered"),
    131047: GraphCode(_G, "re-engagement: over 24 h since the customer last wrote"),
    131049: GraphCode(_G, "Meta chose not to deliver (ecosystem engagement)"),
    131050: GraphCode(_G, "the customer stopped marketing messages"),
    131051: GraphCode(_G, "unsupported message type"),
    131052: GraphCode(_G, "media download error"),
    131053: GraphCode(_G, "media upload error"),
    131062: GraphCode(_G, "a BSUID is not a recipient this message may go to"),
    135000: GraphCode(_G, "generic user error"),
}


def graph_code(code: int) -> GraphCode | None:
    """The code's meaning; ranges stand for their whole family."""
    known = GRAPH_CODES.get(code)
    if known is not None:
        return known
    if 200 <= code <= 299:
        return GraphCode(_D, "API permission (2xx family)")
    if 132000 <= code <= 132999:
        # Templates (132000 parameter count, 132001 does not exist, 132005 translated text
        # too long, 132007 policy, 132012 parameter format, 132015 paused, 132016 disabled,
        # ...): the template has to change first.
        return GraphCode(_G, "template error (132xxx)")
    if 133000 <= code <= 133999:
        # Phone number registration (deregistration incomplete, PIN mismatch, ...).
        return GraphCode(_D, "phone number registration (133xxx)")
    return None


def graph_action(status: int, code: str) -> GraphAction:
    """What an error answer (HTTP `status`, Graph `code`, "" when none) means: a documented
    code decides whatever the status; an undocumented one on a 4xx is the request's fault;
    otherwise the status decides."""
    if code.isdigit():
        known = graph_code(int(code))
        if known is not None:
            return known.action
        if status < 500 and not retryable_status(status):
            return GraphAction.GIVE_UP
    return GraphAction.RETRY if retryable_status(status) else GraphAction.GIVE_UP
