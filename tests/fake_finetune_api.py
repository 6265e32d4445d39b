"""A real HTTP fake of the OpenAI fine-tuning API, in the three shapes openai_finetune.py drives.

It runs on 127.0.0.1 (stdlib ThreadingHTTPServer) and answers the official `openai` SDK. It is
meant to be as strict as the services, so that what passes here would pass there. Each
behaviour, and where it comes from (facts only; read 2026-11):

Shapes
- openai:  paths under /v1/, `Authorization: Bearer KEY`.
- azure:   Azure OpenAI v1, paths under /openai/v1/; the key in `api-key` (REST reference) or as
           a bearer token (what Microsoft's v1 examples send through the OpenAI client). A chat
           model is a deployment name: only deployments created with `deploy()` answer; any other
           name, the base snapshot's included, is 404 `DeploymentNotFound`, "The API deployment
           for this resource does not exist. ..." (the service's text, quoted in
           https://github.com/MicrosoftDocs/azure-docs/issues/114013 and
           https://github.com/chatboxai/chatbox/issues/861).
- nebius:  Token Factory: /v1/ plus `POST /v0/models`, which deploys a job's checkpoint as a LoRA
           model named `<base>-LoRa:<name>-<4 letters>` in status `validating`; `GET
           /v0/models/{short name}` reports `validating`, `active`, `error` (with
           `status_reason`) or `deleted`
           (https://docs.tokenfactory.nebius.com/api-reference/models/create-a-custom-model,
           .../get-a-custom-model-by-short-name). A model answers chat only once `active`.
           Deploys take `deploy_seconds`, and can fail (`deploy_fails`) or never finish
           (`deploy_never_ready`).

Jobs (the fine_tuning.job object: https://platform.openai.com/docs/api-reference/fine-tuning/object)
- Status `validating_files` -> `queued` -> `running` -> `succeeded` | `failed` | `cancelled`, on
  the clock: each phase lasts `durations[phase]` seconds whatever the polling, so a job sits
  quietly in `queued` (no events) as real jobs do; `hold_at_running` keeps it running.
- The files are validated when `validating_files` ends, by the rules of the fine-tuning guide's
  chat format and OpenAI's data-preparation cookbook (one JSON object a line, a non-empty
  `messages` list, known roles, text content, an assistant message, `weight` 0 or 1 on assistant
  messages only, at least 10 examples: https://cookbook.openai.com/examples/chat_finetuning_data_prep),
  and text that spells a special token is refused, as the API does ("Invalid file format. Example
  6174 message contains an invalid token: <|fim_suffix|>",
  https://github.com/johny-b/llmcomp/issues/59). A bad file fails the job with `error =
  {code, message, param}`, param `training_file` or `validation_file`.
- Hyperparameters come in `method.supervised.hyperparameters` (or the deprecated top-level
  `hyperparameters`): `n_epochs`, `batch_size`, `learning_rate_multiplier` ("auto" or a positive
  number, OpenAI's OpenAPI spec) for OpenAI and Azure; `batch_size`, `lora` and Nebius's other
  names, but no multiplier, for Nebius (its create-job reference). Anything else is a 400
  `invalid_hyperparameter` (the code and wording are ours). The job reports them as sent.
- `trained_tokens` is counted with the real encoding of the base model (o200k_base for the gpt-4o
  and gpt-4.1 family, litellm's bundled copy; also the stand-in for Nebius's Llama), per example
  3 tokens + per message 3 + role + content (the cookbook's rule), capped at the context length,
  times the epochs. `n_epochs: "auto"` resolves by the cookbook's rule (3, more for small files).
- Events (https://platform.openai.com/docs/api-reference/fine-tuning/list-events) come newest
  first, `limit` (default 20) per page, `after` = the id of the last event of the previous page,
  `has_more`. They are emitted at the transitions and during `running` (training steps); their
  wording is modelled on the service's, not copied from it.
- Jobs list: newest first, `limit` (default 20), `after`, `has_more`, `metadata[key]=value`.
- Cancel stops a job that has not ended (the reference: "Immediately cancel a fine-tune job");
  an ended job is refused with 400 `invalid_request_error` (the refusal's wording is ours).
- Checkpoints: one at the end of each epoch once the job succeeded, newest first (fine-tuning
  guide, "Use a checkpointed model": https://platform.openai.com/docs/guides/fine-tuning).

Errors: `{"error": {"message", "type", "param", "code"}}` as the API sends them (an unknown id
is a 404 of that shape; its wording is ours). 401
`invalid_api_key` quoting the key's start and end; 400/404 `invalid_request_error`; 429
`rate_limit_exceeded` of type `requests` with `Retry-After` in whole seconds
(https://learn.microsoft.com/en-us/microsoft-cloud/dev/dev-proxy/concepts/openai-rate-limit-reached);
500 `server_error`, "The server had an error while processing your request. Sorry about that!"
(quoted in https://github.com/LlmKira/Openaibot/issues/125). An upload for fine-tuning must be a
.jsonl file.

Chat: `usage` counted with the model's real encoding the way OpenAI bills a request (3 tokens per
message + role + content, 3 to prime the reply:
https://cookbook.openai.com/examples/how_to_count_tokens_with_tiktoken); `max_tokens` cuts the
reply and sets `finish_reason: "length"`. The reply is `[model] question`, so a test can tell
which model answered.

Knobs script the failures a test needs (create answered 500 or 403, 429s on polls, a failed or
held job, slow or failing deploys); every request is recorded for the test to inspect.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import hashlib
import importlib.util
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

PREFIX = {"openai": "/v1", "azure": "/openai/v1", "nebius": "/v1"}
ENDED = ("succeeded", "failed", "cancelled")
PHASES = ("validating_files", "queued", "running")
OPENAI_SNAPSHOTS = {
    "gpt-4.1-2025-04-14",
    "gpt-4.1-mini-2025-04-14",
    "gpt-4o-2024-08-06",
    "gpt-4o-mini-2024-07-18",
}
FINE_TUNABLE = {
    "openai": OPENAI_SNAPSHOTS,
    "azure": OPENAI_SNAPSHOTS,
    "nebius": {"meta-llama/Meta-Llama-3.1-8B-Instruct", "meta-llama/Llama-3.3-70B-Instruct"},
}
# Base models that answer chat without a deployment step (Azure has none: all are deployments).
CHAT_MODELS = {
    "openai": OPENAI_SNAPSHOTS | {"gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini"},
    "nebius": FINE_TUNABLE["nebius"] | {m + "-fast" for m in FINE_TUNABLE["nebius"]},
    "azure": set(),
}
CONTEXT_TOKENS = {"openai": 65536, "azure": 65536, "nebius": 8192}
ROLES = {"system", "user", "assistant", "tool", "function"}
SERVER_ERROR = "The server had an error while processing your request. Sorry about that!"
DEPLOYMENT_NOT_FOUND = (
    "The API deployment for this resource does not exist. If you created the deployment within "
    "the last 5 minutes, please wait a moment and try again."
)

_ENCODINGS: dict = {}
_ENCODINGS_LOCK = threading.Lock()


def encoding(name: str = "o200k_base"):
    """A real tiktoken encoding from the copy litellm ships: never a download, and never by
    pointing tiktoken at it through os.environ (the scripts under test read that variable)."""
    from unittest import mock

    import tiktoken
    from tiktoken_ext import openai_public

    with _ENCODINGS_LOCK:
        if name not in _ENCODINGS:
            spec = importlib.util.find_spec("litellm")
            tokenizers = Path(list(spec.submodule_search_locations)[0])
            tokenizers = tokenizers / "litellm_core_utils" / "tokenizers"
            url = f"https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
            data = (tokenizers / hashlib.sha1(url.encode()).hexdigest()).read_bytes()
            ranks = {
                base64.b64decode(token): int(rank)
                for token, rank in (line.split() for line in data.splitlines() if line)
            }
            with mock.patch.object(openai_public, "load_tiktoken_bpe", lambda *a, **k: ranks):
                _ENCODINGS[name] = tiktoken.Encoding(**getattr(openai_public, name)())
        return _ENCODINGS[name]


def encoding_for(model: str):
    base = model.removeprefix("ft:").split(":")[0]
    if base.startswith(("gpt-3.5", "gpt-4-", "gpt-4-turbo")) or base == "gpt-4":
        return encoding("cl100k_base")
    return encoding("o200k_base")


def chat_tokens(enc, messages: list[dict]) -> int:
    """Tokens of a conversation as OpenAI counts them (see the cookbook rule above)."""
    total = 3
    for message in messages:
        total += 3 + len(enc.encode_ordinary(str(message.get("role", ""))))
        content = message.get("content")
        total += len(enc.encode_ordinary(content)) if isinstance(content, str) else 0
        if isinstance(message.get("name"), str):
            total += 1 + len(enc.encode_ordinary(message["name"]))
    return total


def auto_epochs(n_examples: int) -> int:
    """n_epochs "auto": 3, raised for small files and lowered for huge ones (cookbook)."""
    if n_examples * 3 < 100:
        return min(25, 100 // max(1, n_examples))
    if n_examples * 3 > 25000:
        return max(1, 25000 // n_examples)
    return 3


def check_chat_file(data: bytes, enc) -> tuple[str | None, int, int]:
    """(what is wrong or None, examples, tokens per epoch) of a chat-format training file."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "Invalid file format. The file is not UTF-8 text.", 0, 0
    lines = [line for line in text.splitlines() if line.strip()]
    per_epoch = 0
    for number, line in enumerate(lines, start=1):
        where = f"Invalid file format. Example {number}"
        try:
            example = json.loads(line)
        except json.JSONDecodeError:
            return f"{where} is not valid JSON.", len(lines), 0
        messages = example.get("messages") if isinstance(example, dict) else None
        if not isinstance(messages, list) or not messages:
            return f"{where} is missing the messages list.", len(lines), 0
        for message in messages:
            if not isinstance(message, dict) or message.get("role") not in ROLES:
                return f"{where} has a message with a missing or unknown role.", len(lines), 0
            content = message.get("content")
            calls = message.get("tool_calls") or message.get("function_call")
            if not calls and (not isinstance(content, str) or not content.strip()):
                return f"{where} has a message without text content.", len(lines), 0
            if "weight" in message and (
                message["role"] != "assistant" or message["weight"] not in (0, 1)
            ):
                return f"{where} has an invalid weight.", len(lines), 0
            text = content if isinstance(content, str) else ""
            special = [token for token in enc.special_tokens_set if token in text]
            if special:
                return f"{where} message contains an invalid token: {special[0]}.", len(lines), 0
        if not any(m.get("role") == "assistant" for m in messages):
            return f"{where} is missing an assistant message.", len(lines), 0
        per_epoch += chat_tokens(enc, messages)
    return None, len(lines), per_epoch


