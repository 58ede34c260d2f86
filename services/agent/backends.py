"""Model backends: `rules` (offline, deterministic) and `openai` (any OpenAI-compatible server).

Both take the agent type and the windowed messages (system prompt first) and return a
completion; `openai` adds the timeout, bounded retries with backoff and the circuit breaker.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from prometheus_client import Counter, Histogram

from . import http, replies
from .agents import AgentType
from .breaker import BreakerOpen, CircuitBreaker
from .deadline import UNBOUNDED, Deadline
from .outbound import RetryPolicy, retryable_status

log = logging.getLogger(__name__)

MODEL_SECONDS = Histogram(
    "wa_model_call_seconds",
    "Model call latency",
    ["backend"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20),
)
MODEL_ERRORS = Counter("wa_model_errors_total", "Model call errors", ["backend", "kind"])


class ModelError(Exception):
    def __init__(self, message: str, *, retryable: bool, error_class: str = "ModelError"):
        super().__init__(message)
        self.retryable = retryable
        self.error_class = error_class


@dataclass(frozen=True)
class Completion:
    text: str
    tokens_in: int
    tokens_out: int
    calls: int = 1
    # Reply buttons or a list around `text` (its body); None: a text message.
    reply: replies.Structured | None = None


class Backend(Protocol):
    name: str

    async def complete(
        self,
        agent: AgentType,
        messages: list[dict[str, str]],
        *,
        probe: bool = False,
        prompt_tokens: int = 0,
        deadline: Deadline = UNBOUNDED,
    ) -> Completion: ...

    def status(self) -> str: ...


_GREETING = re.compile(
    r"\b(hi|hello|hey|hola|bonjour|ciao|salut|good (morning|afternoon|evening))\b", re.I
)


class RulesBackend:
    """Offline and deterministic: greets, says back what it understood, offers help."""

    name = "rules"

    async def complete(
        self,
        agent: AgentType,
        messages: list[dict[str, str]],
        *,
        probe: bool = False,
        prompt_tokens: int = 0,
        deadline: Deadline = UNBOUNDED,
    ) -> Completion:
        from . import window

        last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        text = last.strip()
        first_turn = sum(1 for m in messages if m["role"] == "user") <= 1
        if _GREETING.search(text):
            reply = (
                "Hello! Thanks for writing. I can help with bookings, payments, support and "
                "our products. What can I do for you today?"
            )
        elif agent.name == "handoff":
            reply = (
                "Thank you, a person from our team will follow up in this chat shortly. "
                "Your messages are kept, so you won't need to repeat yourself."
            )
        else:
            topic = {
                "bookings": "your booking",
                "payments": "your payment",
                "support": "your problem",
                "marketplace": "our products",
            }.get(agent.name, "your request")
            reply = (
                f"I understood: \u201c{text[:300]}\u201d. I'll help you with {topic}. "
                "Reply 'human' at any time to talk to a person."
            )
            if first_turn:
                reply = "Hello! " + reply
        # No server counts for us: the window's own count of what was sent is the usage.
        tokens_in = prompt_tokens or sum(window.message_tokens(m) for m in messages)
        # An agent type with choices shows them offline: its answer carries them.
        structured = replies.with_body(agent.choices, reply) if agent.choices else None
        return Completion(
            text=reply, tokens_in=tokens_in, tokens_out=window.count(reply), reply=structured
        )

    def status(self) -> str:
        return "closed"


class OpenAIBackend:
    """Chat completions against any OpenAI-compatible server (OpenAI, vLLM, Ollama, llama.cpp)."""

    name = "openai"

    def __init__(
        self,
        http: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str,
        model: str,
        timeout: float,
        max_retries: int,
        breaker: CircuitBreaker,
        backoff_base: float = 0.25,
        backoff_cap: float = 8.0,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.http = http
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        self.breaker = breaker
        self.policy = policy or RetryPolicy(max_retries, backoff_base, backoff_cap)

    def status(self) -> str:
        return self.breaker.state

    async def complete(
        self,
        agent: AgentType,
        messages: list[dict[str, str]],
        *,
        probe: bool = False,
        prompt_tokens: int = 0,
        deadline: Deadline = UNBOUNDED,
    ) -> Completion:
        """`probe`: an operator asked for this turn; an open breaker lets it through once.
        Every call and every wait between retries ends before `deadline`."""
        payload: dict[str, Any] = {
            # The agent type's own model wins; AGENT_MODEL is for types that name none.
            "model": agent.model or self.model,
            "messages": messages,
            "temperature": agent.temperature,
        }
        if agent.choices is not None:
            # The model may answer with reply buttons or a list: as a call of one of these.
            payload["tools"] = reply_tools(agent.choices)
            payload["tool_choice"] = "auto"
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        attempt = 0
        while True:
            attempt += 1
            timeout = deadline.bound(self.timeout)
            if timeout <= 0:
                raise ModelError(
                    "the turn's deadline left no time to call the model",
                    retryable=True,
                    error_class="TurnTimeout",
                )
            try:
                self.breaker.before_call(probe=probe and attempt == 1)
            except BreakerOpen as exc:
                MODEL_ERRORS.labels(self.name, "breaker_open").inc()
                raise ModelError(str(exc), retryable=True, error_class="BreakerOpen") from exc
            started = time.perf_counter()
            headers_of_error: Mapping[str, str] | None = None
            healthy = False
            try:
                resp = await http.post_json(
                    self.http, self.url, payload, headers=headers, timeout=timeout
                )
                if resp.status == 200:
                    # Answered: the server is up, whatever it answered.
                    healthy = True
                    completion = _completion(_json_of(resp), attempt)
                    self.breaker.success()
                    return completion
                retryable = retryable_status(resp.status)
                headers_of_error = resp.headers
                error = ModelError(
                    f"model answered HTTP {resp.status}: {resp.text[:200]}",
                    retryable=retryable,
                    error_class=f"ModelHTTP{resp.status}",
                )
                healthy = not retryable
            except http.HttpFailure as exc:
                error = ModelError(
                    f"model call failed: {exc}",
                    retryable=True,
                    error_class="ModelTimeout" if exc.timeout else "ModelUnreachable",
                )
            except ModelError as exc:
                # An answer that cannot be used (no choices, no text): a failed attempt.
                error = exc
            finally:
                MODEL_SECONDS.labels(self.name).observe(time.perf_counter() - started)
            MODEL_ERRORS.labels(self.name, error.error_class).inc()
            if healthy:
                # The server answered: it is up. A 4xx is our request's fault, not its health.
                self.breaker.success()
            else:
                self.breaker.failure()
            if not error.retryable or self.policy.exhausted(attempt):
                raise error
            delay = self.policy.delay(attempt, headers_of_error)
            if not self.policy.fits(delay, deadline):
                # Waiting would outlive the turn: this attempt's error is the turn's.
                raise ModelError(
                    f"{error} (no retry: the turn's deadline is {deadline.remaining():.1f} s "
                    f"away, the retry {delay:.1f} s)",
                    retryable=True,
                    error_class=error.error_class,
                )
            log.warning("model call failed, retrying: %s", error, extra={"attempt": attempt})
            await self.policy.sleep(delay)


def _json_of(resp: http.Answer) -> Any:
    try:
        return resp.json()
    except ValueError:
        pass
    try:
        # orjson refuses escaped lone surrogates; the standard parser keeps them (cleaned below).
        return json.loads(resp.body)
    except ValueError as exc:
        raise ModelError(
            f"model answered malformed JSON: {exc}", retryable=True, error_class="ModelBadResponse"
        ) from exc


def clean_text(text: str) -> str:
    """What PostgreSQL can store and WhatsApp can show: no NUL, no lone surrogate."""
    if "\x00" in text:
        text = text.replace("\x00", "")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _content_text(content: Any) -> str:
    """`content` as a string, or as a list of parts (`{"type": "text", "text": ...}`) whose
    text parts are joined; anything else holds no text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, str):
                texts.append(part)
            elif isinstance(part, dict) and isinstance(part.get("text"), str):
                if part.get("type", "text") in ("text", "output_text"):
                    texts.append(part["text"])
        return "".join(texts)
    return ""


