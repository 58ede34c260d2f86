"""The WhatsApp Graph API and an OpenAI-compatible model server, played by real HTTP servers on
127.0.0.1 that record what they receive and answer what the test scripts."""

from __future__ import annotations

import email.message
import email.parser
import email.policy
import hashlib
import hmac
import json
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any, Self

import httpx

from cli.simulate import status_delivery, status_entry
from devtools.loopback import LoopbackServer
from devtools.system import ACCESS_TOKEN


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float = field(default_factory=time.monotonic)
    answered: bool = False  # the server has written its answer (set just before it does)
    raw: bytes = b""  # the request's body as sent (a multipart upload's bytes)


Reply = tuple[int, dict[str, Any], dict[str, str]]


class FakeServer:
    """A threaded HTTP server; subclasses decide the answer to each POST."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"_raw": raw.decode(errors="replace")}
                rec = Recorded(
                    "POST", self.path, {k.lower(): v for k, v in self.headers.items()}, body
                )
                rec.raw = raw
                with outer.lock:
                    outer.requests.append(rec)
                status, payload, headers = outer.answer(rec)
                rec.answered = True
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                headers = {k.lower(): v for k, v in self.headers.items()}
                rec = Recorded("GET", self.path, headers, {})
                with outer.lock:
                    outer.requests.append(rec)
                outer.respond_get(self, rec)

        self.httpd = LoopbackServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, rec: Recorded) -> Reply:
        raise NotImplementedError

    def respond_get(self, handler: BaseHTTPRequestHandler, rec: Recorded) -> None:
        """Writes the answer to a GET (subclasses serve what they have; 404 here)."""
        write_json(handler, 404, {"error": {"message": "not found", "code": 100}})

    def start(self) -> Self:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 20.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.05)
        return predicate()


class FakeGraph(FakeServer):
    """The Graph API's `/{version}/{phone_number_id}/messages`. Like Meta, once a webhook is
    set it posts a signed `sent` status for each message it accepted (with the message's
    biz_opaque_callback_data), retrying while the gateway does not answer 200."""

    def __init__(self) -> None:
        super().__init__()
        self.script: deque[Reply] = deque()
        self.release = threading.Event()
        self.release.set()
        # When set, text sends after the first `hold_after` ones wait for `release` (only the
        # first `hold_after` go through at once).
        self.hold_after: int | None = None
        # When set, only text sends to these recipients (a phone number or a BSUID) wait for
        # `release`; the others go through at once.
        self.hold_for: set[str] | None = None
        self.webhook: tuple[str, str] | None = None  # (gateway URL, app secret)
        self.refused: list[Recorded] = []  # sends refused for breaking a documented limit

    def _post_status(self, out_id: str, body: dict[str, Any]) -> None:
        if self.webhook is None:
            return
        url, secret = self.webhook
        # Like Meta: recipient_id only when the message went to a phone number; the BSUID of
        # a message sent to one (Meta would name it for a phone too; this fake cannot know it).
        entry = status_entry(
            out_id,
            "sent",
            recipient_id=body.get("to") or "",
            recipient_user_id=body.get("recipient") or "",
            callback_data=body.get("biz_opaque_callback_data") or "",
        )
        doc = status_delivery(entry, phone_number_id=self.path_phone(body))
        data = json.dumps(doc).encode()
        sig = "sha256=" + hmac.new(secret.encode(), data, hashlib.sha256).hexdigest()
        for _ in range(60):
            try:
                with httpx.Client(timeout=5) as client:
                    resp = client.post(
                        url,
                        content=data,
                        headers={"Content-Type": "application/json", "X-Hub-Signature-256": sig},
                    )
                if resp.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)

    def path_phone(self, body: dict[str, Any]) -> str:
        return str(body.get("_phone_number_id", ""))

    def fail_next(self, *replies: Reply) -> None:
        self.script.extend(replies)

    @staticmethod
    def error(status: int, code: int, message: str = "error") -> Reply:
        return (
            status,
            {
                "error": {
                    "message": message,
                    "type": "OAuthException",
                    "code": code,
                    "fbtrace_id": "trace",
                }
            },
            {},
        )

    @staticmethod
    def limit_error(body: dict[str, Any]) -> str | None:
        """What Meta refuses in a text message, with error code 100 (invalid parameter)."""
        if body.get("type") in ("interactive", "template"):
            return FakeGraph.structured_limit_error(body)
        if body.get("type") != "text":
            return None
        if not body.get("to") and not body.get("recipient"):
            return "to or recipient is required"
        text = (body.get("text") or {}).get("body")
        if not isinstance(text, str) or not text.strip():
            return "text.body is required"
        if len(text) > 4096:
            return "text.body: Param text['body'] must be at most 4096 characters long."
        callback = body.get("biz_opaque_callback_data", "")
        if len(str(callback)) > 512:
            return "biz_opaque_callback_data must be at most 512 characters long."
        return None

    def answer(self, rec: Recorded) -> Reply:
        if rec.body.get("status") == "read":
            return 200, {"success": True}, {}
        refused = self.limit_error(rec.body)
        if refused is not None:
            with self.lock:
                self.refused.append(rec)
            return self.error(400, 100, f"(#100) Invalid parameter: {refused}")
        if self.hold_for is not None:
            if {rec.body.get("to"), rec.body.get("recipient")} & self.hold_for:
                self.release.wait(30)
        elif self.hold_after is None:
            self.release.wait(30)
        else:
            with self.lock:
                position = sum(1 for r in self.requests if r.body.get("type") == "text")
            if position > self.hold_after:
                self.release.wait(30)
        with self.lock:
            scripted = self.script.popleft() if self.script else None
        if scripted is not None:
            return scripted
        # `to` wins when both are given, as at Meta; a BSUID send's contact has no wa_id.
        wa_id = rec.body.get("to", "")
        contact = {"input": wa_id, "wa_id": wa_id}
        if not wa_id:
            contact = {"input": rec.body.get("recipient", ""), "user_id": rec.body["recipient"]}
        out_id = f"wamid.OUT{uuid.uuid4().hex.upper()}"
        if self.webhook is not None:
            body = {**rec.body, "_phone_number_id": rec.path.split("/")[2]}
            threading.Thread(target=self._post_status, args=(out_id, body), daemon=True).start()
        return (
            200,
            {
                "messaging_product": "whatsapp",
                "contacts": [contact],
                "messages": [{"id": out_id}],
            },
            {},
        )

    @property
    def sends(self) -> list[Recorded]:
        """Reply attempts (text messages), leaving out read receipts."""
        with self.lock:
            return [r for r in self.requests if r.body.get("type") == "text"]

    @property
    def reads(self) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.body.get("status") == "read"]

    @property
    def messages(self) -> list[Recorded]:
        """Every message sent (text, interactive, template), leaving out read receipts."""
        with self.lock:
            return [r for r in self.requests if r.body.get("type")]

    @staticmethod
    def structured_limit_error(body: dict[str, Any]) -> str | None:
        """What Meta refuses in reply buttons, a list or a template (its documented limits,
        counted in characters)."""
        if not body.get("to") and not body.get("recipient"):
            return "to or recipient is required"
        if body["type"] == "template":
            template = body.get("template") or {}
            ok = template.get("name") and (template.get("language") or {}).get("code")
            return None if ok else "template.name and template.language.code are required"
        inter = body.get("interactive") or {}
        text = (inter.get("body") or {}).get("text")
        if not isinstance(text, str) or not text.strip() or len(text) > 1024:
            return "interactive.body.text: 1 to 1024 characters"
        for part in ("header", "footer"):
            if len((inter.get(part) or {}).get("text", "")) > 60:
                return f"interactive.{part}.text: at most 60 characters"
        action = inter.get("action") or {}
        if inter.get("type") == "button":
            buttons = [b.get("reply") or {} for b in action.get("buttons") or []]
            if not 1 <= len(buttons) <= 3:
                return "action.buttons: 1 to 3 buttons"
            if any(not 0 < len(b.get("title", "")) <= 20 for b in buttons):
                return "button title: 1 to 20 characters"
            if any(not 0 < len(b.get("id", "")) <= 256 for b in buttons):
                return "button id: 1 to 256 characters"
            return None
        if inter.get("type") != "list":
            return f"interactive.type {inter.get('type')!r} is not supported here"
        if not 0 < len(action.get("button", "")) <= 20:
            return "action.button: 1 to 20 characters"
        sections = action.get("sections") or []
        rows = [r for s in sections for r in s.get("rows") or []]
        if not sections or not 1 <= len(rows) <= 10:
            return "a list has 1 to 10 rows"
        if any(len(s.get("title", "")) > 24 for s in sections):
            return "section title: at most 24 characters"
        if len(sections) > 1 and any(not s.get("title") for s in sections):
            return "section title is required with more than one section"
        for r in rows:
            if not 0 < len(r.get("title", "")) <= 24:
                return "row title: 1 to 24 characters"
            if not 0 < len(r.get("id", "")) <= 200 or len(r.get("description", "")) > 72:
                return "row id: 1 to 200 characters, description at most 72"
        return None


def write_json(handler: BaseHTTPRequestHandler, status: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


@dataclass
class FakeMedia:
    """A customer's media file at the fake Graph API. `declared`: its metadata says its size
    and its download has a Content-Length (False: neither, the body is sent chunked, so only a
    cap applied while streaming can stop it)."""

    data: bytes
    mime_type: str = "audio/ogg"
    declared: bool = True


class FakeGraphWithMedia(FakeGraph):
    """The Graph API with media too: `GET /{version}/{media_id}` answers the metadata with a
    download URL, `GET` that URL (with the business token) the bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.media: dict[str, FakeMedia] = {}
        self.media_script: deque[Reply] = deque()  # answers to the metadata GETs, first
        self.downloads: list[str] = []  # media ids whose bytes were all written
        self.aborted: list[tuple[str, int]] = []  # (media id, bytes written) cut off

    def respond_get(self, handler: BaseHTTPRequestHandler, rec: Recorded) -> None:
        parts = rec.path.strip("/").split("/")
        if rec.headers.get("authorization") != f"Bearer {ACCESS_TOKEN}":
            write_json(handler, 401, {"error": {"message": "bad token", "code": 190}})
            return
        if len(parts) == 2 and parts[0] == "download" and parts[1] in self.media:
            self._download(handler, parts[1], self.media[parts[1]])
            return
        if len(parts) == 2 and parts[1] in self.media:
            with self.lock:
                scripted = self.media_script.popleft() if self.media_script else None
            if scripted is not None:
                write_json(handler, scripted[0], scripted[1])
                return
            media = self.media[parts[1]]
            doc: dict[str, Any] = {
                "messaging_product": "whatsapp",
                "url": f"{self.url}/download/{parts[1]}",
                "mime_type": media.mime_type,
                "sha256": hashlib.sha256(media.data).hexdigest(),
                "id": parts[1],
            }
            if media.declared:
                doc["file_size"] = len(media.data)
            write_json(handler, 200, doc)
            return
        super().respond_get(handler, rec)

    def _download(self, handler: BaseHTTPRequestHandler, media_id: str, media: FakeMedia) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", media.mime_type)
        if media.declared:
            handler.send_header("Content-Length", str(len(media.data)))
        else:
            handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        written = 0
        try:
            for start in range(0, len(media.data), 64 * 1024):
                chunk = media.data[start : start + 64 * 1024]
                if media.declared:
                    handler.wfile.write(chunk)
                else:
                    handler.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                written += len(chunk)
            if not media.declared:
                handler.wfile.write(b"0\r\n\r\n")
            handler.wfile.flush()
        except OSError:
            with self.lock:
                self.aborted.append((media_id, written))
            handler.close_connection = True
            return
        with self.lock:
            self.downloads.append(media_id)


