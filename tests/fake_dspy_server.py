"""An OpenAI-compatible chat server on 127.0.0.1 for the DSPy tests (dspy_example.py).

It answers `POST /v1/chat/completions` like a model behind the OpenAI chat API, prompted by
DSPy. What it does, and where each behaviour comes from:

- The reply is a pure function of the question asked (`answer_for`, `reasoning_for`), never of
  whether the prompt holds demos: the same question gets the same answer with or without them,
  so no test can pass off the fake's answer as evidence that tuning works. Tests check the
  plumbing: which prompts were sent, what came back, how it was scored and counted.
- Format: DSPy's ChatAdapter asks for one `[[ ## field ## ]]` section per output field, then
  `[[ ## completed ## ]]`; its JSONAdapter fallback asks for a JSON object and sends
  `response_format` (dspy/adapters/chat_adapter.py and json_adapter.py in the pinned dspy). The
  fake answers in whichever format the request asks for; a plain chat prompt (the plain-model
  mark: a system prompt and the question) gets the plain answer.
- `usage` counts tokens with the real o200k_base encoding (the one gpt-4o-mini uses; litellm's
  bundled copy, never a download), the way OpenAI bills a chat request: 3 tokens per message plus
  its role and content, 3 more to prime the reply (OpenAI cookbook, "How to count tokens with
  tiktoken": https://cookbook.openai.com/examples/how_to_count_tokens_with_tiktoken).
- `max_tokens` is honoured as the API honours it: a longer reply is cut at that many tokens and
  ends with `finish_reason: "length"` (API reference, chat completion object:
  https://platform.openai.com/docs/api-reference/chat/object).
- Errors have OpenAI's body, `{"error": {"message", "type", "param", "code"}}`: 401
  `invalid_api_key` quoting the start and end of the refused key; 404 `model_not_found`; 429
  `rate_limit_exceeded` with a `Retry-After` header in whole seconds; 500 `server_error`
  (https://learn.microsoft.com/en-us/microsoft-cloud/dev/dev-proxy/concepts/openai-rate-limit-reached
  lists the 429 and 503 codes; https://github.com/LlmKira/Openaibot/issues/125 quotes the 500).
- Misbehaviour a test can ask for: the next N replies in free prose instead of the asked format
  (`prose_next`), the next N connections closed without an answer (`drop_next`, what a client
  sees when a proxy or load balancer times out), no `usage` at all (`report_usage = False`, as
  some self-hosted servers do), a delay per reply (`delay`, so parallel requests overlap), one
  reply at a time (`one_at_a_time`: the others wait their turn, as `transformers serve` without
  continuous batching makes them wait), replies that run on past the stop strings to the
  token limit (`run_on_past_stop`, as `transformers serve --continuous-batching` does).

It records every request body and the usage it reported, and how many requests were in flight
at once (to prove the script answers in parallel). For the questions in `free_text_for` it
answers, every time, as a small model often does: plain prose in no format (`FREE_TEXT`), which
neither ChatAdapter nor DSPy's JSON fallback can parse.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FREE_TEXT = "The answer to this question is a question of its own, and so on, and so on."
NEAR_MISS = "[[## answer ## ]]\n"  # SmolLM2's usual miss after 8 demos: no space after [[
QUESTION_PATTERN = re.compile(r"\[\[ ## question ## \]\]\n(.*?)(?:\n\n|\Z)", re.DOTALL)
CHAT_FIELDS_PATTERN = re.compile(r"`\[\[ ## (\w+) ## \]\]`")
JSON_FIELDS_PATTERN = re.compile(
    r"Respond with a JSON object in the following order of fields: (.*)"
)


def _o200k():
    """The real o200k_base encoding from the copy litellm ships, without a download and without
    pointing tiktoken's cache at it through os.environ (tests read that variable)."""
    import base64
    import hashlib
    from unittest import mock

    import tiktoken
    from tiktoken_ext import openai_public

    spec = importlib.util.find_spec("litellm")
    folder = Path(list(spec.submodule_search_locations)[0]) / "litellm_core_utils" / "tokenizers"
    url = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"
    data = (folder / hashlib.sha1(url.encode()).hexdigest()).read_bytes()
    ranks = {
        base64.b64decode(token): int(rank)
        for token, rank in (line.split() for line in data.splitlines() if line)
    }
    # tiktoken's own definition of o200k_base, fed the ranks read above.
    with mock.patch.object(openai_public, "load_tiktoken_bpe", lambda *args, **kwargs: ranks):
        return tiktoken.Encoding(**openai_public.o200k_base())