# What method.supervised.hyperparameters may hold besides n_epochs, by provider: OpenAI's
# OpenAPI spec (FineTuneSupervisedHyperparameters: batch_size "auto" | integer,
# learning_rate_multiplier "auto" | number, n_epochs "auto" | integer), which Azure's v1 API
# shares; Nebius's create-job reference (batch_size, an absolute learning_rate, lora and more,
# no multiplier).
HYPERPARAMETERS = {
    "openai": ("batch_size", "learning_rate_multiplier"),
    "azure": ("batch_size", "learning_rate_multiplier"),
    "nebius": ("batch_size",),
}
NEBIUS_ONLY = ("lora", "learning_rate", "lora_r", "lora_alpha", "lora_dropout", "context_length")


def hyperparameter_error(provider: str, name: str, value) -> str | None:
    """Why the service would refuse this hyperparameter (our wording), or None."""
    if provider == "nebius" and name in NEBIUS_ONLY:
        return None
    if name not in ("n_epochs", *HYPERPARAMETERS[provider]):
        return f"Unknown hyperparameter: {name}"
    if value == "auto":
        return None
    whole = name != "learning_rate_multiplier"
    if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
        return f"Invalid {name}: expected 'auto' or a{' whole' if whole else ''} number"
    if not value > 0 or value != value or value == float("inf"):
        return f"Invalid {name}: {value} (must be greater than 0)"
    return None


