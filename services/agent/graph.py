"""The WhatsApp Cloud (Graph) API: send a reply (text, interactive or a template), mark a
message read, with bounded retries."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client import Counter, Histogram

from . import http, limits, replies
from .deadline import SEND_MARGIN_SECONDS, UNBOUNDED, Deadline
from .outbound import GraphAction, RetryPolicy, graph_action

log = logging.getLogger(__name__)

GRAPH_SECONDS = Histogram(
    "wa_graph_call_seconds",
    "Graph API call latency",
    ["call"],
    buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
GRAPH_ERRORS = Counter("wa_graph_errors_total", "Graph API call errors", ["call", "kind"])


class GraphError(Exception):
    """A send that failed; `action` (services/agent/outbound.py) says what to do about it."""

    def __init__(self, message: str, *, code: str, action: GraphAction, status: int = 0) -> None:
        super().__init__(message)
        self.code = code
        self.action = action
        self.status = status  # 0: no answer (whether Meta has the message is unknown)

    @property
    def retryable(self) -> bool:
        """Whether a later turn may succeed: the dead-letter queue redrives it."""
        return self.action is not GraphAction.GIVE_UP


@dataclass(frozen=True)
class Sent:
    message_id: str
    attempts: int


@dataclass(frozen=True)
class Media:
    """A downloaded media file: kept in memory for its turn only, never stored."""

    data: bytes
    mime_type: str


class GraphClient:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        *,
        base_url: str,
        version: str,
        access_token: str,
        max_retries: int = 3,
        timeout: float = 10.0,
        backoff_base: float = 0.2,
        backoff_cap: float = 5.0,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.version = version
        self.access_token = access_token
        self.timeout = timeout
        # A send is only started with SEND_MARGIN_SECONDS left: a retry's wait keeps it too.
        self.policy = policy or RetryPolicy(
            max_retries, backoff_base, backoff_cap, margin=SEND_MARGIN_SECONDS
        )

    @property
    def enabled(self) -> bool:
        return bool(self.access_token)

    def _url(self, phone_number_id: str) -> str:
        return f"{self.base_url}/{self.version}/{phone_number_id}/messages"

    async def send_text(
        self,
        phone_number_id: str,
        to: str,
        body: str,
        reply_to: str = "",
        *,
        callback_data: str | None = None,
        deadline: Deadline = UNBOUNDED,
        user_id: str = "",
        before_retry: Callable[[], Awaitable[None]] | None = None,
    ) -> Sent:
        """Sends one text message to the phone number `to` or, when it is "" (a customer with
        a username), to the business-scoped user id `user_id`. `callback_data` (default:
        `reply_to`) comes back in its status webhooks. Raises LimitError, before any request,
        for what Meta would refuse; TurnTimeout when the turn's deadline leaves no time to
        send (nothing was sent then)."""
        callback = reply_to if callback_data is None else callback_data
        limits.check_text(body, callback)
        return await self._send(
            phone_number_id,
            {"type": "text", "text": {"preview_url": False, "body": body}},
            to=to,
            user_id=user_id,
            reply_to=reply_to,
            callback=callback,
            deadline=deadline,
            before_retry=before_retry,
        )

    async def send_structured(
        self,
        phone_number_id: str,
        to: str,
        reply: replies.Structured,
        reply_to: str = "",
        *,
        callback_data: str | None = None,
        deadline: Deadline = UNBOUNDED,
        user_id: str = "",
        before_retry: Callable[[], Awaitable[None]] | None = None,
    ) -> Sent:
        """Sends reply buttons, a list or a message template, like send_text a text: raises
        LimitError, before any request, for what Meta would refuse."""
        callback = reply_to if callback_data is None else callback_data
        replies.check(reply)
        limits.check_text("-", callback)
        return await self._send(
            phone_number_id,
            replies.graph_content(reply),
            to=to,
            user_id=user_id,
            # A template starts a conversation anew: it quotes nothing.
            reply_to="" if reply.kind == "template" else reply_to,
            callback=callback,
            deadline=deadline,
            before_retry=before_retry,
        )

    async def _send(
        self,
        phone_number_id: str,
        content: dict[str, Any],
        *,
        to: str,
        user_id: str,
        reply_to: str,
        callback: str,
        deadline: Deadline,
        before_retry: Callable[[], Awaitable[None]] | None,
    ) -> Sent:
        payload: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            **limits.addressee(to, user_id),
            **content,
        }
        if reply_to:
            payload["context"] = {"message_id": reply_to}
        if callback:
            # Echoed in this reply's status webhooks: ties a delivery to the message it answers
            # even when we never saw the send's response.
            payload["biz_opaque_callback_data"] = callback
        data, attempts = await self._post(
            "send", phone_number_id, payload, deadline=deadline, before_retry=before_retry
        )
        messages = data.get("messages") or [{}]
        return Sent(message_id=str(messages[0].get("id", "")), attempts=attempts)

    async def mark_read(
        self, phone_number_id: str, message_id: str, deadline: Deadline = UNBOUNDED
    ) -> None:
        """Read receipt with a typing indicator: the customer sees the turn has started.
        `deadline` bounds the call as asyncio.wait_for would, without its task."""
        payload = {
            "messaging_product": "whatsapp",
            "status": "read",
            "message_id": message_id,
            "typing_indicator": {"type": "text"},
        }
        await self._post("mark_read", phone_number_id, payload, retries=0, deadline=deadline)

    async def download_media(
        self, media_id: str, *, max_bytes: int, deadline: Deadline = UNBOUNDED
    ) -> Media:
        """A customer's media, held in memory: its id gives a short-lived URL (GET
        /{version}/{media_id}), that URL the bytes, both with the business token. Raises
        http.TooLarge, before reading it whole, for media over `max_bytes`; GraphError when
        either call fails (after the policy's retries)."""
        where = f"{self.base_url}/{self.version}/{media_id}"
        meta = await self._get("media_url", where, http.ERROR_BODY_BYTES, deadline)
        try:
            doc = meta.json()
        except ValueError:
            doc = None
        url = doc.get("url") if isinstance(doc, dict) else None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise GraphError(
                f"media {media_id}: the Graph API answered no download URL",
                code="no_media_url",
                action=GraphAction.RETRY,
                status=meta.status,
            )
        declared = _int(doc.get("file_size")) if isinstance(doc, dict) else None
        if declared is not None and declared > max_bytes:
            # Meta says how big it is: not a byte of it is fetched.
            raise http.TooLarge(max_bytes, declared)
        mime_type = str(doc.get("mime_type") or "") if isinstance(doc, dict) else ""
        body = await self._get("media_download", url, max_bytes, deadline)
        return Media(data=body.body, mime_type=mime_type or body.headers.get("content-type", ""))

    async def _get(self, call: str, url: str, max_bytes: int, deadline: Deadline) -> http.Answer:
        """One GET with the business token and the policy's bounded retries."""
        headers = {"Authorization": f"Bearer {self.access_token}"}
        attempt = 0
        while True:
            attempt += 1
            deadline.check(f"{call} from the Graph API")
            started = time.perf_counter()
            resp: http.Answer | None = None
            try:
                resp = await http.get(
                    self.http,
                    url,
                    headers=headers,
                    timeout=deadline.bound(self.timeout),
                    max_bytes=max_bytes,
                )
                error = _error_of(resp)
            except http.HttpFailure as exc:
                # A GET changes nothing: trying again is always safe.
                error = GraphError(
                    str(exc), code="timeout" if exc.timeout else "network", action=GraphAction.RETRY
                )
            finally:
                GRAPH_SECONDS.labels(call).observe(time.perf_counter() - started)
            if error is None and resp is not None:
                return resp
            assert error is not None
            GRAPH_ERRORS.labels(call, "retryable" if error.retryable else "final").inc()
            if error.action is not GraphAction.RETRY or self.policy.exhausted(attempt):
                raise error
            delay = self.policy.delay(attempt, resp.headers if resp is not None else None)
            if not self.policy.fits(delay, deadline):
                raise error
            log.warning("graph %s failed, retrying: %s", call, error, extra={"attempt": attempt})
            await self.policy.sleep(delay)

    async def _post(
        self,
        call: str,
        phone_number_id: str,
        payload: dict[str, Any],
        retries: int | None = None,
        deadline: Deadline = UNBOUNDED,
        before_retry: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[dict[str, Any], int]:
        """`before_retry`: awaited before each attempt after the first; it raises to stop
        (the turn's conversation was taken over while this one waited)."""
        policy = self.policy
        # `retries` stands for the policy's max_retries (RetryPolicy.exhausted), without a
        # copy of the policy per call.
        max_retries = policy.max_retries if retries is None else retries
        headers = {"Authorization": f"Bearer {self.access_token}"}
        attempt = 0
        while True:
            attempt += 1
            # Past the turn's deadline nothing is sent: the next turn of this message may
            # already be starting.
            deadline.check(f"{call} to the Graph API", SEND_MARGIN_SECONDS)
            if attempt > 1 and before_retry is not None:
                await before_retry()
            timeout = deadline.bound(self.timeout)
            started = time.perf_counter()
            resp: http.Answer | None = None
            try:
                resp = await http.post_json(
                    self.http,
                    self._url(phone_number_id),
                    payload,
                    headers=headers,
                    timeout=timeout,
                )
                error = _error_of(resp)
            except http.HttpFailure as exc:
                # No answer: whether Meta has the message is unknown (status 0). A connection
                # that failed never carried the request: sending again is safe. A timeout may
                # have, and so may a connection closed or reset after the request was written
                # (ClientOSError other than a failed connect: a reset says no more than a
                # close): sending again could give the customer the message twice, so the send
                # ends here and the next turn waits for its status webhook instead.
                cause = exc.__cause__
                maybe_sent = (
                    exc.timeout
                    or isinstance(
                        cause, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError
                    )
                    or (
                        isinstance(cause, aiohttp.ClientOSError)
                        and not isinstance(cause, aiohttp.ClientConnectorError)
                    )
                )
                retry_safe = not maybe_sent or call != "send"
                error = GraphError(
                    str(exc),
                    code="timeout" if exc.timeout else "network",
                    action=GraphAction.RETRY if retry_safe else GraphAction.DLQ,
                )
            finally:
                _seconds(call).observe(time.perf_counter() - started)
            if error is None and resp is not None:
                try:
                    body: dict[str, Any] = resp.json()
                except ValueError:
                    body = {}
                return body, attempt
            assert error is not None
            GRAPH_ERRORS.labels(call, "retryable" if error.retryable else "final").inc()
            if error.action is not GraphAction.RETRY or attempt > max_retries:
                raise error
            delay = policy.delay(attempt, resp.headers if resp is not None else None)
            if not policy.fits(delay, deadline):
                # Waiting would outlive the turn: this attempt's error is the turn's.
                raise error
            log.warning("graph %s failed, retrying: %s", call, error, extra={"attempt": attempt})
            await policy.sleep(delay)


@functools.cache
def _seconds(call: str) -> Any:
    """GRAPH_SECONDS of one call, looked up once (a labels() lookup per call costs more)."""
    return GRAPH_SECONDS.labels(call)


def _int(value: Any) -> int | None:
    """Meta writes sizes as numbers or decimal strings."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _error_of(resp: http.Answer) -> GraphError | None:
    if resp.status < 400:
        return None
    code = ""
    message = resp.text[:300]
    try:
        doc = resp.json()
        err = doc.get("error") if isinstance(doc, dict) else None
        err = err if isinstance(err, dict) else {}  # a proxy's {"error": "bad gateway"}
        code = str(err.get("code", ""))
        message = str(err.get("message", message))
        data = err.get("error_data")
        details = data.get("details") if isinstance(data, dict) else None
        if details:
            message = f"{message}: {details}"
    except ValueError:
        pass
    return GraphError(
        f"HTTP {resp.status} code {code or '-'}: {message}",
        code=code or str(resp.status),
        action=graph_action(resp.status, code),
        status=resp.status,
    )
