"""dspy_example.py, run the way a user runs it.

The real runs use the real dspy.LM, over LiteLLM, over real HTTP, against a small
OpenAI-compatible server on 127.0.0.1 (tests/fake_dspy_server.py) that answers in the format DSPy
asks for and counts what it receives. Its answers depend on the question only, never on the
demos, so these tests prove the plumbing (what is sent, counted, scored and saved), not that
tuning helps: that needs a real model. Nothing leaves the machine: the network guard in
conftest.py fails any test whose process, or child, reaches past loopback. DummyLM appears only in
the unit tests of small pieces at the end.
"""

from __future__ import annotations

import importlib.util
import json
import re
import signal
import time

import pytest
from conftest import load_script, run_script_in, start_script_in
from fake_dspy_server import answer_for, demos_in, question_of, reasoning_for

SCRIPT = "dspy_example.py"
# A model LiteLLM has a price for, served by the fake server: costs are computed, nothing is paid.
PRICED = "openai/gpt-4o-mini"


def results_of(result) -> dict:
    return results_of_dir(result, "outputs")


def results_of_dir(result, output_dir: str) -> dict:
    return json.loads((result.cwd / output_dir / "results" / "dspy.json").read_text())


def program_of(result) -> dict:
    return json.loads((result.cwd / "outputs" / "dspy" / "program.json").read_text())


def sent(results: dict) -> int:
    return sum(phase["sent"] for phase in results["lm_calls"].values())


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def held_out(result, limit: int) -> list[dict]:
    rows = [json.loads(line) for line in (result.cwd / "small_edu_qa.jsonl").open()]
    return [row for row in rows if row["split"] == "test"][:limit]


def one_error_line(result) -> str:
    assert "Traceback" not in result.output, result.output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(scope="module")
def script():
    """The script imported as a module, for its metric, estimates and small pieces."""
    return load_script(SCRIPT)


# ----------------------------------------------------------------------------- dry run


def test_dry_run_sends_nothing_and_prints_the_prompt_and_the_estimate(run_script, tmp_path):
    home = tmp_path / "home"
    result = run_script(SCRIPT, "--test-limit", "30", env={"HOME": str(home)})
    assert result.returncode == 0, result.output[-3000:]
    out = result.stdout
    # the exact ChatAdapter prompt for a test question, and the calls a real run would make
    assert "[[ ## question ## ]]\nWhat causes the seasons on Earth?" in out
    assert "Respond with the corresponding output fields" in out
    total = re.search(r"│ total\s+│\s+│\s+(\d+) │", out)
    assert total and int(total.group(1)) == 120, "30 plain, 30 baseline, <= 30 compile, 30 tuned"
    assert re.search(r"│ total .*│\s+0\.\d{4} │", out), "a dollar estimate for gpt-4o-mini"
    assert "OPENAI_API_KEY is not set" in out
    assert "python dspy_example.py --test-limit 30 --run" in out
    # nothing written but the data file it was given: no results, no cache, no ~/.dspy_cache
    assert not (result.cwd / "outputs").exists()
    assert not (home / ".dspy_cache").exists()
    # the network guard (autouse) fails this test if the child process tried to connect anywhere


def test_dry_run_of_a_local_llama_server_fetches_no_tokenizer(run_script):
    # LiteLLM would download a Llama tokenizer from Hugging Face to count these prompts' tokens
    model = "hosted_vllm/meta-llama/Llama-3.1-8B-Instruct"
    result = run_script(SCRIPT, "--model", model, "--api-base", "http://localhost:8000/v1")
    assert result.returncode == 0, result.output[-3000:]
    assert "none needed (local server)" in result.stdout
    assert re.search(r"│ total .*│\s+\? │", result.stdout), "no price for a model on your server"
    # the network guard (autouse) fails this test if the child process tried to connect anywhere


def test_help_shows_a_dry_run_a_real_run_and_an_offline_run(run_script):
    result = run_script(SCRIPT, "--help")
    assert result.returncode == 0
    for text in ("dry run", "--run", "ollama_chat/llama3.2", "--api-base", "--optimizer"):
        assert text in result.stdout


def test_each_setting_is_written_once_and_help_shows_its_flag_help_and_default(script, run_script):
    """Config is the one place of a setting: its field's default and help reach --help as they
    are, and the command line's defaults are Config()'s."""
    import dataclasses

    fields = [spec for spec in dataclasses.fields(script.Config) if spec.init]
    assert [spec.name for spec in fields if "help" not in spec.metadata] == ["argv"]
    result = run_script(SCRIPT, "--help", env={"COLUMNS": "3000"})  # no line wrapping
    assert result.returncode == 0
    options = re.split(r"\n(?=  -)", result.stdout.split("\n\nexamples:")[0])
    helps = {option.split()[0]: flat(option) for option in options if option.startswith("  -")}
    for spec in (spec for spec in fields if "help" in spec.metadata):
        flag, meta = "--" + spec.name.replace("_", "-"), spec.metadata
        assert flag in helps, f"--help lacks {flag}"
        shown = spec.default if meta["shown"] is None else meta["shown"]
        expected = flat(meta["help"]) + ("" if shown in (None, False) else f" (default: {shown})")
        assert helps[flag].endswith(expected), (flag, helps[flag])
    assert script.parse_config([]) == script.Config()


# ----------------------------------------------------------------------------- real runs


