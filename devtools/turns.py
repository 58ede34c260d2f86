"""A turn's save as the agent makes it for a short answer (services/agent/turn.py, its rules
backend): the question and the answer appended to the context. For tests and benchmarks that
drive turns through the stores without the agent service."""

from __future__ import annotations

from services.agent.saves import Save
from services.state.store import WorkItem


def answer_save(item: WorkItem, *, correlation_id: str = "c") -> Save:
    """The save of `item`'s turn before its reply, "hello", is sent."""
    return Save(
        conversation_id=item.conversation_id,
        token=item.fence_token,
        message_id=item.message_id,
        agent_type="concierge",
        previous_agent_type="concierge",
        appended=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        keep=20,
        token_count=12,
        reply_text="hello",
        tokens_in=5,
        tokens_out=3,
        latency_ms=10,
        correlation_id=correlation_id,
        send_started=True,
    )
