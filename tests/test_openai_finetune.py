"""openai_finetune.py, run as a real process against a real HTTP fake of the API.

The script drives the official `openai` SDK over HTTP to tests/fake_finetune_api.py on
127.0.0.1 (the network guard refuses anything else). The fake is as strict as the services it
stands for (its docstring lists each behaviour and its source): jobs move on the clock, files
are validated and billed with the real encoding, errors have the API's bodies. The validator,
token counts and estimates are also checked directly, against the real o200k_base encoding.
"""

from __future__ import annotations

import ast
import json
import math
import queue
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import DATA_FILE, REPO, child_env, load_script, start_script_in
from fake_finetune_api import FakeAPI

SCRIPT = "openai_finetune.py"
KEY = "sk-test-" + "7f3a9c" * 6  # distinctive, so a leak anywhere is found by plain search
KEY_VARS = {"openai": "OPENAI_API_KEY", "azure": "AZURE_OPENAI_API_KEY", "nebius": "NEBIUS_API_KEY"}
FAST = ("--poll-interval", "0.02", "--test-limit", "3")
BASE = "gpt-4o-mini-2024-07-18"


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def oft():
    """The script as a module, for the functions tested directly."""
    return load_script(SCRIPT)


@pytest.fixture
def count_tokens(oft, monkeypatch):
    """The real o200k_base counter, from litellm's copy (never a download)."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(oft.litellm_tokenizer_dir()))
    count, label = oft.load_token_counter(BASE)
    assert "o200k_base" in label and "APPROXIMATE" not in label
    return count


@pytest.fixture
def api():
    """Start fakes of a given provider's API; all stopped after the test."""
    started = []

    def start(provider: str = "openai") -> FakeAPI:
        fake = FakeAPI(provider, KEY).start()
        started.append(fake)
        return fake

    yield start
    for fake in started:
        fake.stop()


@pytest.fixture
def real_run(run_script):
    """A real run (--run --yes) of the script against a fake, with the key in the environment."""

    def run(fake: FakeAPI, *args: str, key: str | None = KEY, **kwargs):
        env = {KEY_VARS[fake.provider]: key} if key else {}
        return run_script(
            SCRIPT,
            "--run",
            "--yes",
            "--provider",
            fake.provider,
            "--base-url",
            fake.base_url,
            *FAST,
            *args,
            env={**env, **kwargs.pop("env", {})},
            timeout=120,
            **kwargs,
        )

    return run


def only_job(fake: FakeAPI) -> dict:
    assert len(fake.jobs) == 1, list(fake.jobs)
    return fake.job(next(iter(fake.jobs)))


def results(result, output_dir: str = "outputs") -> dict:
    return json.loads((result.cwd / output_dir / "results" / "openai.json").read_text())


def job_record(result, output_dir: str = "outputs") -> dict:
    return json.loads((result.cwd / output_dir / "openai" / "job.json").read_text())


def chat_models(fake: FakeAPI) -> list[str]:
    return [json.loads(r["body"])["model"] for r in fake.calls("POST", "/chat/completions")]


def creates(fake: FakeAPI) -> list[dict]:
    return fake.calls("POST", "/fine_tuning/jobs")


def error_line(result) -> str:
    assert "Traceback" not in result.output, result.output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def wait_for(condition, timeout: float = 30):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def pasted(oft, text: str, at_least: int = 1) -> list:
    """Every command the script printed for the user to run (a line of its own, or the end of a
    line after "Resume with: "), split as a shell would, run back through the script's own
    parser: each must parse. Returns their Configs."""
    configs = []
    for line in text.splitlines():
        command = line.strip().split("Resume with: ", 1)[-1]
        if not command.startswith("python "):
            continue
        argv = shlex.split(command)
        assert argv[1] == SCRIPT, command
        configs.append(oft.parse_config(argv[2:]))
    assert len(configs) >= at_least, text[-3000:]
    return configs


def sdk(fake: FakeAPI):
    from openai import OpenAI

    return OpenAI(api_key=KEY, base_url=fake.base_url, max_retries=0)


def upload(client, lines: list[str], name: str = "t.jsonl"):
    data = "".join(line + "\n" for line in lines).encode()
    return client.files.create(file=(name, data, "application/jsonl"), purpose="fine-tune")