def test_real_run_plumbing_demos_reach_the_tuned_prompts_and_scores_come_from_the_answers(
    dspy_run, server, script, monkeypatch
):
    """The fake answers a question the same with or without demos: this checks what is sent,
    saved and scored, not that tuning helps (that needs a real model)."""
    result = dspy_run(
        "--run",
        "--yes",
        "--model",
        PRICED,
        "--train-limit",
        "8",
        "--test-limit",
        "5",
        "--metric-threshold",
        "15",
    )
    assert result.returncode == 0, result.output[-3000:]
    results = results_of(result)
    program = program_of(result)
    demos = program["predict"]["demos"]

    # every request the server saw is accounted for, phase by phase
    assert server.failures == 0
    assert sent(results) == server.count
    calls = results["lm_calls"]
    assert calls["baseline"]["sent"] == calls["tuned"]["sent"] == 5
    assert 1 <= calls["compile"]["sent"] <= 8

    # the optimizer kept the model's own runs that reached the threshold, and labeled pairs
    boot = [demo for demo in demos if demo.get("augmented")]
    assert boot and len(boot) <= 4
    for demo in boot:
        assert demo["reasoning"] == reasoning_for(demo["question"])  # the server's reasoning
    train = [
        json.loads(line)
        for line in (result.cwd / "small_edu_qa.jsonl").open()
        if json.loads(line)["split"] == "train"
    ][:8]
    reference = {row["question"]: row["answer"] for row in train}
    for demo in boot:
        assert script.rouge_l(demo["answer"], reference[demo["question"]]) >= 15

    # baseline prompts hold no demos; every tuned prompt holds the saved demos, in order
    test = held_out(result, 5)
    asked = [r["messages"] for r in server.requests if question_of(r["messages"]) in
             {row["question"] for row in test}]  # fmt: skip
    assert len(asked) == 10
    assert sorted(len(demos_in(m)) for m in asked) == [0] * 5 + [len(demos)] * 5
    saved = sorted(demo["question"] for demo in demos)
    for messages in asked:
        assert sorted(demos_in(messages)) in ([], saved)

    # the results hold what the server answered, scored with the shared metric
    assert results["n_test"] == 5
    for question, row in zip(results["questions"], test, strict=True):
        assert question["question"] == row["question"]
        assert question["baseline"] == question["tuned"] == answer_for(row["question"])
        expected = round(script.rouge_l(answer_for(row["question"]), row["answer"]), 2)
        assert question["baseline_score"] == question["tuned_score"] == expected
    mean = sum(q["baseline_score"] for q in results["questions"]) / 5
    assert results["baseline_score"] == results["tuned_score"] == pytest.approx(mean, abs=0.01)

    # actual cost: the usage the server reported, priced by LiteLLM, nothing from the cache
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no price download here either
    import litellm

    expected = sum(
        sum(litellm.cost_per_token(PRICED, u["prompt_tokens"], u["completion_tokens"]))
        for u in server.usage
    )
    assert results["cost_usd"] == pytest.approx(expected, rel=1e-3, abs=1e-6)
    assert all(phase["cache_hits"] == 0 for phase in calls.values())

    assert (result.cwd / "outputs" / "results" / "comparison.png").exists()
    assert "Stage 6/6" in result.stdout and "demos now in front of every question" in result.stdout
    # DSPy's disk cache lives under the output dir, never in the home directory
    assert (result.cwd / "outputs" / "dspy" / "cache").is_dir()
    assert not (result.cwd / "home" / ".dspy_cache").exists()


def test_the_estimate_is_within_a_stated_factor_of_what_the_server_reports(dspy_run, server):
    """The server counts tokens with the real encoding, so an estimate counting words, or
    missing the demos, or off by 10x, fails here. Prompts are estimated from the exact prompt
    text: within 25%. Replies are estimated from the reference answers' length, and the fake's
    replies are shorter than a real model's: within 3x."""
    args = ("--run", "--yes", "--model", PRICED, "--optimizer", "labeled", "--test-limit", "5")
    result = dspy_run(*args, env={"COLUMNS": "400"})
    assert result.returncode == 0, result.output[-3000:]
    actual = results_of(result)["lm_calls"]
    for phase in ("baseline", "tuned"):
        row = re.search(rf"│ {phase}\s+│[^│]*│\s+(\d+) │\s+(\d+) / (\d+)\s+│", result.stdout)
        assert row, phase
        calls, prompt, reply = map(int, row.groups())
        assert calls == actual[phase]["sent"] == 5
        assert 0.8 <= prompt * calls / actual[phase]["prompt_tokens"] <= 1.25, (phase, row.groups())
        assert 1 / 3 <= reply * calls / actual[phase]["completion_tokens"] <= 3, phase
    results = results_of(result)
    assert 0.5 <= results["estimated_cost_usd"] / results["cost_usd"] <= 2


def test_saved_program_reloads_and_sends_the_same_prompts(dspy_run, server):
    args = ("--run", "--yes", "--optimizer", "labeled", "--train-limit", "6", "--test-limit", "3")
    first = dspy_run(*args)
    assert first.returncode == 0, first.output[-3000:]
    tuned_prompts = sorted(json.dumps(r["messages"]) for r in server.requests[-3:])
    count = server.count

    second = dspy_run(*args, "--load", "outputs/dspy/program.json", "--no-cache")
    assert second.returncode == 0, second.output[-3000:]
    assert "nothing to compile" in second.stdout
    assert server.count == count + 9  # plain model, baseline and tuned again, no compile calls
    assert sorted(json.dumps(r["messages"]) for r in server.requests[-3:]) == tuned_prompts
    assert [q["tuned"] for q in results_of(second)["questions"]] == [
        q["tuned"] for q in results_of(first)["questions"]
    ]


