"""A small, real HTTP fake of the OpenAI fine-tuning API, in the three shapes the script drives.

It runs on 127.0.0.1 (stdlib ThreadingHTTPServer) and answers the official `openai` SDK the way
the real services do, as far as the script needs:

- openai:  paths under /v1/, `Authorization: Bearer KEY`.
- azure:   the Azure OpenAI v1 API, paths under /openai/v1/; the key is accepted in the
           `api-key` header (the REST reference) or as `Authorization: Bearer KEY` (what
           Microsoft's v1 examples send through the OpenAI client); `trainingType` in the job
           body; chat models are deployment names.
- nebius:  Token Factory, paths under /v1/ plus the non-OpenAI `POST /v0/models` that deploys
           a job's checkpoint as a servable LoRA model, `Authorization: Bearer KEY`.

Jobs move validating_files -> queued -> running -> succeeded, one step per retrieval. Knobs on
the instance script the failures a test needs (500 or 403 on create, 429 on polls, a failed
job, a job that stays running). Every request is recorded for the test to inspect.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PREFIX = {"openai": "/v1", "azure": "/openai/v1", "nebius": "/v1"}
STEPS = ["validating_files", "queued", "running", "succeeded"]


class FakeAPI:
    def __init__(self, provider: str = "openai", key: str = "sk-test-key"):
        self.provider = provider
        self.key = key
        self.prefix = PREFIX[provider]
        self.requests: list[dict] = []
        self.files: dict[str, dict] = {}
        self.jobs: dict[str, dict] = {}
        self.events: dict[str, list[dict]] = {}
        self.models: dict[str, dict] = {}  # nebius: deployed custom models by short name
        self.lock = threading.Lock()
        self.counter = 0
        # Failure knobs.
        self.create_status: int | None = None  # answer job creation with this status
        self.create_anyway = False  # ...but create the job all the same (a lost answer)
        self.create_error_code = "server_error"
        self.rate_limit_polls = 0  # the next N job retrievals answer 429 (Retry-After 20 ms)
        self.fail_job_with: tuple[str, str] | None = None  # (code, message) at "running"
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
        }
        self.requests.append(record)
        if route is None:
            return self._send(handler, 404, error("no such route " + url.path, "not_found"))
        if not self._authorized(handler.headers):
            # OpenAI quotes the start and the end of the key it refused
            sent = handler.headers.get("Authorization", "").removeprefix("Bearer ")
            shown = f"{sent[:3]}{'*' * 8}{sent[-4:]}"
            message = f"Incorrect API key provided: {shown}. You can find your API key at ..."
            return self._send(handler, 401, error(message, "invalid_api_key"))
        try:
            status, payload, headers = self._route(method, route, record)
        except KeyError as exc:
            status, payload, headers = 404, error(f"not found: {exc}", "not_found"), {}
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
        if method == "POST" and route == "/files":
            return self._upload(request)
        if parts[:2] == ["fine_tuning", "jobs"]:
            if method == "POST" and len(parts) == 2:
                return self._create_job(json.loads(request["body"]))
            if method == "GET" and len(parts) == 2:
                return 200, self._list_jobs(request["query"]), {}
            job = self.jobs[parts[2]]
            if method == "GET" and len(parts) == 3:
                return self._retrieve(job)
            if method == "GET" and parts[3:] == ["events"]:
                return 200, page(list(reversed(self.events[job["id"]]))), {}
            if method == "GET" and parts[3:] == ["checkpoints"]:
                return 200, page(self._checkpoints(job)), {}
            if method == "POST" and parts[3:] == ["cancel"]:
                job["status"] = "cancelled"
                return 200, job, {}
        if method == "POST" and route == "/chat/completions":
            return self._chat(json.loads(request["body"]))
        if route == "/v0/models" and method == "POST":
            return self._deploy(json.loads(request["body"]))
        if parts[:2] == ["v0", "models"] and method == "GET" and len(parts) == 3:
            model = self.models[parts[2]]
            model["status"] = "active"  # ready on the first look
            return 200, model, {}
        return 404, error(f"no such route {method} {route}", "not_found"), {}

    def _upload(self, request: dict):
        content_type = request["headers"].get("content-type", "")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + request["body"]
        )
        fields = {}
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            fields[name] = (part.get_filename(), part.get_payload(decode=True))
        file_id = self._new_id("file-")
        filename, data = fields["file"]
        self.files[file_id] = {
            "filename": filename,
            "purpose": fields["purpose"][1].decode(),
            "bytes": data,
        }
        return (
            200,
            {
                "id": file_id,
                "object": "file",
                "bytes": len(data),
                "created_at": int(time.time()),
                "filename": filename,
                "purpose": fields["purpose"][1].decode(),
                "status": "processed",
            },
            {},
        )

    def _create_job(self, body: dict):
        if self.create_status and not self.create_anyway:
            code = self.create_error_code
            return self.create_status, error(f"job creation refused ({code})", code), {}
        if body.get("training_file") not in self.files:
            return 400, error("training_file not found", "invalid_training_file"), {}
        job_id = self._new_id("ftjob-")
        hyper = (body.get("method") or {}).get("supervised", {}).get("hyperparameters", {})
        job = {
            "id": job_id,
            "object": "fine_tuning.job",
            "created_at": int(time.time()),
            "error": None,
            "fine_tuned_model": None,
            "finished_at": None,
            "hyperparameters": {"n_epochs": hyper.get("n_epochs", 3)},
            "model": body["model"],
            "organization_id": "org-fake",
            "result_files": [],
            "seed": body.get("seed", 0),
            "status": STEPS[0],
            "trained_tokens": None,
            "training_file": body["training_file"],
            "validation_file": body.get("validation_file"),
            "metadata": body.get("metadata"),
            "method": body.get("method"),
            "suffix": body.get("suffix"),
        }
        self.jobs[job_id] = job
        self.events[job_id] = []
        self._event(job, f"Created fine-tuning job: {job_id}")
        if self.create_status:  # created, but the answer is an error: the client cannot know
            return self.create_status, error("upstream timed out", "server_error"), {}
        return 200, job, {}

    def _list_jobs(self, query: dict) -> dict:
        wanted = {
            key[len("metadata[") : -1]: values[0]
            for key, values in query.items()
            if key.startswith("metadata[")
        }
        jobs = [
            job
            for job in reversed(self.jobs.values())
            if all((job["metadata"] or {}).get(k) == v for k, v in wanted.items())
        ]
        return page(jobs)

    def _retrieve(self, job: dict):
        if self.rate_limit_polls > 0:
            self.rate_limit_polls -= 1
            return 429, error("Rate limit reached", "rate_limit_exceeded"), {"retry-after-ms": "20"}
        status = job["status"]
        if status in ("succeeded", "failed", "cancelled"):
            return 200, job, {}
        if status == "running" and self.hold_at_running:
            self._event(job, "Step 7/390: training loss=1.23")
            return 200, job, {}
        if status == "running" and self.fail_job_with:
            code, message = self.fail_job_with
            job.update(status="failed", error={"code": code, "message": message, "param": None})
            self._event(job, f"Fine-tuning job failed: {message}", level="error")
            return 200, job, {}
        job["status"] = STEPS[STEPS.index(status) + 1]
        self._event(job, f"Job is {job['status']}")
        if job["status"] == "succeeded":
            training = self.files[job["training_file"]]["bytes"]
            job["trained_tokens"] = len(training.split()) * job["hyperparameters"]["n_epochs"]
            job["finished_at"] = int(time.time())
            job["fine_tuned_model"] = self._tuned_name(job)
            self._event(job, "The job has successfully completed")
        return 200, job, {}

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
        return [
            {
                "id": f"ftckpt_{job['id'][-6:]}",
                "object": "fine_tuning.job.checkpoint",
                "created_at": int(time.time()),
                "fine_tuned_model_checkpoint": job["fine_tuned_model"],
                "fine_tuning_job_id": job["id"],
                "metrics": {},
                "step_number": 10,
            }
        ]

    def _event(self, job: dict, message: str, level: str = "info") -> None:
        events = self.events[job["id"]]
        events.append(
            {
                "id": f"ftevent-{job['id'][-6:]}-{len(events)}",
                "object": "fine_tuning.job.event",
                "created_at": int(time.time()),
                "level": level,
                "message": message,
                "type": "message",
            }
        )

    def servable(self, model: str) -> bool:
        tuned = {job["fine_tuned_model"] for job in self.jobs.values()}
        if self.provider == "openai":
            return model in tuned or not model.startswith("ft:")
        if self.provider == "nebius":
            return model in {m["name"] for m in self.models.values()} or "LoRa" not in model
        return True  # Azure: any deployment name (the test decides which exist)

    def _chat(self, body: dict):
        model = body["model"]
        if not self.servable(model):
            return 404, error(f"The model {model} does not exist", "model_not_found"), {}
        question = body["messages"][-1]["content"]
        text = f"[{model}] {question}"
        prompt = sum(len(m["content"].split()) for m in body["messages"])
        reply = {
            "id": self._new_id("chatcmpl-"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "finish_reason": "stop",
                    "message": {"role": "assistant", "content": text},
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": len(text.split()),
                "total_tokens": prompt + len(text.split()),
            },
        }
        return 200, reply, {}

    def _deploy(self, body: dict):
        job_id, _, checkpoint = body["source"].partition(":")
        job = self.jobs[job_id]
        if checkpoint not in {c["id"] for c in self._checkpoints(job)}:
            return 400, error("unknown checkpoint " + body["source"], "invalid_source"), {}
        short = f"{body['name']}-abcd"
        model = {
            "name": f"{job['model']}-LoRa:{short}",
            "base_model": body["base_model"],
            "source": body["source"],
            "created_at": int(time.time()),
            "status": "validating",
        }
        self.models[short] = model
        return 200, dict(model), {}


def error(message: str, code: str) -> dict:
    return {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    }


def page(items: list[dict]) -> dict:
    return {"object": "list", "data": items, "has_more": False}
