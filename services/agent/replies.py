"""A reply's shape beyond plain text: reply buttons, a list, or a message template, within
WhatsApp's documented limits, checked (and text fields trimmed) before anything is sent.

https://developers.facebook.com/docs/whatsapp/cloud-api/messages/interactive-reply-buttons-messages
https://developers.facebook.com/docs/whatsapp/cloud-api/messages/interactive-list-messages
Lengths are counted like a text body's (limits.length: UTF-16 code units, never fewer than
Meta's count). A title that is too long is trimmed, ending in an ellipsis; a structure Meta
would refuse (no button, four buttons, eleven rows, two rows with one id) raises LimitError.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from .limits import LimitError, length, trim

INTERACTIVE_BODY_MAX = 1024
HEADER_MAX = 60
FOOTER_MAX = 60
BUTTONS_MAX = 3
BUTTON_TITLE_MAX = 20
BUTTON_ID_MAX = 256
LIST_BUTTON_MAX = 20
LIST_ROWS_MAX = 10  # in all sections together
LIST_SECTIONS_MAX = 10
SECTION_TITLE_MAX = 24
ROW_TITLE_MAX = 24
ROW_ID_MAX = 200
ROW_DESCRIPTION_MAX = 72
TEMPLATE_NAME_MAX = 512

Kind = Literal["buttons", "list", "template"]


@dataclass(frozen=True)
class Option:
    """A reply button (no description) or a list row."""

    id: str
    title: str
    description: str = ""


@dataclass(frozen=True)
class Section:
    title: str
    rows: tuple[Option, ...]


@dataclass(frozen=True)
class Structured:
    """What is sent instead of a text message. `body` is the message's text (a template's
    has none: `body` then only names it for the audit trail)."""

    kind: Kind
    body: str = ""
    header: str = ""
    footer: str = ""
    buttons: tuple[Option, ...] = ()
    # A list: the label of the button that opens it, and its sections.
    button: str = ""
    sections: tuple[Section, ...] = field(default_factory=tuple)
    # A template.
    template: str = ""
    language: str = ""


def short(text: str, limit: int) -> str:
    """`text` on one line within `limit`, ending in an ellipsis when cut."""
    return trim(" ".join(text.split()), limit)


def fit(reply: Structured) -> Structured:
    """`reply` with every text field trimmed to its limit (a body to 1,024, a title to 20 or
    24, ...); then checked: raises LimitError for what trimming cannot fix."""
    if reply.kind == "template":
        check(reply)
        return reply
    fitted = replace(
        reply,
        body=trim(reply.body, INTERACTIVE_BODY_MAX),
        header=short(reply.header, HEADER_MAX),
        footer=short(reply.footer, FOOTER_MAX),
        buttons=tuple(
            Option(b.id.strip(), short(b.title, BUTTON_TITLE_MAX)) for b in reply.buttons
        ),
        button=short(reply.button, LIST_BUTTON_MAX),
        sections=tuple(
            Section(
                short(s.title, SECTION_TITLE_MAX),
                tuple(
                    Option(
                        r.id.strip(),
                        short(r.title, ROW_TITLE_MAX),
                        short(r.description, ROW_DESCRIPTION_MAX),
                    )
                    for r in s.rows
                ),
            )
            for s in reply.sections
        ),
    )
    check(fitted)
    return fitted


def _within(what: str, text: str, limit: int, *, required: bool = True) -> None:
    if required and not text.strip():
        raise LimitError(f"{what} must not be empty")
    if length(text) > limit:
        raise LimitError(f"{what} holds at most {limit} characters")


def _unique(what: str, values: list[str]) -> None:
    if len(set(values)) != len(values):
        raise LimitError(f"{what} must be unique within the message")


def check(reply: Structured) -> None:
    """Raises LimitError for anything the Cloud API would refuse in `reply`."""
    if reply.kind == "template":
        _within("a template name", reply.template, TEMPLATE_NAME_MAX)
        _within("a template language", reply.language, 16)
        return
    _within("an interactive message body", reply.body, INTERACTIVE_BODY_MAX)
    _within("a header", reply.header, HEADER_MAX, required=False)
    _within("a footer", reply.footer, FOOTER_MAX, required=False)
    if reply.kind == "buttons":
        if not 1 <= len(reply.buttons) <= BUTTONS_MAX:
            raise LimitError(f"reply buttons: 1 to {BUTTONS_MAX}, not {len(reply.buttons)}")
        for b in reply.buttons:
            _within("a reply button title", b.title, BUTTON_TITLE_MAX)
            _within("a reply button id", b.id, BUTTON_ID_MAX)
        _unique("reply button ids", [b.id for b in reply.buttons])
        _unique("reply button titles", [b.title for b in reply.buttons])
        return
    if reply.kind != "list":
        raise LimitError(f"unknown reply kind {reply.kind!r}")
    _within("a list's button label", reply.button, LIST_BUTTON_MAX)
    if not 1 <= len(reply.sections) <= LIST_SECTIONS_MAX:
        raise LimitError(f"a list has 1 to {LIST_SECTIONS_MAX} sections")
    rows = [r for s in reply.sections for r in s.rows]
    if not 1 <= len(rows) <= LIST_ROWS_MAX:
        raise LimitError(f"a list has 1 to {LIST_ROWS_MAX} rows in all, not {len(rows)}")
    for s in reply.sections:
        # A title is required once there is more than one section.
        _within("a section title", s.title, SECTION_TITLE_MAX, required=len(reply.sections) > 1)
        if not s.rows:
            raise LimitError("a list section needs at least one row")
        for r in s.rows:
            _within("a list row title", r.title, ROW_TITLE_MAX)
            _within("a list row id", r.id, ROW_ID_MAX)
            _within("a list row description", r.description, ROW_DESCRIPTION_MAX, required=False)
    _unique("list row ids", [r.id for r in rows])


def with_body(reply: Structured, body: str) -> Structured:
    """The configured choices carrying an answer's text as their body."""
    return fit(replace(reply, body=body))


