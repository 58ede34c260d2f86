"""Naming a customer's conversation the way an operator does: by phone number or BSUID, and
by business number when the customer talks to several (`wa handoff release`, `wa reply`, the
console). Each service runs its own query (`customer_conversations`, newest first); what it
found is judged here, the same way for all."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, TypeVar

# A row with `phone_number_id` (an asyncpg.Record, a dict).
R = TypeVar("R", bound=Any)

_PHONE = re.compile(r"^\+?[\d\s().-]+$")


class UnknownCustomer(Exception):
    """No conversation of this customer (on this business number)."""


class AmbiguousCustomer(Exception):
    """The customer talks to several business numbers and none was named."""


def key(text: str) -> str:
    """A phone number as WhatsApp writes it (digits only: "+1 555-000 1111" is 15550001111);
    anything else (a BSUID) as given."""
    text = text.strip()
    if _PHONE.match(text):
        return re.sub(r"\D", "", text)
    return text


def choose(rows: Sequence[R], customer: str, phone_number_id: str) -> R:
    """The conversation meant: the newest of the customer's on the one business number they
    use (or the one named). `rows` have `phone_number_id` and are newest first."""
    if not rows:
        where = f" on business number {phone_number_id}" if phone_number_id else ""
        raise UnknownCustomer(f"no conversation with customer {customer}{where}")
    numbers = sorted({str(r["phone_number_id"]) for r in rows})
    if len(numbers) > 1:
        raise AmbiguousCustomer(
            f"customer {customer} talks to several business numbers ({', '.join(numbers)}): "
            "name one with --number PHONE_NUMBER_ID"
        )
    return rows[0]