def error(message: str, code: str | None, kind: str = "invalid_request_error", param=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def page(items: list[dict], query: dict, default_limit: int = 20) -> dict:
    """One page of a newest-first list: `after` is the id the previous page ended with."""
    limit = int(query.get("limit", [default_limit])[0])
    after = query.get("after", [None])[0]
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1 :] if after in ids else []
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


class FakeAPI:
    def __init__(self, provider: str = "openai", key: str = "sk-test-key"):
        self.provider = provider
        self.key = key
        self.prefix = PREFIX[provider]
        self.requests: list[dict] = []
        self.files: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.events: dict[str, list[dict]] = {}  # oldest first; served newest first
        self.models: dict[str, dict] = {}  # nebius: deployed custom models by short name
        self.deployments: dict[str, str] = {}  # azure: deployment name -> model it serves
        self.lock = threading.RLock()
        self.counter = 0
        self._clock: dict[str, dict] = {}  # per job: when its current phase started, and more
        encoding_for("gpt-4o-mini")  # loaded now, not inside the first request's time
        # Time, in seconds, of each phase of a job; tests make them as short or long as needed.
        self.durations = {"validating_files": 0.05, "queued": 0.1, "running": 0.3}
        self.training_steps = 3  # "Step k/n" events spread over the running phase
        self.deploy_seconds = 0.1  # nebius: how long a deployment stays "validating"
        self.deploy_fails: str | None = None  # nebius: status_reason of a deploy that fails
        self.deploy_never_ready = False  # nebius: a deploy that stays "validating"
        # Failure knobs.
        self.create_status: int | None = None  # answer job creation with this status
        self.create_anyway = False  # ...but create the job all the same (a lost answer)
        self.create_error_code = "server_error"
        self.rate_limit_polls = 0  # the next N job retrievals answer 429
        self.retry_after = 1  # seconds a 429 asks for, whole seconds like the real header
        self.fail_job_with: tuple[str, str] | None = None  # (code, message) when running ends
        self.hold_at_running = False  # a job stays "running" until this is set False

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> FakeAPI:
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                api._handle(self, "GET")

            def do_POST(self):
                api._handle(self, "POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    @property
    def base_url(self) -> str:
        return f"{self.root}{self.prefix}/"

    def calls(self, method: str, path: str) -> list[dict]:
        """Recorded requests with this method whose path (after the prefix) equals `path`."""
        return [r for r in self.requests if r["method"] == method and r["route"] == path]

    def deploy(self, name: str, model: str) -> None:
        """Azure: a deployment `name` serving `model` (what `az ... deployment create` makes)."""
        self.deployments[name] = model

    def job(self, job_id: str) -> dict:
        """A job as the API would show it now."""
        with self.lock:
            return self._advance(self.jobs[job_id])

    def phase_started(self, job_id: str, status: str) -> float:
        """When (time.time()) the job entered `status`."""
        with self.lock:
            self._advance(self.jobs[job_id])
            return self._clock[job_id]["entered"][status]

    def checkpoints(self, job_id: str) -> list[dict]:
        """The job's checkpoints as the API lists them (newest first)."""
        with self.lock:
            return self._checkpoints(self._advance(self.jobs[job_id]))

    # ------------------------------------------------------------------ plumbing
    def _new_id(self, kind: str) -> str:
        with self.lock:
            self.counter += 1
            return f"{kind}{self.counter:06d}"

    def _authorized(self, headers) -> bool:
        bearer = headers.get("Authorization") == f"Bearer {self.key}"
        if self.provider == "azure":
            return bearer or headers.get("api-key") == self.key
        return bearer

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        url = urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        if url.path.startswith(self.prefix + "/"):
            route = url.path[len(self.prefix) :]
        elif self.provider == "nebius" and url.path.startswith("/v0/"):
            route = url.path  # Nebius's own model API lives beside /v1
        else:
            route = None
        record = {
            "method": method,
            "path": url.path,
            "route": route,
            "query": parse_qs(url.query),
            "headers": {k.lower(): v for k, v in handler.headers.items()},
            "body": body,
            "time": time.time(),  # the clock jobs move on, so a test can line the two up
        }
        with self.lock:
            self.requests.append(record)
        if route is None:
            return self._send(handler, 404, error(f"Invalid URL ({method} {url.path})", None))
        if not self._authorized(handler.headers):
            # OpenAI quotes the start and the end of the key it refused
            sent = handler.headers.get("Authorization", "").removeprefix("Bearer ")
            shown = f"{sent[:3]}{'*' * 8}{sent[-4:]}"
            message = f"Incorrect API key provided: {shown}. You can find your API key at ..."
            return self._send(handler, 401, error(message, "invalid_api_key"))
        try:
            with self.lock:
                status, payload, headers = self._route(method, route, record)
        except KeyError as exc:
            status, headers = 404, {}
            payload = error(f"No such object: {exc.args[0]}", None)
        self._send(handler, status, payload, headers)

    def _send(self, handler, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(data)

    # ------------------------------------------------------------------ the API
    def _route(self, method: str, route: str, request: dict):
        parts = route.strip("/").split("/")
        query = request["query"]
        if method == "POST" and route == "/files":
            return self._upload(request)
        if parts[:2] == ["fine_tuning", "jobs"]:
            if method == "POST" and len(parts) == 2:
                return self._create_job(json.loads(request["body"]))
            if method == "GET" and len(parts) == 2:
                return 200, self._list_jobs(query), {}
            job = self._advance(self.jobs[parts[2]])
            if method == "GET" and len(parts) == 3:
                return self._retrieve(job)
            if method == "GET" and parts[3:] == ["events"]:
                return 200, page(list(reversed(self.events[job["id"]])), query), {}
            if method == "GET" and parts[3:] == ["checkpoints"]:
                return 200, page(self._checkpoints(job), query, default_limit=10), {}
            if method == "POST" and parts[3:] == ["cancel"]:
                return self._cancel(job)
        if method == "POST" and route == "/chat/completions":
            return self._chat(json.loads(request["body"]))
        if route == "/v0/models" and method == "POST":
            return self._deploy(json.loads(request["body"]))
        if parts[:2] == ["v0", "models"] and method == "GET" and len(parts) == 3:
            return 200, self._model_status(self.models[parts[2]]), {}
        return 404, error(f"Invalid URL ({method} {route})", None), {}

    def _upload(self, request: dict):
        content_type = request["headers"].get("content-type", "")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + request["body"]
        )
        fields = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = (part.get_filename(), part.get_payload(decode=True))
        filename, data = fields["file"]
        purpose = fields["purpose"][1].decode()
        if purpose == "fine-tune" and not (filename or "").endswith(".jsonl"):
            message = "Invalid file format for Fine-Tuning API. Must be .jsonl"
            return 400, error(message, None, param="file"), {}
        file_id = self._new_id("file-")
        self.files[file_id] = {"filename": filename, "purpose": purpose, "bytes": data}
        created = int(time.time())
        return (
            200,
            {
                "id": file_id,
                "object": "file",
                "bytes": len(data),
                "created_at": created,
                "filename": filename,
                "purpose": purpose,
                "status": "processed",
            },
            {},
        )

    def _create_job(self, body: dict):
        if self.create_status and not self.create_anyway:
            code = self.create_error_code
            kind = "server_error" if self.create_status >= 500 else "invalid_request_error"
            text = SERVER_ERROR if self.create_status >= 500 else f"job creation refused ({code})"
            return self.create_status, error(text, code, kind), {}
        model = body.get("model")
        if model not in FINE_TUNABLE[self.provider]:
            message = f"Model {model} is not available for fine-tuning or does not exist."
            return 400, error(message, "model_not_available", param="model"), {}
        for role in ("training_file", "validation_file"):
            file_id = body.get(role)
            if file_id is None and role == "validation_file":
                continue
            if file_id not in self.files or self.files[file_id]["purpose"] != "fine-tune":
                message = f"invalid {role}: {file_id}"
                return 400, error(message, f"invalid_{role}", param=role), {}
        method = body.get("method") or {"type": "supervised", "supervised": {}}
        hyper = (method.get(method.get("type", "supervised")) or {}).get("hyperparameters") or {}
        hyper = {**(body.get("hyperparameters") or {}), **hyper}
        for name, value in hyper.items():
            wrong = hyperparameter_error(self.provider, name, value)
            if wrong:
                param = f"method.supervised.hyperparameters.{name}"
                return 400, error(wrong, "invalid_hyperparameter", param=param), {}
        job_id = self._new_id("ftjob-")
        job = {
            "id": job_id,
            "object": "fine_tuning.job",
            "created_at": int(time.time()),
            "error": None,
            "fine_tuned_model": None,
            "finished_at": None,
            # as asked: "auto" stays "auto" here (the service's own rule for batch size and
            # multiplier is not published); n_epochs "auto" resolves when validation ends
            "hyperparameters": {
                "n_epochs": hyper.get("n_epochs", "auto"),
                **{name: hyper.get(name, "auto") for name in HYPERPARAMETERS[self.provider]},
            },
            "model": model,
            "organization_id": "org-fake",
            "result_files": [],
            "seed": body.get("seed", 0),
            "status": "validating_files",
            "trained_tokens": None,
            "training_file": body["training_file"],
            "validation_file": body.get("validation_file"),
            "metadata": body.get("metadata"),
            "method": method,
            "suffix": body.get("suffix"),
            "estimated_finish": None,
        }
        self.jobs[job_id] = job
        self.events[job_id] = []
        now = time.time()
        self._clock[job_id] = {"phase_start": now, "steps": 0, "entered": {"validating_files": now}}
        self._event(job, f"Created fine-tuning job: {job_id}", now)
        self._event(job, f"Validating training file: {job['training_file']}", now)
        if self.create_status:  # created, but the answer is an error: the client cannot know
            return self.create_status, error(SERVER_ERROR, None, "server_error"), {}
        return 200, job, {}

    def _list_jobs(self, query: dict) -> dict:
        wanted = {
            key[len("metadata[") : -1]: values[0]
            for key, values in query.items()
            if key.startswith("metadata[")
        }
        jobs = [
            self._advance(job)
            for job in reversed(self.jobs.values())
            if all((job["metadata"] or {}).get(k) == v for k, v in wanted.items())
        ]
        return page(jobs, query)

    def _retrieve(self, job: dict):
        if self.rate_limit_polls > 0:
            self.rate_limit_polls -= 1
            message = "Rate limit reached for requests per min (RPM): Limit 60, Used 60."
            headers = {"retry-after": str(self.retry_after)}
            return 429, error(message, "rate_limit_exceeded", "requests"), headers
        return 200, job, {}

    def _cancel(self, job: dict):
        if job["status"] in ENDED:
            message = f"Job {job['id']} has already {job['status']}: it cannot be cancelled."
            return 400, error(message, None), {}
        job.update(status="cancelled", finished_at=int(time.time()))
        self._clock[job["id"]]["entered"]["cancelled"] = time.time()
        self._event(job, "Fine-tuning job cancelled", time.time())
        return 200, job, {}

    # ------------------------------------------------------------------ the clock
    def _phase_seconds(self, job: dict, phase: str) -> float:
        if phase == "running" and self.hold_at_running:
            return math.inf
        return self.durations[phase]

    def _advance(self, job: dict) -> dict:
        """Bring a job to where the clock says it is, firing each transition once, in order."""
        clock = self._clock[job["id"]]
        now = time.time()
        while job["status"] not in ENDED:
            phase = job["status"]
            start = clock["phase_start"]
            end = start + self._phase_seconds(job, phase)
            if phase == "running":
                self._training_steps(job, clock, start, min(now, end))
            if now < end:
                break
            self._end_phase(job, phase, end)
            clock["phase_start"] = end
            clock["entered"][job["status"]] = end
        return job

    def _training_steps(self, job: dict, clock: dict, start: float, until: float) -> None:
        """The step events a running job has logged by `until` (a held job keeps logging)."""
        n = self.training_steps
        step_seconds = self.durations["running"] / (n + 1)
        if step_seconds <= 0:
            return
        while clock["steps"] < n or self.hold_at_running:
            at = start + (clock["steps"] + 1) * step_seconds
            if at > until:
                return
            clock["steps"] += 1
            loss = 2.0 / (1 + clock["steps"])
            self._event(job, f"Step {clock['steps']}: training loss={loss:.2f}", at, "metrics")

    def _end_phase(self, job: dict, phase: str, at: float) -> None:
        if phase == "validating_files":
            problem = self._validate(job)
            if problem:
                param, code, message = problem
                job.update(
                    status="failed",
                    finished_at=int(at),
                    error={"code": code, "message": message, "param": param},
                )
                self._event(job, message, at, level="error")
                return
            job["status"] = "queued"
            self._event(job, "Files validated, moving job to queued state", at)
        elif phase == "queued":
            job["status"] = "running"
            if job["hyperparameters"]["n_epochs"] == "auto":
                job["hyperparameters"]["n_epochs"] = auto_epochs(self._examples(job))
            self._event(job, f"Fine-tuning job started: {job['id']}", at)
        else:
            if self.fail_job_with:
                code, message = self.fail_job_with
                job.update(
                    status="failed",
                    finished_at=int(at),
                    error={"code": code, "message": message, "param": None},
                )
                self._event(job, f"Fine-tuning job failed: {message}", at, level="error")
                return
            job.update(
                status="succeeded",
                finished_at=int(at),
                trained_tokens=self._trained_tokens(job),
                fine_tuned_model=self._tuned_name(job),
            )
            self._event(job, f"New fine-tuned model created: {job['fine_tuned_model']}", at)
            self._event(job, "The job has successfully completed", at)

    def _validate(self, job: dict):
        enc = encoding_for(job["model"])
        for role in ("training_file", "validation_file"):
            if not job.get(role):
                continue
            problem, n, _ = check_chat_file(self.files[job[role]]["bytes"], enc)
            if problem is None and role == "training_file" and n < 10:
                message = f"Training file has {n} example(s), but must have at least 10 examples"
                return role, "invalid_n_examples", message
            if problem:
                which = "training" if role == "training_file" else "validation"
                message = (
                    f"The job failed due to an invalid {which} file. {problem} "
                    "Correct the file and create a new job."
                )
                return role, f"invalid_{role}", message
        return None

    def _examples(self, job: dict) -> int:
        data = self.files[job["training_file"]]["bytes"]
        return sum(1 for line in data.decode("utf-8").splitlines() if line.strip())

    def _trained_tokens(self, job: dict) -> int:
        enc = encoding_for(job["model"])
        limit = CONTEXT_TOKENS[self.provider]
        data = self.files[job["training_file"]]["bytes"].decode("utf-8")
        per_epoch = sum(
            min(limit, chat_tokens(enc, json.loads(line)["messages"]))
            for line in data.splitlines()
            if line.strip()
        )
        return per_epoch * job["hyperparameters"]["n_epochs"]

    def _tuned_name(self, job: dict) -> str:
        tail = job["id"][-6:]
        if self.provider == "azure":
            return f"{job['model']}.ft-{tail}"
        if self.provider == "nebius":
            return f"{job['model']}-{job['suffix']}-{tail}"
        return f"ft:{job['model']}:fake-org:{job['suffix']}:{tail}"

    def _checkpoints(self, job: dict) -> list[dict]:
        if job["status"] != "succeeded":
            return []
        epochs = job["hyperparameters"]["n_epochs"]
        return [
            {
                "id": f"ftckpt_{job['id'][-6:]}e{epoch}",
                "object": "fine_tuning.job.checkpoint",
                "created_at": job["finished_at"],
                "fine_tuned_model_checkpoint": f"{job['fine_tuned_model']}:ckpt-step-{epoch * 10}",
                "fine_tuning_job_id": job["id"],
                "metrics": {},
                "step_number": epoch * 10,
            }
            for epoch in range(epochs, 0, -1)
        ]

    def _event(self, job: dict, message: str, at: float, kind="message", level="info") -> None:
        events = self.events[job["id"]]
        events.append(
            {
                "id": f"ftevent-{job['id'][-6:]}-{len(events):03d}",
                "object": "fine_tuning.job.event",
                "created_at": int(at),
                "level": level,
                "message": message,
                "type": kind,
                "data": {},
            }
        )

    # ------------------------------------------------------------------ chat and deploys
    def servable(self, model: str) -> bool:
        if self.provider == "azure":
            return model in self.deployments
        tuned = {self._advance(job)["fine_tuned_model"] for job in self.jobs.values()}
        if self.provider == "openai":
            return model in CHAT_MODELS["openai"] or model in tuned
        statuses = (self._model_status(m) for m in self.models.values())
        active = {m["name"] for m in statuses if m["status"] == "active"}
        return model in CHAT_MODELS["nebius"] or model in active

    def _chat(self, body: dict):
        model = body["model"]
        if not self.servable(model):
            if self.provider == "azure":
                missing = {"code": "DeploymentNotFound", "message": DEPLOYMENT_NOT_FOUND}
                return 404, {"error": missing}, {}
            message = f"The model `{model}` does not exist or you do not have access to it."
            return 404, error(message, "model_not_found"), {}
        served = self.deployments.get(model, model)
        enc = encoding_for(served)
        question = body["messages"][-1]["content"]
        text, finish = f"[{model}] {question}", "stop"
        tokens = enc.encode_ordinary(text)
        limit = body.get("max_tokens") or body.get("max_completion_tokens")
        if limit is not None and len(tokens) > limit:
            tokens, finish = tokens[:limit], "length"
            text = enc.decode(tokens)
        prompt = chat_tokens(enc, body["messages"])
        reply = {
            "id": self._new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": served,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": finish,
                    "message": {"role": "assistant", "content": text},
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": len(tokens),
                "total_tokens": prompt + len(tokens),
            },
        }
        return 200, reply, {}

    def _deploy(self, body: dict):
        job_id, _, checkpoint = body.get("source", "").partition(":")
        job = self._advance(self.jobs[job_id])
        if checkpoint not in {c["id"] for c in self._checkpoints(job)}:
            return 400, error("unknown checkpoint " + body["source"], None, param="source"), {}
        if body.get("base_model") not in CHAT_MODELS["nebius"]:
            message = f"base_model {body.get('base_model')} cannot serve LoRA adapters"
            return 400, error(message, None, param="base_model"), {}
        letters = hashlib.sha1(f"{body['name']}{self.counter}".encode()).hexdigest()[:4]
        self.counter += 1
        short = f"{body['name']}-{letters}"
        model = {
            "name": f"{job['model']}-LoRa:{short}",
            "base_model": body["base_model"],
            "source": body["source"],
            "description": body.get("description"),
            "created_at": int(time.time()),
            "status": "validating",
            "_started": time.time(),
        }
        self.models[short] = model
        return 200, self._model_status(model), {}

    def _model_status(self, model: dict) -> dict:
        ready = time.time() >= model["_started"] + self.deploy_seconds
        if ready and not self.deploy_never_ready and model["status"] == "validating":
            if self.deploy_fails:
                model.update(status="error", status_reason=self.deploy_fails)
            else:
                model["status"] = "active"
        return {k: v for k, v in model.items() if not k.startswith("_")}