def as_text(reply: Structured) -> str:
    """What the reply says, as text: the stored reply_text, the context's memory of what was
    offered, the audit trail."""
    if reply.kind == "template":
        return f"[template {reply.template} ({reply.language})]"
    titles = [b.title for b in reply.buttons] + [r.title for s in reply.sections for r in s.rows]
    return reply.body + "\n" + "\n".join(f"- {t}" for t in titles)


def graph_content(reply: Structured) -> dict[str, Any]:
    """The message's content as the Cloud API takes it (`type` and its object)."""
    if reply.kind == "template":
        return {
            "type": "template",
            "template": {"name": reply.template, "language": {"code": reply.language}},
        }
    interactive: dict[str, Any] = {"type": "button" if reply.kind == "buttons" else "list"}
    if reply.header:
        interactive["header"] = {"type": "text", "text": reply.header}
    interactive["body"] = {"text": reply.body}
    if reply.footer:
        interactive["footer"] = {"text": reply.footer}
    if reply.kind == "buttons":
        interactive["action"] = {
            "buttons": [
                {"type": "reply", "reply": {"id": b.id, "title": b.title}} for b in reply.buttons
            ]
        }
    else:
        sections = []
        for s in reply.sections:
            section: dict[str, Any] = {"rows": [_row(r) for r in s.rows]}
            if s.title:
                section["title"] = s.title
            sections.append(section)
        interactive["action"] = {"button": reply.button, "sections": sections}
    return {"type": "interactive", "interactive": interactive}


def _row(r: Option) -> dict[str, str]:
    row = {"id": r.id, "title": r.title}
    if r.description:
        row["description"] = r.description
    return row


def to_json(reply: Structured) -> dict[str, Any]:
    """How a reply is stored (processed_webhook_messages.reply_payload) before it is sent."""
    doc: dict[str, Any] = {"kind": reply.kind, "body": reply.body}
    for key in ("header", "footer", "button", "template", "language"):
        if getattr(reply, key):
            doc[key] = getattr(reply, key)
    if reply.buttons:
        doc["buttons"] = [_option_json(b) for b in reply.buttons]
    if reply.sections:
        doc["sections"] = [
            {"title": s.title, "rows": [_option_json(r) for r in s.rows]} for s in reply.sections
        ]
    return doc


def _option_json(o: Option) -> dict[str, str]:
    doc = {"id": o.id, "title": o.title}
    if o.description:
        doc["description"] = o.description
    return doc


def from_json(doc: Any) -> Structured:
    """A reply from its stored form, or from a model's tool call or the agent configuration
    (the same shape); raises LimitError when it is not one."""
    if not isinstance(doc, dict):
        raise LimitError("a structured reply is an object")
    kind = doc.get("kind")
    if kind not in ("buttons", "list", "template"):
        raise LimitError(f"a structured reply's kind is buttons, list or template, not {kind!r}")

    def text(d: dict[str, Any], key: str) -> str:
        value = d.get(key, "")
        if value is None:
            return ""
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise LimitError(f"{key} must be text")
        return str(value)

    def options(items: Any, what: str) -> tuple[Option, ...]:
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise LimitError(f"{what} must be a list of objects")
        return tuple(Option(text(i, "id"), text(i, "title"), text(i, "description")) for i in items)

    sections_raw = doc.get("sections") or []
    if not isinstance(sections_raw, list) or not all(isinstance(s, dict) for s in sections_raw):
        raise LimitError("sections must be a list of objects")
    return Structured(
        kind=kind,
        body=text(doc, "body"),
        header=text(doc, "header"),
        footer=text(doc, "footer"),
        buttons=options(doc.get("buttons") or [], "buttons"),
        button=text(doc, "button"),
        sections=tuple(
            Section(text(s, "title"), options(s.get("rows") or [], "rows")) for s in sections_raw
        ),
        template=text(doc, "template"),
        language=text(doc, "language"),
    )


def template(name: str, language: str) -> Structured:
    reply = Structured(kind="template", template=name.strip(), language=language.strip())
    check(reply)
    return reply