_ENCODING = None
_ENCODING_LOCK = threading.Lock()


def encoding():
    global _ENCODING
    with _ENCODING_LOCK:
        if _ENCODING is None:
            _ENCODING = _o200k()
        return _ENCODING


def count_tokens(text: str) -> int:
    return len(encoding().encode_ordinary(text))


def prompt_tokens(messages: list[dict]) -> int:
    """What OpenAI bills for a chat request's messages (see the cookbook rule above)."""
    return 3 + sum(
        3 + count_tokens(str(m.get("role", ""))) + count_tokens(str(m.get("content", "")))
        for m in messages
    )


def answer_for(question: str) -> str:
    """The fake model's answer: the question's own words, restated. Demos change nothing."""
    core = question.strip().rstrip("?").strip()
    return (
        f"{core}: a teacher explains the key idea in one clear sentence, then shows it with an "
        "example the student already knows."
    )


def reasoning_for(question: str) -> str:
    return (
        f"The student asks: {question.strip()} A good answer names the key idea first, then "
        "shows it with one familiar example, in plain words."
    )


def question_of(messages: list[dict]) -> str:
    """The question a DSPy prompt asks (its [[ ## question ## ]] section), or ""."""
    last_user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    match = QUESTION_PATTERN.search(last_user)
    return match.group(1).strip() if match else ""


def plain_question_of(messages: list[dict]) -> str:
    """The question of a plain chat prompt (no DSPy format): its last user turn, or ""."""
    last_user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    return "" if "[[ ##" in last_user or "JSON" in last_user else last_user.strip()


def demos_in(messages: list[dict]) -> list[str]:
    """The questions of the few-shot demos in a ChatAdapter prompt (user turns before the last)."""
    users = [m["content"] for m in messages if m["role"] == "user"][:-1]
    return [match.group(1).strip() for u in users if (match := QUESTION_PATTERN.search(u))]


def output_fields(messages: list[dict]) -> tuple[str, list[str]]:
    """Which format the prompt asks for ("chat" or "json") and the output fields, in order."""
    last_user = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    json_request = JSON_FIELDS_PATTERN.search(last_user)
    if json_request:
        return "json", re.findall(r"`(\w+)`", json_request.group(1))
    return "chat", [name for name in CHAT_FIELDS_PATTERN.findall(last_user) if name != "completed"]


def reply_for(body: dict, prose: bool = False) -> str:
    """The completion text for one request, in the format it asks for (deterministic)."""
    messages = body.get("messages") or []
    question = question_of(messages)
    values = {"reasoning": reasoning_for(question), "answer": answer_for(question)}
    if prose:  # a model that ignores the format: no markers, no JSON
        return f"Well, {values['answer']} {values['reasoning']}"
    kind, fields = output_fields(messages)
    if kind == "chat" and not fields:  # a plain chat prompt, no DSPy format: a plain answer
        return answer_for(plain_question_of(messages))
    if kind == "json" or body.get("response_format"):
        return json.dumps({name: values.get(name, "Answer briefly.") for name in fields})
    sections = [f"[[ ## {name} ## ]]\n{values.get(name, 'Answer briefly.')}" for name in fields]
    return "\n\n".join(sections + ["[[ ## completed ## ]]"])