def write_data(path, n_train: int, n_test: int, answer=lambda n: f"It is {2 * n}.") -> None:
    rows = [
        {"question": f"What is {n} + {n}?", "answer": answer(n), "split": "train"}
        for n in range(n_train)
    ]
    rows += [
        {"question": f"What is {n} times two?", "answer": f"{2 * n}.", "split": "test"}
        for n in range(n_test)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


# ---------------------------------------------------------------------------- real runs
def test_full_real_run_trains_answers_scores_and_records(api, real_run, oft):
    fake = api()
    # each status long enough that a poll on a busy machine still sees it (0.05 s of validation
    # was once over before the first poll)
    fake.durations.update(validating_files=1.0, queued=1.0, running=1.0)
    result = real_run(fake)
    assert result.returncode == 0, result.output[-3000:]
    job = only_job(fake)
    assert job["status"] == "succeeded"
    (cancel,) = pasted(oft, result.stdout)  # printed when the job starts, to paste as it is
    assert cancel.cancel == job["id"] and not cancel.run and cancel.base_url == fake.base_url

    create = json.loads(creates(fake)[0]["body"])
    assert create["method"] == {"type": "supervised", "supervised": {"hyperparameters": {}}}
    assert "hyperparameters" not in create  # the deprecated top-level form is not used
    assert create["model"] == BASE and create["suffix"] == "edu-qa" and create["seed"] == 42
    assert create["validation_file"] and create["metadata"]["run_tag"]
    assert {f["purpose"] for f in fake.files.values()} == {"fine-tune"}
    # the job's own events are printed as they arrive, and every status it went through
    assert "Fine-tuning job started" in result.stdout and "training loss=" in result.stdout
    for status in ("validating_files", "queued", "running", "succeeded"):
        assert f"status: {status}" in result.stdout, status

    out = results(result)
    assert out["approach"] == "openai" and out["n_test"] == 3
    assert out["tuned_model"] == job["fine_tuned_model"]
    for q in out["questions"]:  # the answers are what the server said, for both models
        assert q["baseline"] == f"[{BASE}] {q['question']}"
        assert q["tuned"] == f"[{job['fine_tuned_model']}] {q['question']}"
        assert 0 <= q["baseline_score"] <= 100 and 0 <= q["tuned_score"] <= 100
    assert out["trained_tokens"] == job["trained_tokens"]
    assert out["training_cost_usd"] == pytest.approx(job["trained_tokens"] * 3.00 / 1e6)
    total = out["training_cost_usd"] + out["answer_cost_usd"]
    assert out["cost_usd"] == pytest.approx(total, abs=1e-6)  # rounded to 6 places

    record = job_record(result)
    assert record["job_id"] == job["id"] and record["status"] == "succeeded"
    assert record["fine_tuned_model"] == job["fine_tuned_model"]
    assert (result.cwd / "outputs" / "results" / "comparison.png").stat().st_size > 0


def test_the_estimates_are_within_5_percent_of_what_the_service_counts(
    api, real_run, oft, count_tokens
):
    """The fake bills with the real encoding, so a wrong estimate (words for tokens, a missed
    epoch, the validation file billed) shows up here, not on a user's invoice."""
    fake = api()
    result = real_run(fake, env={"COLUMNS": "400"})
    assert result.returncode == 0, result.output[-3000:]
    out = results(result)
    printed = re.search(r"estimate: training\s*│\s*\$(\d+\.\d+)", result.stdout)
    assert printed, result.stdout
    estimated_training = float(printed.group(1))
    assert 0.95 <= estimated_training / out["training_cost_usd"] <= 1.05
    # what the guard compares with --max-cost, against what was billed in all
    assert 0.95 <= out["estimated_cost_usd"] / out["cost_usd"] <= 1.05
    # the answering requests: input tokens as the script counts them, as the server billed them
    used = ast.literal_eval(re.search(r"tokens used: (\{.*?\})", result.stdout).group(1))
    estimated_prompts = sum(
        oft.prompt_tokens(count_tokens, oft.chat_messages(q["question"])) for q in out["questions"]
    )
    for side in ("base_in", "tuned_in"):
        assert 0.95 <= estimated_prompts / used[side] <= 1.05, (side, used)


def test_the_uploaded_files_are_the_validated_files_byte_for_byte(api, real_run):
    fake = api()
    result = real_run(fake)
    assert result.returncode == 0, result.output[-3000:]
    job = only_job(fake)
    training = (result.cwd / "openai_edu_qa_training.jsonl").read_bytes()
    validation = (result.cwd / "outputs" / "openai" / "openai_edu_qa_validation.jsonl").read_bytes()
    assert fake.files[job["training_file"]]["bytes"] == training
    assert fake.files[job["validation_file"]]["bytes"] == validation
    assert "130 examples, format errors: none" in result.stdout  # this file was validated


def test_job_create_is_sent_once_when_the_server_answers_500(api, real_run):
    fake = api()
    fake.create_status, fake.create_anyway = 500, True  # created, but the answer was lost
    result = real_run(fake)
    assert len(creates(fake)) == 1  # the SDK would have retried it twice...
    assert "idempotency-key" not in creates(fake)[0]["headers"]  # ...with nothing to dedupe on
    assert result.returncode == 0, result.output[-3000:]
    assert "may have started anyway" in flat(result.stdout)
    assert results(result)["tuned_model"] == only_job(fake)["fine_tuned_model"]


def test_a_failed_create_exits_1_and_a_rerun_starts_exactly_one_job(api, real_run):
    fake = api()
    fake.create_status = 500
    failed = real_run(fake)
    assert failed.returncode == 1
    assert len(creates(fake)) == 1 and not fake.jobs
    assert "Run the same command again" in failed.stderr and "Traceback" not in failed.output
    fake.create_status = None
    again = real_run(fake)
    assert again.returncode == 0, again.output[-3000:]
    assert len(fake.jobs) == 1


def test_rate_limited_polls_wait_as_long_as_retry_after_asks(api, real_run):
    fake = api()
    fake.rate_limit_polls = 2
    result = real_run(fake)
    assert result.returncode == 0, result.output[-3000:]
    job = only_job(fake)
    polls = fake.calls("GET", f"/fine_tuning/jobs/{job['id']}")
    retried = [p for p in polls if p["headers"].get("x-stainless-retry-count") != "0"]
    assert len(retried) == 2 and fake.rate_limit_polls == 0
    # each retry came no sooner than the 429's Retry-After (1 s) allowed
    for retry in retried:
        before = polls[polls.index(retry) - 1]
        assert retry["time"] - before["time"] >= 0.9 * fake.retry_after


def test_training_not_available_is_explained_and_nothing_more_is_sent(api, real_run):
    fake = api()
    fake.create_status, fake.create_error_code = 403, "training_not_available"
    result = real_run(fake)
    assert result.returncode == 1
    assert (
        fake.requests[-1]["method"] == "POST" and fake.requests[-1]["route"] == "/fine_tuning/jobs"
    )
    assert len(creates(fake)) == 1
    for needed in ("training_not_available", "2027-01-06", "--provider azure", "--base-url"):
        assert needed in result.stderr, needed
    assert "huggingface_lora.py" in result.stderr and "Traceback" not in result.output


def test_a_file_the_service_refuses_fails_the_job_and_the_script_shows_why(api, real_run, tmp_path):
    # Text that spells a special token passes a JSON-level check but not the service's.
    write_data(tmp_path / "mine.jsonl", 14, 2, answer=lambda n: f"It is {2 * n}. <|endoftext|>")
    fake = api()
    fake.durations["validating_files"] = 1.0  # a first poll on a busy machine still sees it
    result = real_run(fake, "--data", "mine.jsonl")
    assert result.returncode == 1, result.output[-3000:]
    job = only_job(fake)
    assert job["status"] == "failed" and job["trained_tokens"] is None
    assert job["error"]["code"] == "invalid_training_file"
    assert "status: validating_files" in result.stdout and "status: running" not in result.stdout
    line = error_line(result)
    assert "invalid_training_file: The job failed due to an invalid training file" in line
    assert "invalid token: <|endoftext|>" in line
    assert job_record(result)["status"] == "failed"
    assert not (result.cwd / "outputs" / "results").exists()


def test_a_job_that_fails_while_running_shows_its_error_code_and_message(api, real_run):
    fake = api()
    fake.fail_job_with = ("server_error", "Fine-tuning failed on our side; please retry")
    result = real_run(fake)
    assert result.returncode == 1
    assert "status: running" in result.stdout
    assert "server_error: Fine-tuning failed on our side; please retry" in error_line(result)
    assert job_record(result)["status"] == "failed"
    assert not (result.cwd / "outputs" / "results").exists()


def test_a_quiet_queued_job_is_polled_less_and_less(api, real_run):
    """While nothing happens (a queued job logs nothing) the script backs off, as it says."""
    fake = api()
    fake.durations["queued"] = 1.5
    interval = 0.05
    result = real_run(fake, "--poll-interval", str(interval))
    assert result.returncode == 0, result.output[-3000:]
    job = only_job(fake)
    queued_from = fake.phase_started(job["id"], "queued")
    queued_until = fake.phase_started(job["id"], "running")
    polls = [
        r["time"]
        for r in fake.calls("GET", f"/fine_tuning/jobs/{job['id']}")
        if queued_from <= r["time"] < queued_until
    ]
    gaps = [b - a for a, b in zip(polls, polls[1:], strict=False)]
    assert gaps and max(gaps) >= 4 * interval, gaps  # the pause grew (up to 6x)
    assert len(polls) <= (queued_until - queued_from) / interval / 2, len(polls)


def test_events_are_printed_once_each_oldest_first(api, real_run):
    fake = api()
    fake.training_steps = 40  # more than one page of events (20) over the job
    result = real_run(fake)
    assert result.returncode == 0, result.output[-3000:]
    steps = [int(n) for n in re.findall(r"Step (\d+): training loss", result.stdout)]
    assert steps == sorted(set(steps)) and steps[-1] == 40, steps
    lines = result.stdout.splitlines()
    order = [
        next(i for i, line in enumerate(lines) if text in line)
        for text in ("Created fine-tuning job", "Files validated", "job started", "completed")
    ]
    assert order == sorted(order), order


@pytest.mark.parametrize(
    "signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"]
)
def test_ctrl_c_or_sigterm_while_polling_exits_130_or_143_and_job_id_resumes(
    api, real_run, oft, tmp_path, signum, code
):
    fake = api()
    fake.hold_at_running = True
    args = ("--run", "--yes", "--base-url", fake.base_url, *FAST)
    proc = start_script_in(tmp_path, SCRIPT, *args, env={"OPENAI_API_KEY": KEY})
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, deadline = [], time.monotonic() + 60
    while not any("status: running" in line for line in seen):
        seen.append(lines.get(timeout=max(0.1, deadline - time.monotonic())))
    time.sleep(0.2)  # a few polls while running
    proc.send_signal(signum)
    assert proc.wait(timeout=30) == code
    time.sleep(0.2)
    while not lines.empty():
        seen.append(lines.get())
    stdout, stderr = "".join(seen), proc.stderr.read()
    job = only_job(fake)
    assert job["status"] == "running"  # stopping the watch does not stop the job
    assert "status: running" in stdout
    assert stderr.lstrip().startswith(f"interrupted: stopped watching; job {job['id']} keeps")
    assert f"--job-id {job['id']}" in stderr and f"--cancel {job['id']}" in stderr, stderr
    resume, cancel = pasted(oft, stderr, at_least=2)
    assert (resume.job_id, resume.run, cancel.cancel) == (job["id"], True, job["id"])

    fake.hold_at_running = False
    resumed = real_run(fake, "--job-id", job["id"])
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert len(creates(fake)) == 1 and len(fake.files) == 2  # nothing uploaded or created again
    assert results(resumed)["tuned_model"] == only_job(fake)["fine_tuned_model"]


