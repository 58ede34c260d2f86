"""The one shape of each concept that crosses a service boundary.

A WhatsApp message, a delivery status and a customer event are parsed into these by the
gateway and stored from these by the state service; a turn is asked for and answered with
these by the state and agent services. `common/wire.py` is the one place where they become
protobuf messages and back, generated from these fields: a field added here and to the proto
travels without being copied by hand anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# The longest span `State.GetStats` answers for (GetStatsRequest.hours), in hours: 90 days.
STATS_MAX_HOURS = 24 * 90


@dataclass(frozen=True, slots=True)
class Message:
    """One WhatsApp message (common.proto InboundMessage)."""

    message_id: str
    phone_number_id: str
    wa_id: str  # the phone number: "" for a customer with a username (user_id is then set)
    contact_name: str
    type: str
    timestamp: int  # seconds; 0 when the message's own is not usable (the state uses now)
    text: str
    payload_json: str
    # Why it is stored as skipped without a turn ("" when it can be answered).
    skip_reason: str = ""
    # The customer's business-scoped user id (BSUID), its conversation's key when given.
    user_id: str = ""
    parent_user_id: str = ""
    username: str = ""  # display only, without "@"
    # The click-to-WhatsApp ad the message came from (`referral`), as a JSON object; "" if none.
    referral_json: str = ""


@dataclass(frozen=True, slots=True)
class Status:
    """One delivery status of an outbound message (common.proto StatusUpdate)."""

    message_id: str
    phone_number_id: str
    recipient_id: str
    status: str  # sent | delivered | read | failed
    timestamp: int
    payload_json: str
    error_code: str = ""
    callback_data: str = ""
    recipient_user_id: str = ""


@dataclass(frozen=True, slots=True)
class Event:
    """A webhook about a customer: its BSUID changed, or its marketing preferences
    (common.proto CustomerEvent)."""

    event_id: str
    phone_number_id: str
    kind: str  # user_id_update | user_preferences
    wa_id: str
    user_id: str
    previous_user_id: str
    parent_user_id: str
    timestamp: int
    payload_json: str
    preference_category: str = ""
    preference_value: str = ""
    # The phone number before a change of number, when Meta says which (the sender's).
    previous_wa_id: str = ""


@dataclass(frozen=True, kw_only=True)
class TurnRequest:
    """One turn: the message to answer under the conversation's fencing token
    (agent.proto ReplyRequest)."""

    message_id: str
    conversation_id: int
    fence_token: int
    phone_number_id: str
    wa_id: str  # the phone number: "" for a customer known only by its BSUID
    text: str
    correlation_id: str
    probe: bool = False  # redriven by an operator: an open circuit breaker lets it through
    user_id: str = ""
    # The turn's stored state, read by the statement that started the turn (agent.proto
    # ReplyRequest); without has_state the agent reads it itself.
    has_state: bool = False
    message_type: str = ""
    payload_json: str = ""
    # "" when the conversation has no context yet; never in a repr (logs: no conversations).
    context_json: str = field(default="", repr=False)
    context_agent_type: str = ""
    has_reply: bool = False
    reply_text: str = ""
    reply_payload_json: str = ""
    reply_message_id: str = ""
    agent_type: str = ""
    send_started: bool = False
    absorbed_message_ids: tuple[str, ...] = ()
    last_customer_at: float = 0.0  # seconds since the epoch; 0: the customer never wrote
    db_now: float = 0.0
    # The caller records a single-message reply's id with the turn's final transition.
    defer_sent_record: bool = False


@dataclass(frozen=True, kw_only=True)
class TurnResult:
    """How a turn ended (agent.proto ReplyResponse)."""

    outcome: str  # replied | failed
    reply_text: str = ""
    reply_message_id: str = ""
    error_class: str = ""
    error_message: str = ""
    retryable: bool = True
    agent_type: str = ""
    # Sent by a run that died before recording it, and confirmed by its status webhook.
    confirmed_by_status: bool = False
    # Messages the reply was sent as (a long reply is split).
    parts: int = 1
    # The conversation's other waiting messages this reply answered too (a debounced burst),
    # in order; the state service moves them to replied with this turn.
    absorbed_message_ids: tuple[str, ...] = ()
    # The agent type that answered hands the conversation to a person (README, "Human
    # handoff"): the state service stops turns for it until an operator releases it.
    handoff: bool = False
    # reply_message_id is sent and not yet recorded: the caller (which asked for it with
    # defer_sent_record) records it with the turn's final transition.
    sent_unrecorded: bool = False
    # Why the fallback reply answered (the message could not be read); "" otherwise.
    fallback: str = ""

    @property
    def detail(self) -> str:
        """How the turn ended, for the audit trail."""
        if self.outcome != "replied":
            return f"{self.error_class}: {self.error_message}"
        if self.fallback:
            return f"{self._sent()}; the fallback reply: {self.fallback}"
        return self._sent()

    def _sent(self) -> str:
        if self.parts > 1:
            return f"reply sent in {self.parts} messages, the last as {self.reply_message_id}"
        if self.confirmed_by_status:
            return f"reply sent as {self.reply_message_id} (confirmed by its status webhook)"
        if self.reply_message_id:
            return f"reply sent as {self.reply_message_id}"
        return "reply recorded, not sent (no WHATSAPP_ACCESS_TOKEN)"


@dataclass(frozen=True, kw_only=True)
class Failure:
    """A failed message for the dead-letter queue (dlq.proto EnqueueRequest)."""

    message_id: str
    conversation_id: int
    error_class: str
    error_message: str
    retryable: bool
    correlation_id: str
