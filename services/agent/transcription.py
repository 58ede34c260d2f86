"""Speech to text through an OpenAI-compatible `POST {TRANSCRIPTION_URL}/audio/transcriptions`
(OpenAI, faster-whisper servers, vLLM): the audio as a multipart upload, the words back as
`{"text": ...}`. Bounded retries with backoff and jitter, every call within the turn's deadline."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping

import aiohttp
from prometheus_client import Counter, Histogram

from . import http
from .deadline import UNBOUNDED, Deadline
from .inbound import InboundError, audio_filename
from .outbound import RetryPolicy, retryable_status

log = logging.getLogger(__name__)

TRANSCRIPTION_SECONDS = Histogram(
    "wa_transcription_seconds",
    "Transcription call latency",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40),
)
TRANSCRIPTION_ERRORS = Counter("wa_transcription_errors_total", "Transcription errors", ["kind"])


class WhisperTranscriber:
    def __init__(
        self,
        http: aiohttp.ClientSession,
        *,
        base_url: str,
        api_key: str,
        model: str,
        timeout: float,
        max_retries: int,
        backoff_base: float = 0.25,
        backoff_cap: float = 8.0,
        policy: RetryPolicy | None = None,
    ) -> None:
        self.http = http
        self.url = base_url.rstrip("/") + "/audio/transcriptions"
        self.api_key = api_key
        self.model = model
        self.timeout = timeout
        self.policy = policy or RetryPolicy(max_retries, backoff_base, backoff_cap)

    async def transcribe(
        self, audio: bytes, *, mime_type: str, deadline: Deadline = UNBOUNDED
    ) -> str:
        """The words of `audio`. Raises InboundError (error class Transcription...) when the
        server cannot be reached or answers an error, after the policy's retries."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        file = (audio_filename(mime_type), audio, mime_type.split(";", 1)[0] or "audio/ogg")
        fields = {"model": self.model, "response_format": "json"}
        attempt = 0
        while True:
            attempt += 1
            timeout = deadline.bound(self.timeout)
            if timeout <= 0:
                raise InboundError(
                    "the turn's deadline left no time to transcribe the audio",
                    error_class="TurnTimeout",
                )
            started = time.perf_counter()
            answered: Mapping[str, str] | None = None
            try:
                resp = await http.post_file(
                    self.http, self.url, fields, file, headers=headers, timeout=timeout
                )
                if resp.status == 200:
                    return _text_of(resp)
                answered = resp.headers
                error = InboundError(
                    f"transcription answered HTTP {resp.status}: {resp.text[:200]}",
                    error_class=f"TranscriptionHTTP{resp.status}",
                    retryable=retryable_status(resp.status),
                )
            except http.HttpFailure as exc:
                kind = "Timeout" if exc.timeout else "Unreachable"
                error = InboundError(
                    f"transcription call failed: {exc}", error_class=f"Transcription{kind}"
                )
            finally:
                TRANSCRIPTION_SECONDS.observe(time.perf_counter() - started)
            TRANSCRIPTION_ERRORS.labels(error.error_class).inc()
            if not error.retryable or self.policy.exhausted(attempt):
                raise error
            delay = self.policy.delay(attempt, answered)
            if not self.policy.fits(delay, deadline):
                raise error
            log.warning("transcription failed, retrying: %s", error, extra={"attempt": attempt})
            await self.policy.sleep(delay)


def _text_of(resp: http.Answer) -> str:
    try:
        doc = json.loads(resp.body)
    except ValueError as exc:
        raise InboundError(
            f"transcription answered malformed JSON: {exc}",
            error_class="TranscriptionBadResponse",
        ) from exc
    text = doc.get("text") if isinstance(doc, dict) else None
    if not isinstance(text, str):
        raise InboundError("transcription answered no text", error_class="TranscriptionBadResponse")
    return text
