"""Agent types from configuration (TOML), and keyword routing between them."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path

from . import replies
from .limits import LimitError


class AgentConfigError(Exception):
    """The agent configuration is invalid; the message names the file and line."""


@dataclass(frozen=True)
class AgentType:
    name: str
    description: str
    system_prompt: str
    # Empty: AGENT_MODEL's.
    model: str
    temperature: float
    # 0: AGENT_TOKEN_LIMIT's; else at most this many tokens, however high that is.
    token_limit: int
    keywords: tuple[str, ...]
    # What to do with an answer longer than one WhatsApp text message: split | trim.
    long_replies: str = "split"
    # Quick bursts become one turn: a turn waits until the conversation has been quiet this
    # long and answers its waiting messages together (services/agent/debounce.py). 0: off.
    debounce_seconds: float = 0.0
    # Hands the conversation to a person once its message is sent (README, "Human handoff").
    handoff: bool = False
    # Reply buttons or a list every answer of this type offers (the `rules` backend), or the
    # `openai` backend may offer (tool calling); None: plain text only.
    choices: replies.Structured | None = None


# A button id, list row id or quick-reply payload `agent:NAME` hands the conversation to NAME.
CHOICE_PREFIX = "agent:"


@dataclass(frozen=True)
class AgentCatalog:
    default: str
    agents: dict[str, AgentType]

    def get(self, name: str) -> AgentType:
        return self.agents.get(name) or self.agents[self.default]

    def resume_from(self, context_agent: str | None) -> str:
        """The agent a turn starts from: the context's, except a handoff type's (such a
        conversation has a turn again only after an operator released it: the bot takes
        over from the default agent, instead of handing off again at once)."""
        current = context_agent or self.default
        return self.default if self.get(current).handoff else current

    def route(self, current: str, text: str, choice: str = "") -> str:
        """The agent type a message should be handled by: the one a tapped choice names (its
        id or payload `agent:NAME`, or exactly an agent type's NAME), else the current one
        unless a keyword of another agent appears in the text."""
        chosen = choice.strip().lower()
        if chosen:
            named = chosen.removeprefix(CHOICE_PREFIX)
            for name in self.agents:
                if name.lower() == named:
                    return name
        words = set(re.findall(r"[\w']+", text.lower()))
        for agent in self.agents.values():
            if agent.name != current and words.intersection(agent.keywords):
                return agent.name
        return current if current in self.agents else self.default


_FIELDS: dict[str, type | tuple[type, ...]] = {
    "description": str,
    "system_prompt": str,
    "temperature": (int, float),
    "keywords": list,
}
# Settings an agent type may leave out: `model` falls back to AGENT_MODEL, `token_limit` to
# AGENT_TOKEN_LIMIT (the shipped agent types leave both to the deployment).
_OPTIONAL: dict[str, type | tuple[type, ...]] = {
    "model": str,
    "token_limit": int,
    "long_replies": str,
    "debounce_seconds": (int, float),
    "handoff": bool,
    "choices": dict,
}
LONG_REPLIES = ("split", "trim")
# A longer debounce would keep every customer of the agent type waiting that much longer for
# each answer, and eat into the turn's deadline.
DEBOUNCE_MAX_SECONDS = 10.0


def _line_of(text: str, agent: str, key: str | None = None) -> int:
    lines = text.splitlines()
    header = re.compile(rf"^\s*\[agents\.{re.escape(agent)}\]\s*$")
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        return 1
    if key is None:
        return start + 1
    for i in range(start + 1, len(lines)):
        if lines[i].lstrip().startswith("["):
            break
        if re.match(rf"^\s*{re.escape(key)}\s*=", lines[i]):
            return i + 1
    return start + 1


def load(path: Path) -> AgentCatalog:
    try:
        text = path.read_text()
    except OSError as exc:
        raise AgentConfigError(f"{path}: cannot read: {exc}") from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AgentConfigError(f"{path}: {exc}") from exc
    agents_raw = raw.get("agents")
    if not isinstance(agents_raw, dict) or not agents_raw:
        raise AgentConfigError(f"{path}:1: no [agents.NAME] tables")
    agents: dict[str, AgentType] = {}
    for name, spec in agents_raw.items():
        if not isinstance(spec, dict):
            raise AgentConfigError(f"{path}:{_line_of(text, name)}: agents.{name} must be a table")
        for key in _FIELDS:
            if key not in spec:
                raise AgentConfigError(
                    f"{path}:{_line_of(text, name)}: agents.{name} is missing {key!r}"
                )
        for key, kind in {**_FIELDS, **_OPTIONAL}.items():
            if key not in spec:
                continue
            # A bool is an int to Python: only a setting that is a bool may be one.
            value = spec[key]
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
                raise AgentConfigError(
                    f"{path}:{_line_of(text, name, key)}: agents.{name}.{key} has the wrong type"
                )
        unknown = set(spec) - set(_FIELDS) - set(_OPTIONAL)
        if unknown:
            key = sorted(unknown)[0]
            raise AgentConfigError(
                f"{path}:{_line_of(text, name, key)}: agents.{name}.{key} is not a known setting"
            )
        if not 0 <= float(spec["temperature"]) <= 2:
            raise AgentConfigError(
                f"{path}:{_line_of(text, name, 'temperature')}: temperature must be in [0, 2]"
            )
        if "token_limit" in spec and spec["token_limit"] <= 0:
            raise AgentConfigError(
                f"{path}:{_line_of(text, name, 'token_limit')}: token_limit must be positive"
            )
        if not spec["system_prompt"].strip():
            raise AgentConfigError(
                f"{path}:{_line_of(text, name, 'system_prompt')}: system_prompt is empty"
            )
        long_replies = spec.get("long_replies", "split")
        if long_replies not in LONG_REPLIES:
            raise AgentConfigError(
                f"{path}:{_line_of(text, name, 'long_replies')}: long_replies must be "
                f"'split' or 'trim', got {long_replies!r}"
            )
        debounce = float(spec.get("debounce_seconds", 0))
        if not 0 <= debounce <= DEBOUNCE_MAX_SECONDS:
            raise AgentConfigError(
                f"{path}:{_line_of(text, name, 'debounce_seconds')}: debounce_seconds must be "
                f"in [0, {DEBOUNCE_MAX_SECONDS:g}], got {debounce:g}"
            )
        choices = None
        if "choices" in spec:
            try:
                choices = replies.from_json(spec["choices"])
                if choices.kind == "template":
                    raise LimitError("choices are buttons or a list, not a template")
                # Checked (and its titles trimmed) as it will be sent, with some body.
                fitted = replies.fit(replace(choices, body=choices.body or "-"))
                choices = replace(fitted, body=choices.body)
            except LimitError as exc:
                raise AgentConfigError(
                    f"{path}:{_line_of(text, name + '.choices')}: agents.{name}.choices: {exc}"
                ) from exc
        agents[name] = AgentType(
            name=name,
            description=spec["description"],
            system_prompt=spec["system_prompt"].strip(),
            model=spec.get("model", "").strip(),
            temperature=float(spec["temperature"]),
            token_limit=int(spec.get("token_limit", 0)),
            keywords=tuple(str(k).lower() for k in spec["keywords"]),
            long_replies=long_replies,
            debounce_seconds=debounce,
            handoff=spec.get("handoff", False),
            choices=choices,
        )
    default = raw.get("default", "")
    if default not in agents:
        raise AgentConfigError(f"{path}:1: default agent {default!r} is not defined")
    return AgentCatalog(default=default, agents=agents)
