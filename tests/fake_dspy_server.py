"""A small OpenAI-compatible chat server on 127.0.0.1 for the DSPy tests (dspy_example.py).

It answers `POST /v1/chat/completions` the way a model prompted by DSPy's ChatAdapter answers:
one `[[ ## field ## ]]` section per output field the prompt asks for, then
`[[ ## completed ## ]]`. The reply is a pure function of the request, so a test can predict it:

- no few-shot demos in the prompt (no assistant turns): the "baseline" reply, a vague answer;
- demos in the prompt: a reply that reuses the question's words, so it scores higher against the
  teacher's reference; it also says how many demos it saw, so a test can tell prompts apart.

It records every request body, reports usage like a real server (a word count, deterministic),
can be told to fail the next N requests (HTTP 500, or 404 as for an unknown model), and tracks
how many requests were in flight at once (to prove the script answers in parallel). For the
questions in `free_text_for` it answers as a small model often does: plain prose in no format
(`FREE_TEXT`), which neither ChatAdapter nor DSPy's JSON fallback can parse.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

BASELINE_ANSWER = "I am not sure, sorry."
FREE_TEXT = "The answer to this question is a question of its own, and so on, and so on."
QUESTION_PATTERN = re.compile(r"\[\[ ## question ## \]\]\n(.*?)(?:\n\n|\Z)", re.DOTALL)
REQUIRED_FIELDS_PATTERN = re.compile(r"`\[\[ ## (\w+) ## \]\]`")


def word_count(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


def tuned_answer(question: str, demos: int) -> str:
    """What the fake model says when the prompt holds demos: the question's words, restated."""
    core = question.strip().rstrip("?").strip()
    return f"{core}: this is explained simply, as the {demos} worked examples show."


def question_of(messages: list[dict]) -> str:
    last_user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    match = QUESTION_PATTERN.search(last_user)
    return match.group(1).strip() if match else ""


def reply_for(messages: list[dict]) -> str:
    """The ChatAdapter-formatted completion for one request (deterministic)."""
    last_user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    question = question_of(messages)
    demos = sum(1 for m in messages if m["role"] == "assistant")
    fields = [name for name in REQUIRED_FIELDS_PATTERN.findall(last_user) if name != "completed"]
    values = {
        "reasoning": (
            f"The prompt shows {demos} worked examples, so I answer in the same short style."
            if demos
            else "There are no worked examples, so I answer directly."
        ),
        "answer": tuned_answer(question, demos) if demos else BASELINE_ANSWER,
    }
    sections = [f"[[ ## {name} ## ]]\n{values.get(name, 'Answer briefly.')}" for name in fields]
    return "\n\n".join(sections + ["[[ ## completed ## ]]"])


class FakeChatServer:
    """Start with `.start()` (returns the base URL, ending in /v1), stop with `.stop()`."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay  # seconds each reply takes, so parallel requests overlap
        self.requests: list[dict] = []  # every chat request body received, failed ones included
        self.usage: list[dict] = []  # the usage reported for each successful reply
        self.failures = 0  # how many requests were answered with an error
        self.fail_next = 0  # answer the next N requests with an error...
        self.fail_status = 500  # ...of this HTTP status (404: an unknown model, as OpenAI says)
        self.api_key: str | None = None  # if set, refuse other keys with HTTP 401
        self.free_text_for: set[str] = set()  # questions answered in prose, in no format
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def count(self) -> int:
        return len(self.requests)

    def start(self) -> str:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                with owner._lock:
                    owner.requests.append(body)
                given = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                if owner.api_key and given != owner.api_key:
                    # like OpenAI's reply, which shows the start and the end of the key it refused
                    masked = f"{given[:3]}***{given[-4:]}"
                    message = f"Incorrect API key provided: {masked}"
                    error = {"message": message, "code": "invalid_api_key"}
                    return self._send(401, {"error": {**error, "type": "invalid_request_error"}})
                with owner._lock:
                    owner._in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner._in_flight)
                    fail = owner.fail_next > 0
                    if fail:
                        owner.fail_next -= 1
                        owner.failures += 1
                try:
                    time.sleep(owner.delay)
                    if fail and owner.fail_status == 404:
                        message = f"The model `{body.get('model')}` does not exist"
                        error = {"message": message, "code": "model_not_found"}
                        return self._send(
                            404, {"error": {**error, "type": "invalid_request_error"}}
                        )
                    if fail:
                        error = {"message": "fake overload", "type": "server_error", "code": None}
                        return self._send(owner.fail_status, {"error": error})
                    return self._send(200, owner._completion(body))
                finally:
                    with owner._lock:
                        owner._in_flight -= 1

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                # the client may have given up (a test interrupted it): nothing to answer then
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _completion(self, body: dict) -> dict:
        messages = body.get("messages") or []
        text = FREE_TEXT if question_of(messages) in self.free_text_for else reply_for(messages)
        prompt_tokens = sum(word_count(str(m.get("content", ""))) for m in messages)
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": word_count(text),
            "total_tokens": prompt_tokens + word_count(text),
        }
        with self._lock:
            self.usage.append(usage)
        return {
            "id": f"chatcmpl-fake-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