def test_an_identical_rerun_reuses_the_job_it_already_started(api, real_run):
    fake = api()
    assert real_run(fake).returncode == 0
    again = real_run(fake)
    assert again.returncode == 0, again.output[-3000:]
    assert len(creates(fake)) == 1 and len(fake.files) == 2
    assert "started earlier with this exact data" in again.stdout


def test_the_key_never_appears_in_output_or_any_written_file(api, real_run):
    fake = api()
    result = real_run(fake)
    assert result.returncode == 0, result.output[-3000:]
    assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in fake.requests)
    assert KEY not in result.output
    assert "OPENAI_API_KEY is set" in result.stdout
    written = [p for p in result.cwd.rglob("*") if p.is_file()]
    assert len(written) > 5
    for path in written:
        assert KEY.encode() not in path.read_bytes(), path


def test_the_key_is_read_from_dotenv_and_the_environment_wins(api, real_run, tmp_path):
    fake = api()
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY={KEY}\n")
    from_file = real_run(fake, key=None)
    assert from_file.returncode == 0, from_file.output[-3000:]
    assert "OPENAI_API_KEY is set" in from_file.stdout and KEY not in from_file.output
    assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in fake.requests)
    # a variable already set is not overridden by .env (here .env holds a stale key)
    (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-stale-" + "0" * 40 + "\n")
    both = real_run(fake)
    assert both.returncode == 0, both.output[-3000:]
    assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in fake.requests)


def test_output_dir_holds_everything_a_run_writes(api, real_run):
    fake = api()
    result = real_run(fake, "--output-dir", "elsewhere")
    assert result.returncode == 0, result.output[-3000:]
    assert results(result, "elsewhere")["tuned_model"] == only_job(fake)["fine_tuned_model"]
    assert job_record(result, "elsewhere")["status"] == "succeeded"
    assert (result.cwd / "elsewhere" / "results" / "comparison.md").is_file()
    assert not (result.cwd / "outputs").exists()


def test_ask_answers_with_the_recorded_fine_tuned_model(api, real_run):
    fake = api()
    assert real_run(fake).returncode == 0
    job = only_job(fake)
    asked = real_run(fake, "--ask", "Why is the sky blue?", env={"COLUMNS": "400"})
    assert asked.returncode == 0, asked.output[-3000:]
    assert chat_models(fake)[-2:] == [BASE, job["fine_tuned_model"]]
    assert f"[{job['fine_tuned_model']}] Why is the sky blue?" in asked.stdout
    assert f"[{BASE}] Why is the sky blue?" in asked.stdout
    assert len(creates(fake)) == 1


def test_cancel_stops_a_running_job_and_updates_its_record(api, run_script, tmp_path):
    fake = api()
    fake.hold_at_running = True
    client = sdk(fake)
    job = client.fine_tuning.jobs.create(model=BASE, training_file=upload(client, [GOOD] * 10).id)
    wait_for(lambda: fake.job(job.id)["status"] == "running")
    record = tmp_path / "outputs" / "openai" / "job.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"job_id": job.id, "status": "running"}))
    args = ("--cancel", job.id, "--base-url", fake.base_url)
    result = run_script(SCRIPT, *args, env={"OPENAI_API_KEY": KEY})
    assert result.returncode == 0, result.output
    assert fake.job(job.id)["status"] == "cancelled"
    assert f"job {job.id}: cancelled" in result.stdout
    assert json.loads(record.read_text())["status"] == "cancelled"

    unknown = run_script(
        SCRIPT, "--cancel", "ftjob-nope", "--base-url", fake.base_url, env={"OPENAI_API_KEY": KEY}
    )
    assert unknown.returncode == 2
    assert unknown.stderr == "error: --cancel ftjob-nope: no such job on openai\n"


def test_cancelling_a_job_that_already_ended_is_refused_in_one_line(api, run_script):
    fake = api()
    client = sdk(fake)
    job = client.fine_tuning.jobs.create(model=BASE, training_file=upload(client, [GOOD] * 10).id)
    wait_for(lambda: fake.job(job.id)["status"] == "succeeded")
    args = ("--cancel", job.id, "--base-url", fake.base_url)
    result = run_script(SCRIPT, *args, env={"OPENAI_API_KEY": KEY})
    assert result.returncode == 2, result.output
    assert "already succeeded" in error_line(result)
    assert fake.job(job.id)["status"] == "succeeded"


# ---------------------------------------------------------------------------- the fake itself
def test_the_fake_validates_files_as_the_service_does(api):
    """What the old fake accepted: a file of `{}` started a job that succeeded."""
    import openai

    fake = api()
    client = sdk(fake)
    bad = client.fine_tuning.jobs.create(model=BASE, training_file=upload(client, ["{}"] * 10).id)
    few = client.fine_tuning.jobs.create(model=BASE, training_file=upload(client, [GOOD] * 9).id)
    assert bad.status == few.status == "validating_files"
    wait_for(lambda: fake.job(bad.id)["status"] in ("failed", "succeeded"))
    wait_for(lambda: fake.job(few.id)["status"] in ("failed", "succeeded"))
    assert fake.job(bad.id)["error"]["code"] == "invalid_training_file"
    assert fake.job(bad.id)["error"]["param"] == "training_file"
    assert fake.job(few.id)["error"]["code"] == "invalid_n_examples"
    with pytest.raises(openai.BadRequestError, match="Must be .jsonl"):
        upload(client, [GOOD] * 10, name="t.json")
    with pytest.raises(openai.BadRequestError, match="not available for fine-tuning"):
        client.fine_tuning.jobs.create(model="gpt-4o-mini", training_file=bad.training_file)


