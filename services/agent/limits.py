"""WhatsApp's documented limits on what we send, checked before sending (never learnt from a
Graph API error), and the split or trim of a model answer too long for one text message.

The Cloud API counts a text body in characters; counted here in UTF-16 code units, which is
never fewer than the code points, so a part that passes here passes whichever Meta counts.
"""

from __future__ import annotations

import re
import unicodedata

# https://developers.facebook.com/docs/whatsapp/cloud-api/reference/messages#text-object
TEXT_BODY_MAX = 4096
# Same page, biz_opaque_callback_data.
CALLBACK_DATA_MAX = 512
ELLIPSIS = "\u2026"


class LimitError(ValueError):
    """What we were about to send breaks a documented limit (a bug of ours, never retried)."""


def length(text: str) -> int:
    """Characters as the Cloud API may count them: UTF-16 code units."""
    if text.isascii():
        return len(text)
    # Two bytes a unit; surrogatepass: a lone surrogate (in no valid text) counts one unit.
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def check_text(body: str, callback_data: str = "") -> None:
    if not body.strip():
        raise LimitError("a text message body must not be empty")
    if length(body) > TEXT_BODY_MAX:
        raise LimitError(f"a text message body holds at most {TEXT_BODY_MAX} characters")
    if length(callback_data) > CALLBACK_DATA_MAX:
        raise LimitError(f"biz_opaque_callback_data holds at most {CALLBACK_DATA_MAX} characters")


def addressee(phone: str, user_id: str) -> dict[str, str]:
    """Who a message goes to: the phone number when it is known (Meta prefers it, and then
    keeps sharing the number in webhooks), else the business-scoped user id (`recipient`)."""
    if phone:
        return {"to": phone}
    if user_id:
        return {"recipient": user_id}
    raise LimitError("a message needs a recipient: a phone number or a business-scoped user id")


# Each pattern's group 1 is the whitespace a cut removes.
_PARAGRAPH = re.compile(r"(\n[ \t]*\n\s*)")
_SENTENCE = re.compile(r"[.!?\u2026\u3002\uff01\uff1f][\"'\u201d\u2019)\]]*(\s+)|(?<=\S)(\n\s*)")
_WORD = re.compile(r"(\s+)")


def _fits(text: str, limit: int) -> int:
    """The longest prefix of `text` (in code points) within `limit` UTF-16 units."""
    units = 0
    for i, c in enumerate(text):
        units += 2 if ord(c) > 0xFFFF else 1
        if units > limit:
            return i
    return len(text)


def _joins(c: str) -> bool:
    """A character that belongs to the one before it (combining marks, joiners, variation
    selectors, emoji modifiers): never cut in front of it."""
    return (
        unicodedata.combining(c) != 0
        or unicodedata.category(c) in ("Mn", "Me", "Mc")
        or c in "\u200d\ufe0e\ufe0f"
        or 0x1F3FB <= ord(c) <= 0x1F3FF
        or 0xE0020 <= ord(c) <= 0xE007F
    )


def _cut(text: str, limit: int) -> tuple[str, str]:
    """The first part (within `limit`) and the rest, cut at the last paragraph break, else
    sentence end, that leaves the part at least half full, else at the last space; else inside
    a word, but never inside a character sequence that renders as one."""
    end = _fits(text, limit)
    if end >= len(text):
        return text, ""
    window = text[: end + 1]  # a boundary right after the limit still counts
    # A paragraph or sentence boundary is only taken when the part stays at least half full;
    # any space beats cutting a word.
    for pattern, floor in ((_PARAGRAPH, end // 2), (_SENTENCE, end // 2), (_WORD, 1)):
        cuts = [
            (m.start(g), m.end(g))
            for m in pattern.finditer(window)
            for g in range(1, (pattern.groups or 0) + 1)
            if m.start(g) >= max(floor, 1) and m.start(g) <= end
        ]
        if cuts:
            start, stop = cuts[-1]
            return text[:start], text[stop:]
    # Never inside a character that renders as one, unless that would leave the part less
    # than half full (a run of thousands of combining marks is no character anyone reads).
    cut = end
    while cut > max(1, end // 2) and _joins(text[cut]):
        cut -= 1
    if _joins(text[cut]) and cut == max(1, end // 2):
        cut = end
    return text[:cut], text[cut:]


def split(text: str, limit: int = TEXT_BODY_MAX) -> list[str]:
    """`text` as consecutive messages within `limit`, in order, each non-empty; only whitespace
    at the cuts is dropped."""
    parts = []
    rest = text.strip()
    while rest:
        part, rest = _cut(rest, limit)
        part, rest = part.rstrip(), rest.lstrip()
        if part:
            parts.append(part)
    return parts


def trim(text: str, limit: int = TEXT_BODY_MAX) -> str:
    """`text` cut to one message within `limit`, ending in an ellipsis when anything was cut."""
    text = text.strip()
    if length(text) <= limit:
        return text
    part, _ = _cut(text, limit - length(ELLIPSIS))
    return part.rstrip() + ELLIPSIS


# The most messages one reply may become: a customer reads ten screens of text at the most; a
# longer answer is cut, its last part ending in an ellipsis.
MAX_PARTS = 10


def fit(text: str, mode: str, limit: int = TEXT_BODY_MAX) -> list[str]:
    """The messages that carry `text` under the agent type's `long_replies` mode."""
    if length(text) <= limit:
        return [text]
    if mode == "trim":
        return [trim(text, limit)]
    parts = split(text, limit)
    if len(parts) > MAX_PARTS:
        # The rest always goes beyond one message: trimmed, it ends in an ellipsis.
        parts = [*parts[: MAX_PARTS - 1], trim(" ".join(parts[MAX_PARTS - 1 :]), limit)]
    return parts