class FakeChatServer:
    """Start with `.start()` (returns the base URL, ending in /v1), stop with `.stop()`."""

    def __init__(self, delay: float = 0.0):
        encoding()  # load it now, not inside the first request's time
        self.delay = delay  # seconds each reply takes, so parallel requests overlap
        self.one_at_a_time = False  # requests wait their turn: one reply is written at a time
        self.requests: list[dict] = []  # every chat request body received, failed ones included
        self.usage: list[dict] = []  # the usage reported for each successful reply
        self.failures = 0  # how many requests were answered with an error or dropped
        self.fail_next = 0  # answer the next N requests with an error...
        self.fail_status = 500  # ...of this HTTP status (404: an unknown model; 429: slow down)
        self.retry_after = 1  # seconds a 429 asks the client to wait (whole seconds, like OpenAI)
        self.drop_next = 0  # close the next N connections without answering
        self.prose_next = 0  # answer the next N requests in prose, ignoring the asked format
        self.free_text_for: set[str] = set()  # questions answered in prose, every time
        self.empty_for: set[str] = set()  # questions answered with nothing, every time
        self.near_miss_for: set[str] = set()  # answered in prose after "[[## answer ## ]]"
        # written after every reply until max_tokens, as `transformers serve
        # --continuous-batching` writes on past a stop string it ignores
        self.run_on_past_stop: str | None = None
        self.report_usage = True
        self.api_key: str | None = None  # if set, refuse other keys with HTTP 401
        self.max_in_flight = 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._turn = threading.Lock()  # held while a reply is written, with one_at_a_time
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
                    return self._error(404, f"Invalid URL (POST {self.path})", None, None)
                with owner._lock:
                    owner.requests.append(body)
                given = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                if owner.api_key and given != owner.api_key:
                    # like OpenAI's reply, which shows the start and the end of the key it refused
                    masked = f"{given[:3]}***{given[-4:]}"
                    message = f"Incorrect API key provided: {masked}"
                    return self._error(401, message, "invalid_request_error", "invalid_api_key")
                with owner._lock:
                    owner._in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner._in_flight)
                    drop, fail, prose = owner.drop_next > 0, owner.fail_next > 0, False
                    if drop:
                        owner.drop_next -= 1
                        owner.failures += 1
                    elif fail:
                        owner.fail_next -= 1
                        owner.failures += 1
                    elif owner.prose_next > 0:
                        owner.prose_next -= 1
                        prose = True
                turn = owner._turn if owner.one_at_a_time else contextlib.nullcontext()
                try:
                    with turn:
                        time.sleep(owner.delay)
                    if drop:
                        self.close_connection = True
                        with contextlib.suppress(OSError):
                            self.connection.shutdown(2)
                        return None
                    if fail:
                        return self._failure(body)
                    return self._send(200, owner._completion(body, prose))
                finally:
                    with owner._lock:
                        owner._in_flight -= 1

            def _failure(self, body: dict):
                status = owner.fail_status
                if status == 404:
                    message = f"The model `{body.get('model')}` does not exist"
                    return self._error(404, message, "invalid_request_error", "model_not_found")
                if status == 429:
                    message = (
                        f"Rate limit reached for {body.get('model')} on requests per min (RPM): "
                        f"Limit 3, Used 3, Requested 1. Please try again in {owner.retry_after}s."
                    )
                    headers = {"Retry-After": str(owner.retry_after)}
                    return self._error(429, message, "requests", "rate_limit_exceeded", headers)
                message = "The server had an error while processing your request. Sorry about that!"
                return self._error(status, message, "server_error", None)

            def _error(self, status, message, kind, code, headers=None):
                error = {"message": message, "type": kind, "param": None, "code": code}
                return self._send(status, {"error": error}, headers)

            def _send(self, status: int, payload: dict, headers: dict | None = None) -> None:
                data = json.dumps(payload).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                # the client may have given up (a test interrupted it): nothing to answer then
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def _completion(self, body: dict, prose: bool = False) -> dict:
        messages = body.get("messages") or []
        question = question_of(messages) or plain_question_of(messages)
        if question in self.free_text_for:
            text, finish = FREE_TEXT, "stop"
        elif question in self.empty_for:  # a model that writes a stop string first
            text, finish = "", "stop"
        elif question in self.near_miss_for:  # a near miss of ChatAdapter's header, then prose
            text, finish = NEAR_MISS + FREE_TEXT, "stop"
        else:
            text, finish = reply_for(body, prose), "stop"
        if self.run_on_past_stop:
            text += self.run_on_past_stop * 100
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        tokens = encoding().encode_ordinary(text)
        if limit is not None and len(tokens) > limit:
            text, finish = encoding().decode(tokens[:limit]), "length"
            tokens = tokens[:limit]
        reply = {
            "id": f"chatcmpl-fake-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
            ],
        }
        if self.report_usage:
            prompt = prompt_tokens(messages)
            usage = {
                "prompt_tokens": prompt,
                "completion_tokens": len(tokens),
                "total_tokens": prompt + len(tokens),
            }
            reply["usage"] = usage
            with self._lock:
                self.usage.append(usage)
        return reply

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