def test_the_fake_moves_on_the_clock_and_pages_its_events(api):
    fake = api()
    fake.durations.update(validating_files=0.01, queued=60)  # a long quiet queue
    client = sdk(fake)
    job = client.fine_tuning.jobs.create(model=BASE, training_file=upload(client, [GOOD] * 10).id)
    wait_for(lambda: fake.job(job.id)["status"] == "queued")
    before = len(fake.events[job.id])
    for _ in range(5):  # polling does not move a job, nor make it talk
        assert client.fine_tuning.jobs.retrieve(job.id).status == "queued"
    assert len(fake.events[job.id]) == before == 3
    first = client.fine_tuning.jobs.list_events(job.id, limit=2)
    assert [e.message for e in first.data][0].startswith("Files validated")  # newest first
    assert first.has_more
    rest = client.fine_tuning.jobs.list_events(job.id, limit=2, after=first.data[-1].id)
    assert [e.message for e in rest.data] == [f"Created fine-tuning job: {job.id}"]
    assert not rest.has_more


# ---------------------------------------------------------------------------- the command line
def test_help_shows_each_settings_flag_with_its_help_and_default(oft, monkeypatch, capsys):
    """Each setting is written once, as a Config field: --help reads its flag, help and default
    from there, so a default changed in Config is the default --help shows."""
    from dataclasses import fields

    monkeypatch.setenv("COLUMNS", "1000")  # one line a flag
    with pytest.raises(SystemExit):
        oft.parse_config(["--help"])
    options = capsys.readouterr().out.split("\noptions:\n")[1].split("\n\n")[0]
    # One entry a flag: its line, and the help argparse puts under a long one.
    entries = [" ".join(entry.split()) for entry in re.split(r"\n(?=  -)", options)]
    settings = [spec for spec in fields(oft.Config) if "help" in spec.metadata]
    assert len(settings) == len(fields(oft.Config)) - 1  # all but argv, this run's own flags
    for spec in settings:
        flag = "--" + spec.name.replace("_", "-")
        (line,) = [entry for entry in entries if entry.startswith(flag + " ")]
        meta = spec.metadata
        shown = spec.default if meta["shown"] is None else meta["shown"]
        expected = meta["help"] + ("" if shown in (None, False) else f" (default: {shown})")
        assert line.endswith(expected), (flag, line)
    assert oft.Config().seed == 42  # the defaults --help shows are the ones a run gets


@pytest.mark.parametrize(
    "args, message",
    [
        (["--epoch", "2"], "unknown flag --epoch; did you mean --epochs? (see --help)"),
        (["--provider", "aws"], "--provider: invalid choice: 'aws' (choose from 'azure', "),
    ],
    ids=["abbreviation", "unknown provider"],
)
def test_a_flag_is_taken_only_as_spelled(oft, capsys, args, message):
    assert oft.run_cli(oft.main, args) == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")


def test_a_mistyped_provider_gets_argparses_line_and_a_did_you_mean(oft, capsys):
    assert oft.run_cli(oft.main, ["--provider", "opneai"]) == 2
    assert capsys.readouterr().err == (
        "error: --provider: invalid choice: 'opneai' (choose from 'azure', 'nebius', 'openai'); "
        "did you mean openai? (see --help)\n"
    )