class FakeTranscriber(FakeServer):
    """An OpenAI-compatible `/audio/transcriptions`: records each upload (its file's bytes and
    its form fields) and answers `{"text": words}`, or what the test scripts."""

    def __init__(self, words: str = "") -> None:
        super().__init__()
        self.words = words
        self.script: deque[Reply] = deque()
        self.uploads: list[tuple[dict[str, str], bytes]] = []

    def answer(self, rec: Recorded) -> Reply:
        fields, file = multipart(rec.headers.get("content-type", ""), rec.raw)
        with self.lock:
            self.uploads.append((fields, file))
            scripted = self.script.popleft() if self.script else None
        if scripted is not None:
            return scripted
        if not rec.path.endswith("/audio/transcriptions") or not file:
            return 400, {"error": {"message": "expected a file upload"}}, {}
        return 200, {"text": self.words}, {}


def multipart(content_type: str, raw: bytes) -> tuple[dict[str, str], bytes]:
    """A multipart/form-data body's text fields and its `file` part's bytes."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw
    )
    fields: dict[str, str] = {}
    file = b""
    if not isinstance(message, email.message.EmailMessage) or not message.is_multipart():
        return fields, file
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(data, bytes):
            continue
        if name == "file":
            file = data
        else:
            fields[name] = data.decode(errors="replace")
    return fields, file


def model_error(status: int, message: str = "error") -> Reply:
    return status, {"error": {"message": message, "type": "server_error"}}, {}


class FakeModel(FakeServer):
    """An OpenAI-compatible `/chat/completions` that records every request, can be scripted to
    fail or be slow, and measures overlapping calls per conversation key."""

    def __init__(self, key: Callable[[dict[str, Any]], str] | None = None) -> None:
        super().__init__()
        self.script: deque[Reply] = deque()
        self.delay = 0.0
        self.down = False
        self.key = key or (lambda body: "")
        self.in_flight: dict[str, int] = {}
        self.overlaps: list[str] = []
        self.served: list[dict[str, int]] = []  # the usage of every successful answer
        self._running = 0
        self.most_at_once = 0  # calls answered at the same time, whatever their keys

    def env(self, **extra: str) -> dict[str, str]:
        """The settings that point the agent service at this server."""
        return {
            "AGENT_BACKEND": "openai",
            "OPENAI_BASE_URL": self.url,
            "OPENAI_API_KEY": "sk-test",
            "AGENT_MODEL": "fake-model",
            **extra,
        }

    def answer(self, rec: Recorded) -> Reply:
        k = self.key(rec.body)
        with self.lock:
            self.in_flight[k] = self.in_flight.get(k, 0) + 1
            if k and self.in_flight[k] > 1:
                self.overlaps.append(k)
            self._running += 1
            self.most_at_once = max(self.most_at_once, self._running)
            scripted = self.script.popleft() if self.script else None
        try:
            if self.delay:
                time.sleep(self.delay)
            if self.down:
                return 503, {"error": {"message": "model down"}}, {}
            if scripted is not None:
                return scripted
            messages = rec.body.get("messages", [])
            last = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
            text = f"echo: {last}"
            prompt = sum(len(m.get("content", "").split()) for m in messages)
            usage = {"prompt_tokens": prompt, "completion_tokens": len(text.split())}
            with self.lock:
                self.served.append(usage)
            return (
                200,
                {
                    "id": f"chatcmpl-{uuid.uuid4().hex[:8]}",
                    "object": "chat.completion",
                    "model": rec.body.get("model", ""),
                    "choices": [
                        {
                            "index": 0,
                            "finish_reason": "stop",
                            "message": {"role": "assistant", "content": text},
                        }
                    ],
                    "usage": {**usage, "total_tokens": sum(usage.values())},
                },
                {},
            )
        finally:
            with self.lock:
                self.in_flight[k] -= 1
                self._running -= 1


class FlakyReadsGraph(FakeGraph):
    """A FakeGraph whose mark-as-read calls (read receipt and typing indicator) answer
    `read_reply` (by default a 500), while messages are accepted as usual."""

    def __init__(self, read_reply: Reply | None = None) -> None:
        super().__init__()
        self.read_reply = read_reply or self.error(500, 1, "read receipts are down")

    def answer(self, rec: Recorded) -> Reply:
        if rec.body.get("status") == "read":
            return self.read_reply
        return super().answer(rec)


def tool_call(name: str, arguments: dict[str, Any] | str, content: str | None = None) -> Reply:
    """A chat completion in which the model calls the function `name` (OpenAI's tool calling
    shape: `arguments` a JSON string), for FakeModel.script."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return (
        200,
        {
            "id": f"chatcmpl-{uuid.uuid4().hex[:8]}",
            "object": "chat.completion",
            "model": "fake-model",
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "tool_calls",
                    "message": {
                        "role": "assistant",
                        "content": content,
                        "tool_calls": [
                            {
                                "id": f"call_{uuid.uuid4().hex[:8]}",
                                "type": "function",
                                "function": {"name": name, "arguments": args},
                            }
                        ],
                    },
                }
            ],
            "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        },
        {},
    )