def test_an_identical_run_is_served_from_the_cache_and_no_cache_sends_again(dspy_run, server):
    args = ("--run", "--yes", "--model", PRICED, "--train-limit", "6", "--test-limit", "3")
    first = dspy_run(*args)
    assert first.returncode == 0, first.output[-3000:]
    made = server.count
    assert made == sent(results_of(first)) > 0

    again = dspy_run(*args)
    assert again.returncode == 0, again.output[-3000:]
    assert server.count == made, "the second identical run sent requests"
    cached = results_of(again)
    assert sent(cached) == 0
    assert sum(phase["cache_hits"] for phase in cached["lm_calls"].values()) == made
    assert cached["cost_usd"] == 0
    assert cached["questions"] == results_of(first)["questions"]

    fresh = dspy_run(*args, "--no-cache")
    assert fresh.returncode == 0, fresh.output[-3000:]
    assert server.count == 2 * made


def test_a_server_error_is_retried(dspy_run, server):
    server.fail_next = 1
    result = dspy_run("--run", "--yes", "--optimizer", "labeled", "--test-limit", "2")
    assert result.returncode == 0, result.output[-3000:]
    assert server.failures == 1
    assert server.count == 6 + 1  # 2 plain, 2 baseline, 2 tuned answers, one asked twice
    assert sent(results_of(result)) == 6


def test_a_server_that_keeps_failing_exits_1_saying_what_was_kept(dspy_run, server):
    server.fail_next = 100
    result = dspy_run("--run", "--yes", "--optimizer", "labeled", "--test-limit", "1")
    assert result.returncode == 1, result.output[-3000:]
    line = one_error_line(result)
    assert "failed after 3 retries" in line and "Kept:" in line and "run the same command" in line
    assert server.count == 4  # the first try and 3 retries, then nothing more
    assert not (result.cwd / "outputs" / "results").exists()


def test_an_unknown_model_is_one_line_exit_2_and_not_retried(dspy_run, server):
    server.fail_status, server.fail_next = 404, 100
    result = dspy_run("--run", "--yes", "--optimizer", "labeled", "--test-limit", "1")
    assert result.returncode == 2, result.output[-3000:]
    assert "refused the request" in one_error_line(result)
    assert server.count == 1


def test_a_refused_key_is_one_line_exit_2_not_retried_and_never_shown(dspy_run, server):
    server.api_key = "the-right-key"
    key = "sk-wrong-key-4711"
    result = dspy_run("--run", "--yes", "--optimizer", "labeled", "--test-limit", "1", key=key)
    assert result.returncode == 2
    assert "the key in OPENAI_API_KEY was refused" in one_error_line(result)
    assert server.count == 1
    # the server echoed the key's start and end, as OpenAI does; none of it reaches the output
    assert "sk-" not in result.output and "4711" not in result.output


def test_a_refused_key_under_a_parallel_optimizer_is_exit_2_too(dspy_run, server):
    # random search evaluates in DSPy's parallel executor, which swallows each failed call
    server.api_key = "the-right-key"
    key = "sk-wrong-key-4711"
    args = ("--run", "--yes", "--optimizer", "random-search", "--train-limit", "4")
    result = dspy_run(*args, "--test-limit", "1", key=key)
    assert result.returncode == 2, result.output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "the key in OPENAI_API_KEY was refused" in errors[0]
    assert "Traceback" not in result.output
    assert "sk-" not in result.output and "4711" not in result.output, result.stderr
    assert not (result.cwd / "outputs" / "dspy" / "program.json").exists()


def test_random_search_compiles_within_its_estimate(dspy_run, server, script):
    result = dspy_run(
        "--run",
        "--yes",
        "--optimizer",
        "random-search",
        "--num-candidates",
        "1",
        "--train-limit",
        "4",
        "--test-limit",
        "2",
        "--threads",
        "2",
    )
    assert result.returncode == 0, result.output[-3000:]
    calls = results_of(result)["lm_calls"]
    cfg = script.Config(data=script.DATA_FILE, optimizer="random-search", num_candidates=1)
    planned = script.planned_calls(cfg, 4, 2, compile_needed=True)
    assert 0 < calls["compile"]["sent"] + calls["compile"]["cache_hits"] <= planned["compile"]
    assert sent(results_of(result)) == server.count
    assert (result.cwd / "outputs" / "dspy" / "program.json").is_file()


def test_an_optimizer_stopped_by_failing_calls_exits_1(dspy_run, server):
    server.fail_next = 1000
    args = ("--run", "--yes", "--optimizer", "random-search", "--train-limit", "4")
    result = dspy_run(*args, "--test-limit", "1")
    assert result.returncode == 1, result.output[-3000:]
    # DSPy logs each failed call; the script's own verdict is one line among them
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "optimizer stopped after 3 failed calls" in errors[0]
    assert "(the first: " in errors[0]  # why, not only that: here the server's HTTP 500
    assert "Traceback" not in result.output
    # each failed call DSPy logs is one short line, not the example and the provider's text
    logged = [line for line in result.stderr.splitlines() if "a call failed: " in line]
    assert logged and not any("Example(" in line for line in result.stderr.splitlines())
    assert not (result.cwd / "outputs" / "dspy" / "program.json").exists()


def test_answers_are_sent_in_parallel_threads(dspy_run, server):
    server.delay = 0.2
    args = ("--run", "--yes", "--optimizer", "labeled", "--test-limit", "4")
    result = dspy_run(*args, "--threads", "2")
    assert result.returncode == 0, result.output[-3000:]
    assert server.max_in_flight == 2

    server.max_in_flight = 0
    result = dspy_run(*args, "--threads", "1", "--no-cache")
    assert result.returncode == 0, result.output[-3000:]
    assert server.max_in_flight == 1
    # each phase's time, where a slow model's time goes: 4 replies of 0.2 s one at a time
    calls = results_of(result)["lm_calls"]
    for phase in ("plain", "baseline", "tuned"):
        assert 0.8 <= calls[phase]["seconds"] < 30, calls
        assert f"{phase}: 4 " in result.stdout
    took = re.search(r"baseline: 4 of 4 replies read in (\d+) s", result.stdout)
    assert took and int(took.group(1)) == round(calls["baseline"]["seconds"])


