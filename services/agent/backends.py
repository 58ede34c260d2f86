"""Model backends: `rules` (offline, deterministic) and `openai` (any OpenAI-compatible server).

Both take the agent type and the windowed messages (system prompt first) and return a
completion; `openai` adds the timeout, bounded retries with backoff and the circuit breaker.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
from prometheus_client import Counter, Histogram

from common import retry

from . import http
from .agents import AgentType
from .breaker import BreakerOpen, CircuitBreaker

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


class Backend(Protocol):
    name: str

    async def complete(
        self,
        agent: AgentType,
        messages: list[dict[str, str]],
        *,
        probe: bool = False,
        prompt_tokens: int = 0,
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
        return Completion(text=reply, tokens_in=tokens_in, tokens_out=window.count(reply))

    def status(self) -> str:
        return "closed"


RETRYABLE_STATUS = {408, 409, 429}


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
    ) -> None:
        self.http = http
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        self.max_retries = max_retries
        self.breaker = breaker
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap

    def status(self) -> str:
        return self.breaker.state

    async def complete(
        self,
        agent: AgentType,
        messages: list[dict[str, str]],
        *,
        probe: bool = False,
        prompt_tokens: int = 0,
    ) -> Completion:
        """`probe`: an operator asked for this turn; an open breaker lets it through once."""
        payload: dict[str, Any] = {
            "model": self.model or agent.model,
            "messages": messages,
            "temperature": agent.temperature,
        }
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        attempt = 0
        while True:
            attempt += 1
            try:
                self.breaker.before_call(probe=probe and attempt == 1)
            except BreakerOpen as exc:
                MODEL_ERRORS.labels(self.name, "breaker_open").inc()
                raise ModelError(str(exc), retryable=True, error_class="BreakerOpen") from exc
            started = time.perf_counter()
            retry_after: float | None = None
            try:
                resp = await http.post_json(
                    self.http, self.url, payload, headers=headers, timeout=self.timeout
                )
                if resp.status == 200:
                    self.breaker.success()
                    return _completion(resp.json(), attempt)
                retryable = resp.status >= 500 or resp.status in RETRYABLE_STATUS
                retry_after = retry.parse_retry_after(resp.headers.get("retry-after"), 30.0)
                error = ModelError(
                    f"model answered HTTP {resp.status}: {resp.text[:200]}",
                    retryable=retryable,
                    error_class=f"ModelHTTP{resp.status}",
                )
            except http.HttpFailure as exc:
                error = ModelError(
                    f"model call failed: {exc}",
                    retryable=True,
                    error_class="ModelTimeout" if exc.timeout else "ModelUnreachable",
                )
            except ValueError as exc:
                error = ModelError(
                    f"model answered malformed JSON: {exc}",
                    retryable=True,
                    error_class="ModelBadResponse",
                )
            finally:
                MODEL_SECONDS.labels(self.name).observe(time.perf_counter() - started)
            MODEL_ERRORS.labels(self.name, error.error_class).inc()
            if error.retryable:
                self.breaker.failure()
            else:
                # The server answered: it is up. A 4xx is our request's fault, not its health.
                self.breaker.success()
            if not error.retryable or attempt > self.max_retries:
                raise error
            delay = (
                retry_after
                if retry_after is not None
                else retry.full_jitter(attempt, self.backoff_base, self.backoff_cap)
            )
            log.warning("model call failed, retrying: %s", error, extra={"attempt": attempt})
            await asyncio.sleep(delay)


def _completion(body: dict[str, Any], calls: int) -> Completion:
    try:
        text = str(body["choices"][0]["message"]["content"] or "")
    except (KeyError, IndexError, TypeError) as exc:
        raise ModelError(
            f"model answer has no message: {exc}", retryable=True, error_class="ModelBadResponse"
        ) from exc
    usage = body.get("usage") or {}
    return Completion(
        text=text.strip(),
        tokens_in=int(usage.get("prompt_tokens", 0)),
        tokens_out=int(usage.get("completion_tokens", 0)),
        calls=calls,
    )