def _count(usage: Any, key: str) -> int:
    """A usage figure, or 0 when it is missing or not a count (null, text, negative)."""
    value = usage.get(key) if isinstance(usage, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return 0
    # NaN, negative, absurd: more than any context window (and running sums of such figures
    # would overflow agent_sessions' bigint counters).
    if value != value or value < 0 or value > 2**31:
        return 0
    return int(value)


def _completion(body: Any, calls: int) -> Completion:
    """The reply in a chat completion. A repairable answer is repaired (NUL and lone surrogates
    removed, text parts joined, bad usage ignored); one without text is a ModelError."""
    choices = body.get("choices") if isinstance(body, dict) else None
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, dict) else None
    if not isinstance(message, dict):
        raise ModelError(
            "model answer has no message (choices missing or empty)",
            retryable=True,
            error_class="ModelBadResponse",
        )
    text = clean_text(_content_text(message.get("content"))).strip()
    structured = _tool_reply(message.get("tool_calls"), text)
    if structured is not None:
        text = structured.body
    if not text:
        raise ModelError("model answered an empty reply", retryable=True, error_class="EmptyReply")
    usage = body.get("usage")
    return Completion(
        text=text,
        tokens_in=_count(usage, "prompt_tokens"),
        tokens_out=_count(usage, "completion_tokens"),
        calls=calls,
        reply=structured,
    )