def test_ctrl_c_exits_130_and_the_same_command_resumes_from_the_cache(server, tmp_path):
    import signal
    import time

    server.delay = 0.3
    args = ["--api-base", server.url, "--run", "--yes"]
    args += ["--optimizer", "labeled", "--test-limit", "12", "--threads", "2"]
    env = {"OPENAI_API_KEY": "test", "HOME": str(tmp_path / "home")}
    proc = start_script_in(tmp_path, SCRIPT, *args, env=env)
    deadline = time.monotonic() + 60
    while server.count < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-2000:]
    assert "run the same command to resume" in stderr
    assert "every answered call, in outputs/dspy/cache" in stderr
    assert not (tmp_path / "outputs" / "results").exists()
    interrupted = server.count
    assert 4 <= interrupted < 36

    rerun = run_script_in(tmp_path, SCRIPT, *args, env=env)
    assert rerun.returncode == 0, rerun.output[-4000:]
    # every call answered before Ctrl-C came from the cache; sent again: only the calls the
    # signal cut short (one a thread at most: the run waits for no reply in flight)
    calls = json.loads((tmp_path / "outputs" / "results" / "dspy.json").read_text())["lm_calls"]
    hits = sum(phase["cache_hits"] for phase in calls.values())
    assert interrupted - 2 <= hits <= interrupted
    assert server.count == interrupted + (36 - hits)  # plain, baseline, tuned: 12 each


# A server that writes one reply at a time, each in REPLY_SECONDS, as `transformers serve` does
# with a small model on a CPU. When the signal comes, THREADS - 1 calls still wait for theirs:
# 15 s and more, which a stopped run used to wait for. It now ends in about 1.5 s (2 busy cores).
REPLY_SECONDS, THREADS = 5.0, 4
PROMPTLY = 8.0  # seconds from the signal to the exit, with room for a busy machine


def stop_a_slow_run(server, tmp_path, signum, *args: str, answered: int = 1):
    """Run against the slow server; once it has answered `answered` calls and has more in
    flight, send `signum`. Returns the process, its stderr and the seconds it took to end."""
    server.delay, server.one_at_a_time = REPLY_SECONDS, True
    env = {"OPENAI_API_KEY": "test", "HOME": str(tmp_path / "home")}
    proc = start_script_in(tmp_path, SCRIPT, "--api-base", server.url, *args, env=env)
    deadline = time.monotonic() + 120
    while len(server.usage) < answered or server.count <= answered:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.05)
    time.sleep(1)  # the reply reaches the cache
    signalled = time.monotonic()
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=120)
    return proc, stderr, time.monotonic() - signalled