# ---------------------------------------------------------------------------- model names
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--model", "gpt-4o-mini-2024-07-81"],
            "--model gpt-4o-mini-2024-07-81: no such snapshot; did you mean "
            "gpt-4o-mini-2024-07-18? (see --help)",
        ),
        (["--model", "gpt-4o-mni-2024-07-18"], "did you mean gpt-4o-mini-2024-07-18?"),
        (
            ["--model", "gpt-3.5-turbo"],
            "--model gpt-3.5-turbo: OpenAI no longer fine-tunes it; the snapshots left are ",
        ),
        (["--model", "gpt-3.5-turbo-0125"], "OpenAI no longer fine-tunes it"),
        (  # no such date on any cloud
            ["--provider", "azure", "--model", "gpt-4o-mini-2024-07-81"],
            "did you mean gpt-4o-mini-2024-07-18?",
        ),
    ],
    ids=["date typo", "name typo", "retired", "retired snapshot", "azure date typo"],
)
def test_a_model_name_that_cannot_work_is_one_line_with_the_name_it_is_close_to(
    oft, capsys, args, message
):
    assert oft.run_cli(oft.main, args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize(
    "provider, model, kind",
    [
        ("openai", BASE, None),
        ("openai", "ft:gpt-4o-mini-2024-07-18:my-org:edu-qa:abc123", None),  # the account's own
        ("openai", "gpt-4o-mini-2025-07-18", "warning"),  # a real date: perhaps a newer snapshot
        ("openai", "gpt-4.1-nano-2025-04-14", "warning"),  # not close enough to be a typo
        ("openai", "gpt-4o-mini", "warning"),  # the alias: the service may take it
        ("openai", "o4-mini-2025-04-16", "warning"),
        ("openai", "gpt-4o-mini-2024-07-81", "error"),
        ("openai", "gpt-3.5-turbo-1106", "error"),
        ("azure", "gpt-4o-mni-2024-07-18", "warning"),  # Azure fine-tunes more than it knows
        ("azure", "gpt-4o-mini-2024-07-81", "error"),
        ("nebius", "meta-llama/Meta-Llama-3.1-70B-Instruct", "warning"),
        ("nebius", "Qwen/Qwen3-32B", None),  # Nebius's list is long: only a near-miss is said
    ],
)
def test_a_model_name_is_an_error_where_it_cannot_work_a_warning_where_it_may_be_new(
    oft, provider, model, kind
):
    found = oft.model_check(provider, model)
    assert (found[0] if found else None) == kind, found


def test_a_model_the_script_does_not_know_is_a_warning_and_the_dry_run_goes_on(run_script, oft):
    newer = "gpt-4o-mini-2025-07-18"
    result = run_script(SCRIPT, "--model", newer, "--train-limit", "20", "--test-limit", "2")
    assert result.returncode == 0, result.output[-3000:]
    out = flat(result.stdout)
    assert f"warning: --model {newer} is not a model this script knows for openai" in out
    assert "did you mean gpt-4o-mini-2024-07-18?" in out
    assert f"No price is known for {newer}, so the command has no --max-cost" in out
    (command,) = pasted(oft, result.stdout)
    assert command.run and command.model == newer and command.max_cost is None


# ---------------------------------------------------------------- what a dry run ends with
def test_the_real_run_command_is_one_line_that_pastes_back_at_80_columns(run_script, oft, tmp_path):
    folder = tmp_path / "teacher's files, term 2"  # a quote, commas and spaces to quote
    folder.mkdir()
    data = folder / "my questions :cat:.jsonl"  # an emoji code rich would replace
    shutil.copy(DATA_FILE, data)
    result = run_script(SCRIPT, "--data", str(data), "--batch-size", "4", env={"COLUMNS": "80"})
    assert result.returncode == 0, result.output[-3000:]
    lines = result.stdout.rstrip().splitlines()
    assert lines[-2].endswith("To run it for real:") and len(lines[-1]) > 80
    (command,) = pasted(oft, lines[-1])
    assert command.run and command.data == data and command.batch_size == 4
    estimate = float(re.search(r"estimate: total\s*│\s*\$(\d+\.\d+)", result.stdout).group(1))
    assert estimate < command.max_cost <= math.ceil(estimate * 125) / 100 + 0.01
    assert "A real run needs OPENAI_API_KEY: put it in the environment or in .env." in flat(
        result.stdout
    )


def test_a_script_started_from_another_folder_is_named_as_it_was_typed(oft, tmp_path):
    (tmp_path / "tutorial").mkdir()
    for source in (REPO / SCRIPT, DATA_FILE):
        shutil.copy(source, tmp_path / "tutorial" / source.name)
    typed = f"tutorial/{SCRIPT}"
    proc = subprocess.run(
        [sys.executable, typed, "--train-limit", "20", "--test-limit", "2"],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr
    argv = shlex.split(proc.stdout.rstrip().splitlines()[-1])
    assert argv[:2] == ["python", typed]  # pastes back from the same folder
    assert oft.parse_config(argv[2:]).run


def last_line(result) -> str:
    return result.stdout.rstrip().splitlines()[-1]


def test_too_few_to_train_ends_the_dry_run_with_what_to_change(run_script, tmp_path):
    write_data(tmp_path / "mine.jsonl", 8, 3)  # the user's 11-line file: 8 to train, 3 to test
    result = run_script(SCRIPT, "--data", "mine.jsonl")
    assert result.returncode == 0, result.output[-3000:]  # a dry run; the real run refuses
    assert [int(n) for n in re.findall(r"Stage (\d)/6", result.stdout)] == [1, 2, 3, 4, 5, 6]
    assert "A real run would be refused: change the data first." in result.stdout
    assert "To run it for real" not in result.stdout and f"python {SCRIPT}" not in result.output
    assert last_line(result) == (
        "mine.jsonl: 8 train examples, and the fine-tuning API refuses fewer than 10: add "
        '2 or more train examples to mine.jsonl, or mark 2 of its 3 test examples "split": '
        '"train" (50+ are recommended)'
    )

    in_file = sum(json.loads(line)["split"] == "train" for line in DATA_FILE.open())
    limited = run_script(SCRIPT, "--train-limit", "5")
    assert limited.returncode == 0, limited.output[-3000:]
    assert last_line(limited).endswith(
        f"5 train examples, and the fine-tuning API refuses fewer than 10: drop --train-limit 5 "
        f"(the file has {in_file} train examples) or raise it to 10 or more (50+ are recommended)"
    )

    # no job is created for a model trained already: nothing to refuse
    answering = run_script(SCRIPT, "--data", "mine.jsonl", "--tuned-model", "ft:x")
    assert answering.returncode == 0, answering.output[-3000:]
    assert "To run it for real" in answering.stdout


# ---------------------------------------------------------------------------- hyperparameters
def test_batch_size_and_learning_rate_multiplier_go_in_the_method_as_the_api_takes_them(
    api, real_run, run_script
):
    fake = api()
    flags = ("--batch-size", "4", "--learning-rate-multiplier", "0.5", "--epochs", "2")
    result = real_run(fake, *flags)
    assert result.returncode == 0, result.output[-3000:]
    expected = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 0.5}
    body = json.loads(creates(fake)[0]["body"])
    assert body["method"] == {"type": "supervised", "supervised": {"hyperparameters": expected}}
    assert "hyperparameters" not in body  # the deprecated top-level form is not used
    assert only_job(fake)["hyperparameters"] == expected  # what the service took

    dry = run_script(SCRIPT, *flags, env={"COLUMNS": "200"})  # the dry run shows that request
    assert dry.returncode == 0, dry.output[-3000:]
    shown = dry.stdout.split("(sent once, never retried)\n", 1)[1]
    request = json.loads(shown[: shown.index("\n}\n") + 2])
    assert request["method"]["supervised"]["hyperparameters"] == expected
    assert re.search(r"batch size\s*│ 4 \(from --batch-size\)", dry.stdout)
    assert re.search(r"learning rate multiplier\s*│ 0.5 \(from --learning-rate-", dry.stdout)


def test_the_method_and_hyperparameters_are_those_of_openais_api_spec(oft):
    """The openai SDK's request types are generated from OpenAI's OpenAPI spec: the job-create
    body's method, and its supervised hyperparameters by name and type, are checked against them."""
    from typing import Literal, get_args, get_origin, get_type_hints

    from openai.types.fine_tuning import SupervisedHyperparametersParam, job_create_params

    cfg = oft.parse_config(
        ["--epochs", "2", "--batch-size", "4", "--learning-rate-multiplier", "0.5"]
    )
    method = {
        "type": "supervised",
        "supervised": {"hyperparameters": oft.job_hyperparameters(cfg, 2)},
    }
    method_spec = get_type_hints(job_create_params.Method)
    assert set(method) <= set(method_spec) and "supervised" in get_args(method_spec["type"])
    sent = method["supervised"]["hyperparameters"]
    spec = get_type_hints(SupervisedHyperparametersParam)
    assert set(sent) == set(spec)  # all three, by the spec's names
    for name, value in sent.items():
        kinds = [kind for kind in get_args(spec[name]) if get_origin(kind) is not Literal]
        assert isinstance(value, tuple(kinds)), (name, value, spec[name])


def test_without_the_flags_the_service_picks_and_nebius_takes_no_multiplier(oft, capsys):
    assert oft.job_hyperparameters(oft.parse_config([]), 3) == {}  # "auto", by leaving them out
    nebius = oft.parse_config(["--provider", "nebius", "--batch-size", "8"])
    assert oft.job_hyperparameters(nebius, 3) == {"n_epochs": 3, "batch_size": 8, "lora": True}
    assert oft.run_cli(oft.main, ["--provider", "nebius", "--learning-rate-multiplier", "2"]) == 2
    assert capsys.readouterr().err.startswith(
        "error: --learning-rate-multiplier: Nebius takes an absolute learning rate, not OpenAI's "
        "multiplier"
    )


def test_the_fake_refuses_hyperparameters_the_service_would(api):
    import openai

    client = sdk(api())
    training_file = upload(client, [GOOD] * 10).id
    for wrong in ({"batch_size": 0}, {"learning_rate_multiplier": "high"}, {"lr": 0.1}):
        method = {"type": "supervised", "supervised": {"hyperparameters": wrong}}
        with pytest.raises(openai.BadRequestError, match="hyperparameter|Invalid"):
            client.fine_tuning.jobs.create(model=BASE, training_file=training_file, method=method)
    nebius = sdk(api("nebius"))
    method = {
        "type": "supervised",
        "supervised": {"hyperparameters": {"learning_rate_multiplier": 2}},
    }
    with pytest.raises(openai.BadRequestError, match="Unknown hyperparameter"):
        nebius.fine_tuning.jobs.create(
            model="meta-llama/Meta-Llama-3.1-8B-Instruct",
            training_file=upload(nebius, [GOOD] * 10).id,
            method=method,
        )


def test_lost_contact_while_watching_says_how_to_resume_with_a_command_that_pastes(
    api, real_run, oft
):
    fake = api()
    fake.hold_at_running = True
    fake.rate_limit_polls = 100  # every poll is refused, past the SDK's retries
    result = real_run(fake)
    assert result.returncode == 1, result.output[-3000:]
    line = error_line(result)
    assert line.startswith("error: lost contact while watching") and "Resume with: " in line
    (resume,) = pasted(oft, line)
    assert resume.job_id == only_job(fake)["id"] and resume.run


# ---------------------------------------------------------------------------- the guard
@pytest.mark.parametrize(
    "args, env, message",
    [
        (("--run", "--yes", "--max-cost", "0.0001"), {"OPENAI_API_KEY": KEY}, "above --max-cost"),
        (("--run",), {"OPENAI_API_KEY": KEY}, "no terminal to confirm on; pass --yes"),
        (("--run", "--yes"), {}, "OPENAI_API_KEY is not set"),
        (
            ("--run", "--yes", "--ask", "Why?", "--tuned-model", "ft:x", "--max-cost", "0.0001"),
            {"OPENAI_API_KEY": KEY},
            "Answering your question twice is estimated at $0.0",
        ),
        (("--epochs", "0"), {}, "--epochs: must be at least 1"),
        (
            ("--run", "--yes", "--train-limit", "5"),
            {"OPENAI_API_KEY": KEY},
            "the fine-tuning API refuses fewer than 10: drop --train-limit 5",
        ),
    ],
    ids=["over max-cost", "no terminal", "no key", "ask over max-cost", "zero epochs", "too few"],
)
def test_a_paid_step_is_refused_before_anything_is_sent(api, run_script, args, env, message):
    fake = api()
    result = run_script(SCRIPT, "--base-url", fake.base_url, *args, env=env)
    assert result.returncode == 2
    assert message in result.stderr
    assert fake.requests == []


def test_dry_run_sends_nothing_even_with_a_key_and_a_server(api, run_script):
    fake = api()
    result = run_script(SCRIPT, env={"OPENAI_API_KEY": KEY, "OPENAI_BASE_URL": fake.base_url})
    assert result.returncode == 0, result.output[-3000:]
    assert fake.requests == []  # not even to loopback; the network guard covers the rest
    assert "nothing was sent" in result.stdout and KEY not in result.output
    assert "A real run needs OPENAI_API_KEY" not in result.stdout  # it is set
    assert "as of 2026-11-25; check https://developers.openai.com/api/docs/pricing" in result.stdout
    assert "POST " + fake.base_url + "fine_tuning/jobs" in result.stdout  # shows the request
    assert (result.cwd / "openai_edu_qa_training.jsonl").is_file()


def test_trying_other_data_or_limits_leaves_the_kept_training_file_alone(run_script, tmp_path):
    kept = tmp_path / "openai_edu_qa_training.jsonl"
    kept.write_text("the repository's copy\n")
    mine = tmp_path / "mine.jsonl"
    rows = [{"question": f"What is {n} + {n}?", "answer": f"It is {2 * n}."} for n in range(40)]
    mine.write_text("".join(json.dumps(row) + "\n" for row in rows))
    written = tmp_path / "outputs" / "openai" / "openai_edu_qa_training.jsonl"
    for args in (("--train-limit", "20"), ("--data", str(mine)), ("--seed", "7")):
        result = run_script(SCRIPT, *args)
        assert result.returncode == 0, result.output[-3000:]
        assert kept.read_text() == "the repository's copy\n", args
        n = len(written.read_text().splitlines())
        assert f"wrote {written.relative_to(tmp_path)} ({n} conversations" in result.stdout
        if args[0] == "--train-limit":
            assert n == 20 - 2  # 10% of the 20 held out for validation
    # the repository's own data with the default settings is what the kept file holds
    result = run_script(SCRIPT)
    assert result.returncode == 0, result.output[-3000:]
    assert kept.read_text() != "the repository's copy\n"


def test_valid_fraction_sets_how_much_of_train_is_held_out_for_validation(run_script, tmp_path):
    folder = tmp_path / "outputs" / "openai"
    sizes = {}
    for fraction in ("0.1", "0.3"):
        result = run_script(SCRIPT, "--train-limit", "20", "--valid-fraction", fraction)
        assert result.returncode == 0, result.output[-3000:]
        sizes[fraction] = tuple(
            len((folder / name).read_text().splitlines())
            for name in ("openai_edu_qa_training.jsonl", "openai_edu_qa_validation.jsonl")
        )
    assert sizes == {"0.1": (18, 2), "0.3": (14, 6)}
    for wrong in ("1", "-0.1", "nan"):
        result = run_script(SCRIPT, "--valid-fraction", wrong)
        assert result.returncode == 2, result.output[-3000:]
        assert result.stderr.startswith("error: --valid-fraction: must be"), result.stderr
        assert result.stderr.count("\n") == 1  # one line, no traceback


def test_dry_run_counts_tokens_offline_with_litellms_copy(run_script, monkeypatch, tmp_path):
    monkeypatch.delenv("TIKTOKEN_CACHE_DIR", raising=False)
    empty = tmp_path / "no-cache"
    empty.mkdir()
    monkeypatch.setenv("DATA_GYM_CACHE_DIR", str(empty))  # tiktoken's own cache: empty
    result = run_script(SCRIPT)
    assert result.returncode == 0, result.output[-3000:]
    assert "tokens counted with o200k_base from the copy litellm ships" in result.stdout


def test_without_any_local_encoding_tokens_are_a_labelled_estimate(run_script, tmp_path):
    empty = tmp_path / "no-cache"
    empty.mkdir()
    result = run_script(SCRIPT, env={"TIKTOKEN_CACHE_DIR": str(empty)})
    assert result.returncode == 0, result.output[-3000:]
    assert "APPROXIMATE (~4 characters per token)" in result.stdout
    assert list(empty.iterdir()) == []  # nothing was downloaded into it


def test_counting_tokens_does_not_import_litellm(tmp_path):
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('m', {str(REPO / SCRIPT)!r})\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['m'] = m\n"
        "spec.loader.exec_module(m)\n"
        "count, label = m.load_token_counter('gpt-4o-mini-2024-07-18')\n"
        "print(count('hello world'), 'litellm' in sys.modules, label)\n"
    )
    env = child_env()
    env.pop("TIKTOKEN_CACHE_DIR", None)
    env["DATA_GYM_CACHE_DIR"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("2 False o200k_base from the copy litellm ships"), proc.stdout


# ---------------------------------------------------------------------------- other providers
def test_azure_v1_shape_prints_the_deploy_command_then_answers_with_the_deployment(
    api, real_run, oft
):
    fake = api("azure")
    fake.deploy("gpt-4o-mini", BASE)  # the base model, deployed under a name of the user's
    base = ("--base-deployment", "gpt-4o-mini")
    first = real_run(fake, *base)
    assert first.returncode == 0, first.output[-3000:]
    assert all(r["path"].startswith("/openai/v1/") for r in fake.requests)
    # With the v1 API the OpenAI client sends the Azure key as a bearer token.
    assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in fake.requests)
    create = json.loads(creates(fake)[0]["body"])
    assert create["trainingType"] == "developerTier" and "." not in create["suffix"]
    assert create["model"] == BASE  # a job trains a model, not a deployment
    job = only_job(fake)
    deploy = next(line for line in first.stdout.splitlines() if "az cognitiveservices" in line)
    assert f"--model-name {job['fine_tuned_model']}" in deploy
    assert "--name 127 " in deploy and "--sku-name DeveloperTier" in deploy
    assert chat_models(fake) == []  # nothing can answer before the deployment exists
    answer_with = pasted(oft, first.stdout, at_least=2)[-1]  # after the cancel command
    assert (answer_with.job_id, answer_with.tuned_model) == (job["id"], "edu-qa-ft")
    assert not (first.cwd / "outputs" / "results").exists()

    fake.deploy("edu-qa-ft", job["fine_tuned_model"])  # what the printed az command does
    second = real_run(fake, "--job-id", job["id"], "--tuned-model", "edu-qa-ft", *base)
    assert second.returncode == 0, second.output[-3000:]
    assert set(chat_models(fake)) == {"gpt-4o-mini", "edu-qa-ft"}
    assert results(second)["tuned_model"] == "edu-qa-ft"
    assert len(creates(fake)) == 1

    asked = real_run(fake, "--ask", "Why is the sky blue?", *base)  # the recorded deployment
    assert asked.returncode == 0, asked.output[-3000:]
    assert chat_models(fake)[-2:] == ["gpt-4o-mini", "edu-qa-ft"]


