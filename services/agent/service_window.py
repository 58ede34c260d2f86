"""WhatsApp's customer service window: a free-form reply (text or interactive) may only be
sent within 24 hours of the customer's last message in the conversation; after it, only a
message template (the Graph API refuses anything else with error 131047).

https://developers.facebook.com/docs/whatsapp/cloud-api/guides/send-messages#customer-service-windows
"""

from __future__ import annotations

import datetime as dt

WINDOW = dt.timedelta(hours=24)
# The words an operator finds in the dead-letter queue and `wa trace`.
REASON = "outside the 24-hour window"
ERROR_CLASS = "OutsideCustomerWindow"
# The Graph API's "re-engagement message" error: the window had closed when we sent.
GRAPH_CODE = "131047"


def check(last_customer_message_at: dt.datetime | None, now: dt.datetime) -> str | None:
    """None while a free-form reply may be sent; else why not (containing REASON). The
    customer's time is their message's own timestamp (when they wrote, as Meta counts), and
    `now` the database's clock, so no two service clocks are compared."""
    if last_customer_message_at is None:
        return f"{REASON}: the customer has not written in this conversation"
    age = now - last_customer_message_at
    if age < WINDOW:
        return None
    hours = age.total_seconds() / 3600
    return f"{REASON}: the customer last wrote {hours:.1f} hours ago"