def resume_line(stderr: str) -> str:
    """The one message an interrupted run prints, after any progress bar."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if "interrupted:" in line]
    assert len(lines) == 1 and stderr.rstrip().endswith(lines[0]), stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize(
    "signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"]
)
def test_stopping_stage_5_waits_for_no_reply_and_the_same_command_resumes(
    server, tmp_path, signum, code
):
    args = ["--run", "--yes", "--optimizer", "labeled", "--test-limit", "4"]
    args += ["--threads", str(THREADS)]
    proc, stderr, seconds = stop_a_slow_run(server, tmp_path, signum, *args)
    assert proc.returncode == code, stderr[-3000:]
    assert seconds < PROMPTLY, f"{seconds:.1f} s from the signal to the exit"
    line = resume_line(stderr)
    assert line.startswith("interrupted: kept every answered call, in outputs/dspy/cache")
    assert line.endswith("run the same command to resume")
    assert not (tmp_path / "outputs" / "results").exists()
    if signum == signal.SIGINT:
        return  # the resume after Ctrl-C: test_ctrl_c_exits_130_and_the_same_command_resumes...

    interrupted, server.delay = server.count, 0
    env = {"OPENAI_API_KEY": "test", "HOME": str(tmp_path / "home")}
    rerun = run_script_in(tmp_path, SCRIPT, "--api-base", server.url, *args, env=env)
    assert rerun.returncode == 0, rerun.output[-4000:]
    calls = json.loads((tmp_path / "outputs" / "results" / "dspy.json").read_text())["lm_calls"]
    hits = sum(phase["cache_hits"] for phase in calls.values())
    assert hits >= 1  # what was answered before the signal is not sent again
    assert server.count == interrupted + (12 - hits)  # plain, baseline, tuned: 4 each


@pytest.mark.parametrize("optimizer", ["bootstrap", "random-search"])
def test_sigterm_while_compiling_waits_for_no_reply_and_says_what_was_kept(
    server, tmp_path, optimizer
):
    # BootstrapFewShot calls the LM from the main thread; the random search scores candidate
    # programs in DSPy's own parallel evaluator, THREADS calls at a time.
    args = ["--run", "--yes", "--optimizer", optimizer, "--train-limit", "4", "--test-limit", "2"]
    args += ["--threads", str(THREADS), "--num-candidates", "1"]
    proc, stderr, seconds = stop_a_slow_run(server, tmp_path, signal.SIGTERM, *args)
    assert proc.returncode == 143, stderr[-3000:]
    assert seconds < PROMPTLY, f"{seconds:.1f} s from the signal to the exit"
    assert resume_line(stderr) == (
        "interrupted: kept every answered call, in outputs/dspy/cache; run the same command "
        "to resume"
    )
    assert not (tmp_path / "outputs" / "dspy" / "program.json").exists()


def test_dspy_native_engine_works_too(dspy_run, server):
    result = dspy_run(
        "--run", "--yes", "--engine", "auto", "--optimizer", "labeled", "--test-limit", "2"
    )
    assert result.returncode == 0, result.output[-3000:]
    assert server.count == 6


def test_plain_from_reads_the_plain_answers_from_a_results_file_instead_of_asking(
    dspy_run, server, script
):
    """make compare passes the LoRA row's results: its baseline is the plain model. The run
    sends no plain prompt, and scores the file's answers as the plain model's."""
    first = dspy_run("--run", "--yes", "--optimizer", "labeled", "--test-limit", "3")
    assert first.returncode == 0, first.output[-3000:]
    path = first.cwd / "outputs" / "results" / "dspy.json"
    other = json.loads(path.read_text())
    for question in other["questions"]:  # another model's plain answers, told apart by text
        question["plain"] = "Because of the tilt of the axis. " + question["id"]
    other["plain_model"] |= {"model": "the LoRA row's base model", "cut": 2}
    (first.cwd / "lora.json").write_text(json.dumps(other))
    count = server.count

    result = dspy_run(
        "--run", "--yes", "--optimizer", "labeled", "--test-limit", "3", "--no-cache",
        "--plain-from", "lora.json", "--output-dir", "second",
    )  # fmt: skip
    assert result.returncode == 0, result.output[-3000:]
    asked = [r["messages"] for r in server.requests[count:]]
    assert len(asked) == 6, "baseline and tuned only"
    assert not [m for m in asked if m[0]["content"] == script.SYSTEM_PROMPT]
    results = results_of_dir(result, "second")
    for question, theirs in zip(results["questions"], other["questions"], strict=True):
        assert question["plain"] == theirs["plain"]
        assert question["plain_score"] == round(
            script.rouge_l(theirs["plain"], question["reference"]), 2
        )
    plain = results["plain_model"]
    assert plain["score"] == round(sum(q["plain_score"] for q in results["questions"]) / 3, 2)
    assert plain["cut"] == 2 and plain["model"].startswith("the LoRA row's base model (from ")
    assert results["lm_calls"]["plain"]["sent"] == 0

    # a file without every test question: one line, exit 2, before any call
    count = server.count
    short = dspy_run("--run", "--yes", "--test-limit", "4", "--plain-from", "lora.json")
    assert short.returncode == 2
    assert "no answer to test question" in one_error_line(short)
    not_results = dspy_run("--plain-from", "small_edu_qa.jsonl")
    assert not_results.returncode == 2
    assert "not a results file" in one_error_line(not_results)
    assert server.count == count


def test_ask_answers_one_question_with_the_saved_program(dspy_run, server):
    first = dspy_run("--run", "--yes", "--optimizer", "labeled", "--test-limit", "2")
    assert first.returncode == 0, first.output[-3000:]
    results_before = (first.cwd / "outputs" / "results" / "dspy.json").read_text()
    demos = [demo["question"] for demo in program_of(first)["predict"]["demos"]]
    count = server.count

    question = "Why do we have leap years?"
    result = dspy_run("--run", "--yes", "--ask", question)
    assert result.returncode == 0, result.output[-3000:]
    assert server.count == count + 2
    asked = [r["messages"] for r in server.requests[-2:]]
    assert [question_of(m) for m in asked] == [question, question]
    # zero-shot, then the saved program's demos
    assert sorted(sorted(demos_in(m)) for m in asked) == [[], sorted(demos)]
    # both answers are the server's, shown as the server gave them
    assert f"baseline: {answer_for(question)}" in flat(result.stdout)
    assert f"tuned: {answer_for(question)}" in flat(result.stdout)
    assert (first.cwd / "outputs" / "results" / "dspy.json").read_text() == results_before


def test_a_reply_in_the_wrong_format_costs_one_more_call_through_the_json_fallback(
    dspy_run, server
):
    # the plain model's two replies, then the baseline's first: it ignores the [[ ## ]] format
    server.prose_next = 3
    args = ("--run", "--yes", "--optimizer", "labeled", "--test-limit", "2", "--threads", "1")
    result = dspy_run(*args)
    assert result.returncode == 0, result.output[-3000:]
    assert server.count == 6 + 1
    first, fallback = server.requests[2], server.requests[3]
    assert question_of(fallback["messages"]) == question_of(first["messages"])
    assert "response_format" not in first and fallback["response_format"]  # asked for JSON
    results = results_of(result)
    assert results["lm_calls"]["baseline"]["sent"] == 3  # counted: it was sent, and billed
    for question in results["questions"]:
        assert question["baseline"] == question["tuned"] == answer_for(question["question"])


def test_temperature_and_max_tokens_reach_the_request_and_a_cut_off_reply_scores_zero(
    dspy_run, server
):
    args = ("--run", "--yes", "--optimizer", "labeled", "--test-limit", "2")
    result = dspy_run(*args, "--temperature", "0.7", "--max-tokens", "12")
    assert result.returncode == 0, result.output[-3000:]
    assert server.requests
    for body in server.requests:
        assert body["temperature"] == 0.7
        assert (body.get("max_tokens") or body.get("max_completion_tokens")) == 12
    # 12 tokens end the reply before its answer, in both formats: an empty answer, scored 0
    results = results_of(result)
    assert server.count == 2 + 2 * 2 * 2  # the plain model; each call and its JSON fallback
    for question in results["questions"]:
        assert question["baseline"] == question["tuned"] == ""
        assert question["baseline_score"] == question["tuned_score"] == 0


def test_a_rate_limit_and_a_dropped_connection_are_retried(dspy_run, server):
    server.fail_status, server.fail_next = 429, 1  # a 429 with Retry-After...
    server.drop_next = 1  # ...and a connection closed without an answer
    result = dspy_run("--run", "--yes", "--optimizer", "labeled", "--test-limit", "2")
    assert result.returncode == 0, result.output[-3000:]
    assert server.failures == 2 and server.count == 6 + 2
    assert sent(results_of(result)) == 6  # the failed tries are not answered calls


@pytest.mark.parametrize("engine", ["litellm", "auto"])
def test_a_server_that_reports_no_usage_is_sent_not_cached_and_its_cost_unknown(
    dspy_run, server, engine
):
    server.report_usage = False
    args = ("--run", "--yes", "--model", PRICED, "--optimizer", "labeled", "--test-limit", "2")
    result = dspy_run(*args, "--engine", engine)
    assert result.returncode == 0, result.output[-3000:]
    results = results_of(result)
    assert sent(results) == server.count == 6
    assert all(phase["cache_hits"] == 0 for phase in results["lm_calls"].values())
    assert results["cost_usd"] is None  # a priced model's calls are not free: unknown
    assert "actual cost: unknown" in result.stdout


def test_output_dir_and_cache_dir_hold_what_they_say(dspy_run, server):
    args = ("--run", "--yes", "--optimizer", "labeled", "--test-limit", "2")
    where = ("--output-dir", "elsewhere", "--cache-dir", "my-cache")
    first = dspy_run(*args, *where)
    assert first.returncode == 0, first.output[-3000:]
    made = server.count
    assert made == 6
    assert results_of_dir(first, "elsewhere")["n_test"] == 2
    assert (first.cwd / "elsewhere" / "dspy" / "program.json").is_file()
    assert any(p.is_file() for p in (first.cwd / "my-cache").rglob("*"))
    assert not (first.cwd / "elsewhere" / "dspy" / "cache").exists()
    assert not (first.cwd / "outputs").exists()
    again = dspy_run(*args, *where)
    assert again.returncode == 0, again.output[-3000:]
    assert server.count == made  # served from my-cache
    assert (
        sum(p["cache_hits"] for p in results_of_dir(again, "elsewhere")["lm_calls"].values()) == 6
    )


def test_the_key_is_read_from_dotenv_and_the_environment_wins(dspy_run, server, tmp_path):
    server.api_key = "sk-right-" + "1" * 20
    (tmp_path / ".env").write_text(f"OPENAI_API_KEY={server.api_key}\n")
    args = ("--run", "--yes", "--optimizer", "labeled", "--test-limit", "1")
    from_file = dspy_run(*args, key=None)
    assert from_file.returncode == 0, from_file.output[-3000:]
    assert server.api_key not in from_file.output
    (tmp_path / ".env").write_text("OPENAI_API_KEY=sk-stale-" + "0" * 20 + "\n")
    both = dspy_run(*args, "--no-cache", key=server.api_key)
    assert both.returncode == 0, both.output[-3000:]
    assert server.failures == 0


# ----------------------------------------------------------------------------- the guard


def test_max_cost_below_the_estimate_refuses_before_any_request(dspy_run, server):
    result = dspy_run("--run", "--yes", "--model", PRICED, "--max-cost", "0.000001")
    assert result.returncode == 2
    assert "above --max-cost" in one_error_line(result)
    assert server.count == 0
    assert not (result.cwd / "outputs").exists()


def test_max_cost_with_a_model_without_a_price_refuses(dspy_run, server):
    result = dspy_run("--run", "--yes", "--model", "openai/fake-teacher", "--max-cost", "1")
    assert result.returncode == 2
    line = one_error_line(result)
    assert "openai/fake-teacher has no cost estimate" in line and "--max-cost" in line
    assert server.count == 0


def test_a_missing_key_stops_before_any_request(dspy_run, server):
    result = dspy_run("--run", "--yes", key=None)
    assert result.returncode == 2
    assert "OPENAI_API_KEY is not set" in one_error_line(result)
    assert server.count == 0

    result = dspy_run("--run", "--yes", "--api-key-env", "MY_SERVER_KEY")
    assert result.returncode == 2
    assert "MY_SERVER_KEY is not set" in one_error_line(result)
    assert server.count == 0


def test_a_missing_key_stops_before_reaching_the_real_api(run_script):
    # no --api-base: this would go to api.openai.com; the network guard proves it does not try
    result = run_script(SCRIPT, "--run", "--yes")
    assert result.returncode == 2
    assert "OPENAI_API_KEY is not set" in one_error_line(result)
    # a model name without its provider/: the key of the provider LiteLLM routes it to
    result = run_script(SCRIPT, "--run", "--yes", "--model", "claude-haiku-4-5")
    assert result.returncode == 2
    assert "ANTHROPIC_API_KEY is not set" in one_error_line(result)


def test_without_a_terminal_a_paid_run_needs_yes(dspy_run, server):
    result = dspy_run("--run", "--model", PRICED)
    assert result.returncode == 2
    assert "pass --yes" in one_error_line(result)
    assert server.count == 0


# ----------------------------------------------------------------------------- bad input


BAD_INPUT = {
    "negative limit": (["--train-limit", "-1"], r"--train-limit: must be at least 1"),
    "threshold": (["--metric-threshold", "150"], r"--metric-threshold is a ROUGE-L score"),
    "unknown optimizer": (["--optimizer", "simba"], r"invalid choice: 'simba'"),
    "no demos to search": (
        ["--optimizer", "random-search", "--max-bootstrapped-demos", "0"],
        r"needs --max-bootstrapped-demos of at least 1",
    ),
    "unknown provider": (["--model", "nonsense/x"], r"--model nonsense/x: LiteLLM cannot tell"),
    "missing program": (["--load", "nowhere.json"], r"nowhere\.json: no compiled program there"),
    "ask before a run": (["--ask", "Why?"], r"program\.json: no compiled program there; run once"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_line_and_exit_2(case, run_script):
    args, pattern = BAD_INPUT[case]
    result = run_script(SCRIPT, *args)
    assert result.returncode == 2, result.output[-2000:]
    assert re.search(pattern, result.stderr), result.stderr


def test_a_file_that_is_not_a_program_is_one_line_and_exit_2(run_script, tmp_path):
    (tmp_path / "other.json").write_text('{"something": "else"}')
    result = run_script(SCRIPT, "--load", "other.json")
    assert result.returncode == 2
    assert "other.json: not a program saved by this script" in one_error_line(result)


@pytest.mark.skipif(importlib.util.find_spec("optuna") is not None, reason="optuna is installed")
def test_mipro_without_optuna_says_so_and_exits_2(run_script):
    result = run_script(SCRIPT, "--optimizer", "mipro")
    assert result.returncode == 2
    assert "needs optuna, which is not installed" in one_error_line(result)


# ----------------------------------------------------------------------------- small pieces


def test_the_compile_estimate_is_what_dspy_really_does_when_no_demo_passes(script):
    """planned_calls() is an upper bound; DSPy reaches it when no run scores well enough."""
    import dspy
    from dspy.utils.dummies import DummyLM

    signature = script.teacher_signature()
    trainset = [
        dspy.Example(question=f"What is idea {i}?", answer=f"Idea {i} is an idea.").with_inputs(
            "question"
        )
        for i in range(5)
    ]
    lm = DummyLM([{"reasoning": "no idea", "answer": "zzz"}] * 500)
    settings = [
        {"optimizer": "bootstrap"},
        {"optimizer": "bootstrap", "max_bootstrapped_demos": 0},
        {"optimizer": "random-search", "num_candidates": 2},
        {"optimizer": "labeled"},
    ]
    for setting in settings:
        cfg = script.Config(data=script.DATA_FILE, **setting)
        with dspy.context(lm=lm):
            before = len(lm.history)
            script.build_optimizer(cfg).compile(dspy.ChainOfThought(signature), trainset=trainset)
            made = len(lm.history) - before
        assert made == script.planned_calls(cfg, 5, 3, compile_needed=True)["compile"], setting


def test_an_unparseable_reply_scores_zero_instead_of_stopping_the_run(script):
    import dspy
    from dspy.utils.dummies import DummyLM

    program = dspy.ChainOfThought(script.teacher_signature())
    examples = [dspy.Example(question="Why?", answer="Because.").with_inputs("question")]
    with dspy.context(lm=DummyLM([{"reasoning": "no answer field"}] * 10)):
        answers = script.answer_all(program, examples, threads=1, label="test")
    assert answers[0]["answer"] == ""
    assert script.rouge_metric(examples[0], dspy.Prediction(answer="")) == 0


# ---------------------------------------------------------------- a newcomer's first hour


def test_the_real_run_command_is_one_line_that_parses_back_capped_above_the_estimate(
    run_script, script, tmp_path
):
    data = tmp_path / "a folder with a long name" / "of the teacher's own questions.jsonl"
    data.parent.mkdir()
    data.write_text((script.DATA_FILE).read_text())
    args = ("--data", str(data), "--output-dir", str(tmp_path / "out"), "--train-limit", "12")
    result = run_script(SCRIPT, *args, env={"COLUMNS": "80"})
    assert result.returncode == 0, result.output[-3000:]
    lines = [line.strip() for line in result.stdout.splitlines()]
    command = lines[lines.index("Real run (sends the calls above):") :]
    [line] = [line for line in command if line.startswith("python ")]  # one line, not wrapped
    words = __import__("shlex").split(line)
    assert words[:2] == ["python", SCRIPT]
    cfg = script.parse_config(words[2:])
    assert (cfg.run, cfg.data, cfg.train_limit) == (True, data, 12)
    estimate = float(re.search(r"│ total .*?([\d.]+) │\n", result.stdout).group(1))
    assert estimate < cfg.max_cost <= round(estimate * 1.25 + 0.01, 2)


SPLITS = ' (lines with "split": "train", or with no split: about 80% of those train)'
TOO_FEW = {  # (train pairs in the file, flags) -> the optimizer's minimum, what to fix
    "a short file, random search": (
        8,
        ["--optimizer", "random-search"],
        20,
        "pick --optimizer bootstrap (4 are enough), or add question/answer pairs to school.jsonl: "
        "it has 8 for training, and --optimizer random-search needs 20" + SPLITS,
    ),
    "a file shorter than any optimizer needs": (
        2,
        [],
        4,
        "add question/answer pairs to school.jsonl: it has 2 for training, and --optimizer "
        "bootstrap needs 4" + SPLITS,
    ),
    "--train-limit below the minimum": (
        144,
        ["--train-limit", "3"],
        4,
        "raise --train-limit 3 or drop it: school.jsonl has 144 training pairs",
    ),
}


@pytest.mark.parametrize("case", TOO_FEW)
def test_a_dry_run_on_too_few_pairs_ends_with_what_to_fix_not_with_a_real_run(
    case, script, tmp_path
):
    in_file, flags, need, fix = TOO_FEW[case]
    pairs = [json.loads(line) for line in script.DATA_FILE.open()]
    school = [p for p in pairs if p["split"] == "train"][:in_file]
    school += [p for p in pairs if p["split"] == "test"][:3]
    (tmp_path / "school.jsonl").write_text("".join(json.dumps(p) + "\n" for p in school))
    result = run_script_in(tmp_path, SCRIPT, "--data", "school.jsonl", *flags)
    assert result.returncode == 0, result.output[-3000:]
    said = flat(result.stdout)
    optimizer = flags[1] if flags[:1] == ["--optimizer"] else "bootstrap"
    used = min(in_file, 3) if "--train-limit" in flags else in_file
    assert (
        f"only {used} training pairs: --optimizer {optimizer} is unlikely to learn from fewer "
        f"than {need}"
    ) in said
    assert "Real run" not in result.stdout and "python " not in said.split("Stage 6/6")[1]
    assert said.endswith(
        f"no real run yet: --optimizer {optimizer} has too few training pairs to learn from (at "
        f"least {need}) to fix: {fix}; then run this dry run again"
    ), said[-600:]


def test_a_real_run_on_too_few_pairs_warns_and_goes_on(dspy_run, server):
    args = ("--run", "--yes", "--optimizer", "labeled", "--train-limit", "2", "--test-limit", "1")
    result = dspy_run(*args)
    assert result.returncode == 0, result.output[-3000:]
    said = flat(result.stdout)
    assert (
        "only 2 training pairs: --optimizer labeled is unlikely to learn from fewer than 4" in said
    )
    assert "this real run goes on as a quick try" in said
    assert len(program_of(result)["predict"]["demos"]) == 2  # compiled from what there was
    assert results_of(result)["questions"]


def test_a_model_name_close_to_a_known_one_gets_did_you_mean_and_a_known_one_none(run_script):
    typo = run_script(SCRIPT, "--model", "openai/gpt4o-mini")
    assert typo.returncode == 0  # a warning: the model may be newer than LiteLLM's map
    assert "did you mean openai/gpt-4o-mini?" in flat(typo.stdout)
    known = run_script(SCRIPT, "--model", PRICED)
    assert known.returncode == 0
    assert "did you mean" not in known.stdout


def test_reflection_model_without_gepa_is_one_line_exit_2(run_script):
    result = run_script(SCRIPT, "--reflection-model", "openai/gpt-4o")
    assert result.returncode == 2
    assert "--reflection-model is GEPA's" in one_error_line(result)


def test_auto_levels_search_longer_and_the_dry_run_prices_gepa_without_demos(run_script, script):
    for optimizer in ("mipro", "gepa"):
        light, medium, heavy = (
            script.planned_calls(
                script.Config(data=script.DATA_FILE, optimizer=optimizer, auto=level),
                30,
                6,
                compile_needed=True,
            )["compile"]
            for level in ("light", "medium", "heavy")
        )
        assert light < medium < heavy, optimizer
    result = run_script(SCRIPT, "--optimizer", "gepa", "--auto", "medium")
    assert result.returncode == 0, result.output[-3000:]
    assert "GEPA (auto=medium)" in flat(result.stdout)
    assert "tuned: ~0 demos" in result.stdout  # an instruction is what GEPA changes


def test_gepa_compiles_with_the_reflection_model_and_saves_its_instruction(
    dspy_run, server, script
):
    args = ("--run", "--yes", "--optimizer", "gepa", "--reflection-model", "openai/reflector")
    result = dspy_run(*args, "--train-limit", "4", "--test-limit", "2")
    assert result.returncode == 0, result.output[-3000:]
    reflections = [body for body in server.requests if body["model"] == "reflector"]
    assert reflections  # the reflection LM was asked, by its own name
    # it was shown the answers with their score and the teacher's answer as feedback
    assert "against the teacher's answer" in json.dumps(reflections[0]["messages"])
    assert reflections[0]["temperature"] == 1.0  # sampled, as GEPA's authors use it
    # the program saved is GEPA's pick: the instruction it started from, or one it wrote
    [instructions] = re.findall(r'"instructions": "([^"]*)"', json.dumps(program_of(result)))
    original = "Answer a student's question as a good teacher would"
    assert instructions.startswith(original) or "a teacher explains the key idea" in instructions
    # GEPA writes instructions: the train pairs for fine-tuning are written after compiling,
    # with the instruction it picked
    out = flat(result.stdout)
    assert out.index("Stage 4/6") < out.index("wrote ") and "finetune.jsonl" in out
    exported = result.cwd / "outputs" / "dspy" / "finetune.jsonl"
    system = json.loads(exported.read_text().splitlines()[0])["messages"][0]["content"]
    assert json.loads(f'"{instructions}"') in system
    results = results_of(result)
    assert results["optimizer"] == "gepa"
    cfg = script.Config(data=script.DATA_FILE, optimizer="gepa", train_limit=4, test_limit=2)
    planned = script.planned_calls(cfg, 4, 2, compile_needed=True)["compile"]
    assert 0 < results["lm_calls"]["compile"]["sent"] <= planned  # the estimate is an upper bound


@pytest.mark.parametrize(
    ("flag", "typed", "meant"),
    [("--optimizer", "mipr", "mipro"), ("--adapter", "chat-plan", "chat-plain")],
)
def test_a_name_close_to_a_choice_is_one_line_with_did_you_mean(run_script, flag, typed, meant):
    result = run_script(SCRIPT, flag, typed)
    assert result.returncode == 2
    assert one_error_line(result).endswith(f"did you mean {meant}? (see --help)")