def test_azure_without_a_deployment_of_that_name_says_which_and_how_in_one_line(api, real_run):
    fake = api("azure")
    fake.deploy("edu-qa-ft", f"{BASE}.ft-abc123")
    # the base model's snapshot name is no deployment name: a real resource answers 404
    result = real_run(fake, "--tuned-model", "edu-qa-ft")
    assert result.returncode == 2, result.output[-3000:]
    line = error_line(result)
    assert f"no deployment named {BASE}" in line and "--base-deployment" in line, line
    assert chat_models(fake) == [BASE] and not creates(fake)  # refused once, not retried


def test_a_refused_key_is_one_line_exit_2_and_never_shown(api, run_script):
    fake = api()
    wrong = "sk-wrong-" + "b2e8d1" * 6
    result = run_script(
        SCRIPT, "--run", "--yes", "--base-url", fake.base_url, *FAST,
        env={"OPENAI_API_KEY": wrong}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "the API key was refused (HTTP 401" in lines[0], result.stderr
    assert "Traceback" not in result.output
    assert "sk-" not in result.output and wrong[-4:] not in result.output
    # refused at the first request, before anything was uploaded or created
    assert not fake.calls("POST", "/files") and not creates(fake)


def test_azure_fake_takes_the_key_in_the_api_key_header_too(api):
    import httpx2

    fake = api("azure")
    ok = httpx2.get(fake.base_url + "fine_tuning/jobs", headers={"api-key": KEY})
    wrong = httpx2.get(fake.base_url + "fine_tuning/jobs", headers={"api-key": "sk-wrong"})
    assert (ok.status_code, wrong.status_code) == (200, 401)


def test_nebius_shape_trains_lora_and_deploys_through_v0_models(api, real_run):
    fake = api("nebius")
    fake.deploy_seconds = 0.2  # a deployment is not servable at once
    result = real_run(fake)
    assert result.returncode == 0, result.output[-3000:]
    assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in fake.requests)
    create = json.loads(creates(fake)[0]["body"])
    assert create["model"] == "meta-llama/Meta-Llama-3.1-8B-Instruct"
    assert create["method"]["supervised"]["hyperparameters"] == {"n_epochs": 3, "lora": True}
    job = only_job(fake)
    (deploy,) = fake.calls("POST", "/v0/models")
    body = json.loads(deploy["body"])
    newest = fake.checkpoints(job["id"])[0]["id"]
    assert body["source"] == f"{job['id']}:{newest}"
    assert body["base_model"] == "meta-llama/Meta-Llama-3.1-8B-Instruct-fast"
    (served,) = (m["name"] for m in fake.models.values())
    assert f"model {served}: validating" in result.stdout
    assert f"model {served}: active" in result.stdout
    assert chat_models(fake)[1::2] == [served] * 3
    out = results(result)
    assert out["tuned_model"] == served and out["cost_usd"] is None  # no known price: not faked


