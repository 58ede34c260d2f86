"""The outbound HTTP policy (services/agent/outbound.py) as the Graph API client and the model
backend apply it, against answers played by aioresponses: which answers are retried, how long
each wait is (Retry-After honoured, capped and bounded by the turn's deadline), and what each
documented Graph error code does to a reply."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from email.utils import formatdate
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from yarl import URL

from services.agent.agents import AgentType
from services.agent.backends import ModelError, OpenAIBackend
from services.agent.breaker import CircuitBreaker
from services.agent.deadline import Deadline
from services.agent.graph import GraphClient, GraphError
from services.agent.outbound import (
    GRAPH_CODES,
    RETRY_AFTER_CAP_SECONDS,
    GraphAction,
    RetryPolicy,
    graph_action,
)

GRAPH = "http://graph.test"
SEND_URL = f"{GRAPH}/v23.0/123/messages"
MODEL = "http://model.test/v1"
MODEL_URL = f"{MODEL}/chat/completions"
AGENT = AgentType(
    name="concierge",
    description="d",
    system_prompt="p",
    model="m",
    temperature=0.0,
    token_limit=1000,
    keywords=(),
)


class Waits:
    """The policy's sleep, recorded instead of spent."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


class _Response(aiohttp.ClientResponse):
    """aioresponses (0.7.9) builds responses without the `stream_writer` that aiohttp 3.14
    requires (pnuckowski/aioresponses#289); a response already sent only reads its size."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(*args, **kwargs)


def answer(m: aioresponses, url: str, **kwargs: Any) -> None:
    """The next answer to a POST to `url`; answers to one URL are given in order."""
    m.post(url, response_class=_Response, **kwargs)


@pytest.fixture
def mocked() -> Iterator[aioresponses]:
    with aioresponses() as m:
        yield m


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def calls(m: aioresponses, url: str) -> int:
    return len(m.requests.get(("POST", URL(url)), []))


def graph_error(code: int, status: int = 400) -> dict[str, Any]:
    return {"status": status, "payload": {"error": {"message": "e", "code": code}}}


SENT: dict[str, Any] = {"status": 200, "payload": {"messages": [{"id": "wamid.OUT"}]}}


def graph_client(session: aiohttp.ClientSession, waits: Waits, max_retries: int = 3) -> GraphClient:
    return GraphClient(
        session,
        base_url=GRAPH,
        version="v23.0",
        access_token="t",
        policy=RetryPolicy(max_retries, 0.2, 5.0, margin=0.5, sleep=waits),
    )


def model_backend(
    session: aiohttp.ClientSession, waits: Waits, max_retries: int = 3
) -> OpenAIBackend:
    return OpenAIBackend(
        session,
        base_url=MODEL,
        api_key="k",
        model="m",
        timeout=5.0,
        max_retries=max_retries,
        breaker=CircuitBreaker("test", failure_threshold=100, reset_after=30),
        policy=RetryPolicy(max_retries, 0.25, 8.0, sleep=waits),
    )


ANSWER: dict[str, Any] = {
    "status": 200,
    "payload": {"choices": [{"message": {"role": "assistant", "content": "hi"}}]},
}


async def send(client: GraphClient, deadline: Deadline | None = None) -> Any:
    if deadline is None:
        return await client.send_text("123", "15550001111", "hello", reply_to="wamid.IN")
    return await client.send_text(
        "123", "15550001111", "hello", reply_to="wamid.IN", deadline=deadline
    )


# --- Graph API: statuses and backoff ------------------------------------------------------


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 409, 429])
async def test_a_retryable_status_is_retried_with_backoff_until_it_succeeds(
    mocked: aioresponses, session: aiohttp.ClientSession, status: int
) -> None:
    waits = Waits()
    answer(mocked, SEND_URL, status=status, body="busy")
    answer(mocked, SEND_URL, status=status, body="busy")
    answer(mocked, SEND_URL, **SENT)
    sent = await send(graph_client(session, waits))
    assert (sent.message_id, sent.attempts) == ("wamid.OUT", 3)
    # Full jitter: each wait within the doubling bound of its attempt (base 0.2).
    assert len(waits.seconds) == 2
    assert 0 <= waits.seconds[0] <= 0.2 and 0 <= waits.seconds[1] <= 0.4


async def test_retries_stop_at_the_bound_with_the_last_error(
    mocked: aioresponses, session: aiohttp.ClientSession
) -> None:
    waits = Waits()
    for _ in range(5):
        answer(mocked, SEND_URL, **graph_error(131000, 500))
    with pytest.raises(GraphError) as caught:
        await send(graph_client(session, waits, max_retries=2))
    assert calls(mocked, SEND_URL) == 3  # the first attempt and two retries
    assert len(waits.seconds) == 2
    assert caught.value.code == "131000" and caught.value.retryable


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413])
async def test_a_4xx_without_a_code_is_not_retried(
    mocked: aioresponses, session: aiohttp.ClientSession, status: int
) -> None:
    answer(mocked, SEND_URL, status=status, body="no")
    answer(mocked, SEND_URL, **SENT)
    with pytest.raises(GraphError) as caught:
        await send(graph_client(session, Waits()))
    assert calls(mocked, SEND_URL) == 1
    assert caught.value.action is GraphAction.GIVE_UP and not caught.value.retryable


async def test_no_answer_is_retried(mocked: aioresponses, session: aiohttp.ClientSession) -> None:
    answer(mocked, SEND_URL, exception=aiohttp.ClientConnectionError("refused"))
    answer(mocked, SEND_URL, **SENT)
    sent = await send(graph_client(session, Waits()))
    assert sent.attempts == 2


@pytest.mark.parametrize(
    "exc", [TimeoutError(), aiohttp.ServerDisconnectedError()], ids=["timeout", "disconnected"]
)
async def test_a_send_that_may_have_reached_meta_is_not_sent_again_in_the_turn(
    mocked: aioresponses, session: aiohttp.ClientSession, exc: Exception
) -> None:
    """The request was written and no answer came: Meta may have the message. Sending again
    could give the customer two; the next turn waits for the status webhook instead."""
    answer(mocked, SEND_URL, exception=exc)
    answer(mocked, SEND_URL, **SENT)
    with pytest.raises(GraphError) as raised:
        await send(graph_client(session, Waits()))
    assert raised.value.status == 0 and raised.value.retryable
    assert calls(mocked, SEND_URL) == 1


# --- Retry-After ----------------------------------------------------------------------------


async def test_retry_after_is_honoured(
    mocked: aioresponses, session: aiohttp.ClientSession
) -> None:
    waits = Waits()
    answer(mocked, SEND_URL, **graph_error(130429), headers={"Retry-After": "7"})
    answer(mocked, SEND_URL, **SENT)
    await send(graph_client(session, waits))
    assert waits.seconds == [7.0]


async def test_retry_after_as_an_http_date_is_honoured(
    mocked: aioresponses, session: aiohttp.ClientSession
) -> None:
    waits = Waits()
    at = formatdate(time.time() + 30, usegmt=True)
    answer(mocked, SEND_URL, status=503, body="later", headers={"Retry-After": at})
    answer(mocked, SEND_URL, **SENT)
    await send(graph_client(session, waits))
    assert len(waits.seconds) == 1 and 25 <= waits.seconds[0] <= 30


async def test_retry_after_is_capped(mocked: aioresponses, session: aiohttp.ClientSession) -> None:
    waits = Waits()
    answer(mocked, SEND_URL, status=503, body="later", headers={"Retry-After": "86400"})
    answer(mocked, SEND_URL, **SENT)
    await send(graph_client(session, waits))
    assert waits.seconds == [RETRY_AFTER_CAP_SECONDS]


async def test_a_retry_after_beyond_the_turns_deadline_ends_the_attempt_at_once(
    mocked: aioresponses, session: aiohttp.ClientSession
) -> None:
    waits = Waits()
    answer(mocked, SEND_URL, **graph_error(130429, 429), headers={"Retry-After": "20"})
    answer(mocked, SEND_URL, **SENT)
    with pytest.raises(GraphError) as caught:
        await send(graph_client(session, waits), Deadline(time.monotonic() + 10))
    assert calls(mocked, SEND_URL) == 1 and waits.seconds == []
    assert caught.value.code == "130429" and caught.value.retryable


async def test_a_retry_after_within_the_deadline_but_not_its_send_margin_is_not_waited(
    mocked: aioresponses, session: aiohttp.ClientSession
) -> None:
    # 5 s asked, 5.3 s left: the send after the wait would have under SEND_MARGIN_SECONDS.
    waits = Waits()
    answer(mocked, SEND_URL, status=503, body="later", headers={"Retry-After": "5"})
    with pytest.raises(GraphError):
        await send(graph_client(session, waits), Deadline(time.monotonic() + 5.3))
    assert calls(mocked, SEND_URL) == 1 and waits.seconds == []


# --- Graph error codes ----------------------------------------------------------------------


@pytest.mark.parametrize("code", sorted(GRAPH_CODES))
async def test_every_documented_code_does_what_its_table_entry_says(
    mocked: aioresponses, session: aiohttp.ClientSession, code: int
) -> None:
    action = GRAPH_CODES[code].action
    for _ in range(3):
        answer(mocked, SEND_URL, **graph_error(code))
    with pytest.raises(GraphError) as caught:
        await send(graph_client(session, Waits(), max_retries=2))
    assert caught.value.action is action and caught.value.code == str(code)
    # Retried up to the bound, or not at all; given up means the DLQ item is dead at once.
    assert calls(mocked, SEND_URL) == (3 if action is GraphAction.RETRY else 1)
    assert caught.value.retryable is (action is not GraphAction.GIVE_UP)


@pytest.mark.parametrize(
    ("code", "action"),
    [
        (131047, GraphAction.GIVE_UP),  # re-engagement window
        (131026, GraphAction.GIVE_UP),  # undeliverable
        (131062, GraphAction.GIVE_UP),  # BSUID recipient not supported
        (100, GraphAction.GIVE_UP),  # invalid parameter
        (131051, GraphAction.GIVE_UP),  # unsupported type
        (132001, GraphAction.GIVE_UP),  # template does not exist (132xxx)
        (132015, GraphAction.GIVE_UP),  # template paused
        (130429, GraphAction.RETRY),  # rate limit
        (131056, GraphAction.RETRY),  # pair rate limit
        (131048, GraphAction.RETRY),  # spam rate limit
        (131000, GraphAction.RETRY),  # generic
        (190, GraphAction.DLQ),  # access token expired
        (131031, GraphAction.DLQ),  # account locked
        (368, GraphAction.DLQ),  # temporarily blocked
        (200, GraphAction.DLQ),  # API permission (2xx family)
        (133010, GraphAction.DLQ),  # phone number not registered (133xxx)
    ],
)
def test_named_codes_and_families(code: int, action: GraphAction) -> None:
    assert graph_action(400, str(code)) is action
    # A documented code decides, whatever the HTTP status it came with.
    assert graph_action(500, str(code)) is action


def test_undocumented_codes_follow_the_status() -> None:
    assert graph_action(400, "999999") is GraphAction.GIVE_UP
    assert graph_action(500, "999999") is GraphAction.RETRY
    assert graph_action(429, "") is GraphAction.RETRY
    assert graph_action(401, "") is GraphAction.GIVE_UP
    # Graph's own throttling codes on a 429 (613 calls, 32 page requests): throttled, not final.
    assert graph_action(429, "613") is GraphAction.RETRY
    assert graph_action(429, "32") is GraphAction.RETRY


async def test_a_final_code_on_a_5xx_is_not_retried(
    mocked: aioresponses, session: aiohttp.ClientSession
) -> None:
    answer(mocked, SEND_URL, **graph_error(131026, 500))
    with pytest.raises(GraphError):
        await send(graph_client(session, Waits()))
    assert calls(mocked, SEND_URL) == 1


# --- The model ------------------------------------------------------------------------------


async def complete(backend: OpenAIBackend, deadline: Deadline | None = None) -> Any:
    messages = [{"role": "system", "content": "p"}, {"role": "user", "content": "hello"}]
    if deadline is None:
        return await backend.complete(AGENT, messages)
    return await backend.complete(AGENT, messages, deadline=deadline)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_a_model_4xx_is_not_retried(
    mocked: aioresponses, session: aiohttp.ClientSession, status: int
) -> None:
    waits = Waits()
    answer(mocked, MODEL_URL, status=status, body="bad request")
    answer(mocked, MODEL_URL, **ANSWER)
    with pytest.raises(ModelError) as caught:
        await complete(model_backend(session, waits))
    assert calls(mocked, MODEL_URL) == 1 and waits.seconds == []
    assert not caught.value.retryable and caught.value.error_class == f"ModelHTTP{status}"


@pytest.mark.parametrize("status", [500, 502, 503, 408, 409, 429])
async def test_a_model_5xx_or_throttling_is_retried(
    mocked: aioresponses, session: aiohttp.ClientSession, status: int
) -> None:
    waits = Waits()
    answer(mocked, MODEL_URL, status=status, body="busy")
    answer(mocked, MODEL_URL, **ANSWER)
    done = await complete(model_backend(session, waits))
    assert (done.text, done.calls) == ("hi", 2)
    assert len(waits.seconds) == 1 and 0 <= waits.seconds[0] <= 0.25


async def test_a_model_that_stays_down_is_tried_up_to_the_bound(
    mocked: aioresponses, session: aiohttp.ClientSession
) -> None:
    waits = Waits()
    for _ in range(5):
        answer(mocked, MODEL_URL, status=503, body="down")
    with pytest.raises(ModelError) as caught:
        await complete(model_backend(session, waits, max_retries=2))
    assert calls(mocked, MODEL_URL) == 3 and len(waits.seconds) == 2
    assert caught.value.retryable and caught.value.error_class == "ModelHTTP503"


async def test_the_models_retry_after_is_honoured_and_bounded_by_the_deadline(
    mocked: aioresponses, session: aiohttp.ClientSession
) -> None:
    waits = Waits()
    answer(mocked, MODEL_URL, status=429, body="slow down", headers={"Retry-After": "3"})
    answer(mocked, MODEL_URL, **ANSWER)
    await complete(model_backend(session, waits))
    assert waits.seconds == [3.0]

    waits = Waits()
    answer(mocked, MODEL_URL, status=429, body="slow down", headers={"Retry-After": "30"})
    with pytest.raises(ModelError, match="no retry") as caught:
        await complete(model_backend(session, waits), Deadline(time.monotonic() + 10))
    assert waits.seconds == [] and caught.value.retryable