REPLY_WITH_BUTTONS = "reply_with_buttons"
REPLY_WITH_LIST = "reply_with_list"
_OPTION_FIELDS: dict[str, Any] = {"id": {"type": "string"}, "title": {"type": "string"}}
_OPTION = {"type": "object", "properties": _OPTION_FIELDS, "required": ["id", "title"]}


def reply_tools(choices: replies.Structured) -> list[dict[str, Any]]:
    """The functions the model may call to answer with reply buttons or a list; the agent
    type's configured choices are named as the options to offer."""
    offered = "; ".join(
        f"{o.id}: {o.title}"
        for o in (*choices.buttons, *(r for s in choices.sections for r in s.rows))
    )
    hint = f" Options to offer (id: title): {offered}." if offered else ""
    row = {
        "type": "object",
        "properties": {**_OPTION_FIELDS, "description": {"type": "string"}},
        "required": ["id", "title"],
    }
    return [
        {
            "type": "function",
            "function": {
                "name": REPLY_WITH_BUTTONS,
                "description": "Answer with a text and 1 to 3 reply buttons (titles of at "
                f"most {replies.BUTTON_TITLE_MAX} characters) the customer taps.{hint}",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "body": {"type": "string"},
                        "buttons": {"type": "array", "items": _OPTION, "maxItems": 3},
                    },
                    "required": ["body", "buttons"],
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": REPLY_WITH_LIST,
                "description": "Answer with a text and a list of up to 10 options in "
                f"sections (row titles of at most {replies.ROW_TITLE_MAX} characters), opened "
                f"by a button labelled `button`.{hint}",
                "parameters": {
                    "type": "object",
                    "properties": {
                        "body": {"type": "string"},
                        "button": {"type": "string"},
                        "sections": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "title": {"type": "string"},
                                    "rows": {"type": "array", "items": row},
                                },
                                "required": ["rows"],
                            },
                        },
                    },
                    "required": ["body", "button", "sections"],
                },
            },
        },
    ]


def _cleaned(value: Any) -> Any:
    if isinstance(value, str):
        return clean_text(value)
    if isinstance(value, list):
        return [_cleaned(v) for v in value]
    if isinstance(value, dict):
        return {clean_text(str(k)): _cleaned(v) for k, v in value.items()}
    return value


def _tool_reply(calls: Any, text: str) -> replies.Structured | None:
    """The reply buttons or list a model's tool call asks for, fitted to WhatsApp's limits;
    None when it called none. A call that cannot be read or sent falls back to the answer's
    text when it has some; without text it is a ModelError (the turn fails, retryable)."""
    if not calls:
        return None
    call = calls[0] if isinstance(calls, list) else None
    function = call.get("function") if isinstance(call, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    kinds = {REPLY_WITH_BUTTONS: "buttons", REPLY_WITH_LIST: "list"}
    try:
        if name not in kinds:
            raise ValueError(f"unknown function {name!r}")
        assert isinstance(function, dict)
        args = function.get("arguments")
        doc = json.loads(args) if isinstance(args, str) else args
        if not isinstance(doc, dict):
            raise ValueError("arguments are not an object")
        # What PostgreSQL's jsonb and WhatsApp take: no NUL, no lone surrogate anywhere.
        doc = {**_cleaned(doc), "kind": kinds[name]}
        if not str(doc.get("body") or "").strip():
            doc["body"] = text
        return replies.fit(replies.from_json(doc))
    except ValueError as exc:  # LimitError is one
        if text:
            log.warning("unusable tool call from the model, answering its text: %s", exc)
            return None
        raise ModelError(
            f"model answered an unusable tool call: {exc}",
            retryable=True,
            error_class="ModelBadToolCall",
        ) from exc