def test_a_nebius_deploy_that_fails_says_why_in_one_line(api, real_run):
    fake = api("nebius")
    fake.deploy_fails = "the adapter's rank is not supported by this base model"
    result = real_run(fake)
    assert result.returncode == 1, result.output[-3000:]
    line = error_line(result)
    assert "could not deploy" in line and fake.deploy_fails in line, line
    assert not (result.cwd / "outputs" / "results").exists()


def test_a_slow_nebius_deploy_times_out_and_a_rerun_waits_for_the_same_one(api, real_run):
    fake = api("nebius")
    fake.deploy_never_ready = True
    slow = real_run(fake, "--deploy-timeout", "0.5")
    assert slow.returncode == 1, slow.output[-3000:]
    line = error_line(slow)
    assert "still validating" in line and "run the same command again" in line, line
    fake.deploy_never_ready = False
    again = real_run(fake, "--deploy-timeout", "0.5")
    assert again.returncode == 0, again.output[-3000:]
    assert len(fake.calls("POST", "/v0/models")) == 1  # waited for it, did not deploy twice
    (served,) = (m["name"] for m in fake.models.values())
    assert results(again)["tuned_model"] == served
    assert len(creates(fake)) == 1


# ---------------------------------------------------------------------------- the validator
SYSTEM, USER, ASSISTANT = "You are a teacher.", "What is 2+2?", "4"
GOOD = json.dumps(
    {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": USER},
            {"role": "assistant", "content": ASSISTANT},
        ]
    }
)
BAD_LINES = {
    "invalid_json": '{"messages": [',
    "data_type": '["not", "an", "object"]',
    "missing_messages_list": '{"messages": []}',
    "message_missing_key": (
        '{"messages": [{"role": "user"}, {"role": "assistant", "content": "4"}]}'
    ),
    "message_unrecognized_key": (
        '{"messages": [{"role": "user", "content": "Hi", "mood": "happy"}, '
        '{"role": "assistant", "content": "4"}]}'
    ),
    "unrecognized_role": (
        '{"messages": [{"role": "teacher", "content": "Hi"}, '
        '{"role": "assistant", "content": "4"}]}'
    ),
    "role_not_text": (
        '{"messages": [{"role": ["user"], "content": "Hi"}, {"role": "assistant", "content": "4"}]}'
    ),
    "missing_content": (
        '{"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "4"}]}'
    ),
    "example_missing_assistant_message": '{"messages": [{"role": "user", "content": "Hi"}]}',
    "invalid_weight": (
        '{"messages": [{"role": "user", "content": "Hi"}, '
        '{"role": "assistant", "content": "4", "weight": 0.5}]}'
    ),
}


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.mark.parametrize("kind", list(BAD_LINES))
def test_validator_reports_each_error_kind_with_its_line(oft, count_tokens, tmp_path, kind):
    path = write_lines(tmp_path / "chat.jsonl", [GOOD] * 3 + [BAD_LINES[kind]] + [GOOD] * 7)
    report = oft.validate_chat_file(path, count_tokens, 65536)
    kind = kind.replace("role_not_text", "unrecognized_role")
    assert report["errors"] == {kind: 1}
    line, _ = report["first_error"][kind]
    assert line == 4
    assert oft.first_format_error(report, path).startswith("chat.jsonl:4: ")


def test_validator_needs_ten_examples(oft, count_tokens, tmp_path):
    report = oft.validate_chat_file(
        write_lines(tmp_path / "c.jsonl", [GOOD] * 9), count_tokens, 65536
    )
    assert report["errors"] == {"too_few_examples": 1}
    report = oft.validate_chat_file(
        write_lines(tmp_path / "c.jsonl", [GOOD] * 10), count_tokens, 65536
    )
    assert report["errors"] == {}


def test_validator_accepts_weights_special_text_and_warns_on_missing_roles(
    oft, count_tokens, tmp_path
):
    weighted = {
        "messages": [
            {"role": "user", "content": "Say <|endoftext|> please"},  # text, not a special token
            {"role": "assistant", "content": "No.", "weight": 0},
            {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "4", "weight": 1},
        ]
    }
    path = write_lines(tmp_path / "c.jsonl", [json.dumps(weighted)] + [GOOD] * 9)
    report = oft.validate_chat_file(path, count_tokens, 65536)
    assert report["errors"] == {}
    assert report["warnings"] == {"missing_system_message": 1}
    assert report["assistant_tokens"]["min"] == 1  # weight 0 is not trained: only "4"


def test_token_count_equals_a_hand_count(oft, count_tokens, tmp_path):
    import tiktoken

    encoding = tiktoken.get_encoding("o200k_base")
    by_hand = {
        SYSTEM: ["You", " are", " a", " teacher", "."],
        USER: ["What", " is", " ", "2", "+", "2", "?"],
        ASSISTANT: ["4"],
    }
    for text, pieces in by_hand.items():
        assert [encoding.decode([t]) for t in encoding.encode(text)] == pieces
    # 3 priming tokens; per message 3 format tokens + 1 for the role name + the content.
    expected = 3 + 3 * (3 + 1) + (5 + 7 + 1)
    report = oft.validate_chat_file(
        write_lines(tmp_path / "c.jsonl", [GOOD] * 10), count_tokens, 65536
    )
    assert report["total_tokens"]["min"] == report["total_tokens"]["max"] == expected
    assert report["assistant_tokens"]["max"] == 1
    assert report["billed_tokens_per_epoch"] == 10 * expected


def test_examples_over_the_limit_are_counted_and_billed_at_the_limit(oft, count_tokens, tmp_path):
    report = oft.validate_chat_file(
        write_lines(tmp_path / "c.jsonl", [GOOD] * 10), count_tokens, 20
    )
    assert report["too_long"] == 10 and report["billed_tokens_per_epoch"] == 10 * 20


@pytest.mark.parametrize(
    "n, epochs",
    [(3, 25), (10, 10), (20, 5), (33, 3), (130, 3), (8333, 3), (8334, 2), (9000, 2), (30000, 1)],
)
def test_default_epochs_follow_openais_rule(oft, n, epochs):
    assert oft.default_epochs(n) == epochs


def test_cost_estimate_for_a_known_file(oft, count_tokens, tmp_path):
    report = oft.validate_chat_file(
        write_lines(tmp_path / "c.jsonl", [GOOD] * 20), count_tokens, 65536
    )
    epochs = oft.default_epochs(20)  # 20 x 3 < 100, so min(25, 100 // 20) = 5
    billed = epochs * report["billed_tokens_per_epoch"]
    assert (epochs, billed) == (5, 5 * 20 * 28)
    costs = oft.estimate_costs("openai", BASE, billed, prompt_tokens=1000, reply_tokens=500)
    assert costs["training"] == pytest.approx(2800 * 3.00 / 1e6)
    # base 0.15 in / 0.60 out, tuned 0.30 in / 1.20 out, per million tokens
    assert costs["answering"] == pytest.approx((1000 * 0.45 + 500 * 1.80) / 1e6)
    assert costs["total"] == pytest.approx(0.0084 + 0.00135)
    assert oft.estimate_costs("nebius", "meta-llama/x", billed, 1000, 500)["total"] is None


@pytest.mark.parametrize(
    "model, expected",
    [
        ("ft:gpt-4.1-mini-2025-04-14:my-org:edu-qa:abc123", ("o200k_base", True)),
        ("ft:gpt-4o-mini-2024-07-18:my-org::abc123", ("o200k_base", True)),
        ("gpt-4.1-2025-04-14", ("o200k_base", True)),
        ("gpt-3.5-turbo", ("cl100k_base", True)),
        ("meta-llama/Meta-Llama-3.1-8B-Instruct", ("o200k_base", False)),
    ],
)
def test_fine_tuned_names_are_counted_with_their_base_models_encoding(oft, model, expected):
    assert oft.encoding_name(model) == expected


@pytest.mark.parametrize(
    "content, message",
    [
        (
            "".join(line + "\n" for line in [GOOD] * 5 + [BAD_LINES["unrecognized_role"]]),
            "error: mine.jsonl:6: message 1 has role 'teacher'",
        ),
        ("caf\xe9\n".encode("latin-1"), "error: mine.jsonl:1: not UTF-8 text (byte 0xe9"),
    ],
    ids=["bad role", "not utf-8"],
)
def test_check_file_names_the_file_and_line_and_exits_2(run_script, tmp_path, content, message):
    path = tmp_path / "mine.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    result = run_script(SCRIPT, "--check-file", "mine.jsonl")
    assert result.returncode == 2
    assert result.stderr.startswith(message), result.stderr
    assert result.stderr.count("\n") == 1  # one line, no traceback


def test_check_file_accepts_a_valid_file_and_prints_its_report(run_script, tmp_path):
    write_lines(tmp_path / "mine.jsonl", [GOOD] * 10)
    result = run_script(SCRIPT, "--check-file", "mine.jsonl")
    assert result.returncode == 0, result.output
    assert result.stderr == ""
    report = json.loads(result.stdout.split("tokens counted with")[0])
    assert report["examples"] == 10 and report["errors"] == {}
    assert report["billed_tokens_per_epoch"] == 10 * 28  # the hand count above, per example
    assert "tokens counted with o200k_base" in result.stdout
