"""dspy_example.py against a model on this machine, the way a small local model behaves.

- Stop strings: every call, baseline, compile and tuned alike, carries the same `stop` list, and
  the results file records it.
- Unparseable replies: a reply in no format (as a small model often writes) is counted per
  phase, scored 0, shown with its raw text, and recorded; it never stops the run.
- `--results-name`: results/NAME.json, beside the other runs.
- `--serve FOLDER`: the script starts `transformers serve` on a free 127.0.0.1 port and stops it
  however the run ends (done, bad model, Ctrl-C, killed); a dry run starts nothing. These use a
  tiny random model folder built here in a second (its replies are noise, which is the point:
  nothing parses), so only the server's own start-up (importing transformers) takes time.
- One test with the real SmolLM2-135M-Instruct (tests/real_model.py builds it from a wheel):
  it compiles, answers, and its numbers are those a user would see.

Nothing leaves the machine: the network guard in conftest.py fails any test whose process, or
any child of it (the server too), reaches past loopback.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import load_script, run_script_in, start_script_in
from fake_dspy_server import FREE_TEXT, answer_for, question_of
from real_model import smollm2_folder  # noqa: F401  (the fixture, found by its name)

SCRIPT = "dspy_example.py"
SEASONS = "What causes the seasons on Earth?"  # the first test question
PHOTOSYNTHESIS = "What is photosynthesis?"  # the first training question
STOP = ["[[ ## completed ## ]]", "[[ ## question ## ]]"]


@pytest.fixture(scope="module")
def script():
    return load_script(SCRIPT)


def results_of(result, name: str = "dspy") -> dict:
    return json.loads((result.cwd / "outputs" / "results" / f"{name}.json").read_text())


def one_error_line(result) -> str:
    assert "Traceback" not in result.output, result.output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


# ----------------------------------------------------------------------------- stop strings


def test_every_call_carries_the_same_stop_strings_and_the_results_record_them(
    dspy_run, server, script
):
    assert script.STOP == STOP
    server.free_text_for = {SEASONS}  # so DSPy's JSON fallback sends a call too
    result = dspy_run("--run", "--yes", "--optimizer", "labeled", "--test-limit", "2")
    assert result.returncode == 0, result.output[-3000:]
    assert server.count == 2 + 2 + 1 + 2 + 1  # plain, baseline, a JSON retry, tuned, a retry
    for body in server.requests:
        assert body["stop"] == STOP
        assert body["max_tokens"] == 1000  # a hosted API's default
        assert body["temperature"] == 0
    decoding = results_of(result)["decoding"]
    assert decoding == {"temperature": 0.0, "max_tokens": 1000, "stop": STOP}


def test_a_local_server_gets_a_small_token_limit_and_serve_one_thread(script, tmp_path):
    def config(**kwargs):
        return script.Config(data=script.DATA_FILE, **kwargs)

    hosted = config()
    assert (hosted.max_tokens, hosted.threads) == (1000, 8)
    ollama = config(model="ollama_chat/llama3.2")
    assert (ollama.max_tokens, ollama.threads) == (128, 8)  # Ollama batches parallel calls
    served = config(serve=tmp_path)
    assert (served.max_tokens, served.threads) == (128, 1)
    assert served.model == f"openai/{tmp_path.resolve()}"  # the name transformers serve wants
    assert config(serve=tmp_path, max_tokens=64, threads=3).max_tokens == 64


# ----------------------------------------------------------------------------- unparsed replies


def test_an_unparseable_reply_is_counted_scored_zero_shown_and_recorded_per_phase(dspy_run, server):
    server.free_text_for = {SEASONS, PHOTOSYNTHESIS}
    args = ("--run", "--yes", "--train-limit", "8", "--test-limit", "3", "--metric-threshold", "15")
    result = dspy_run(*args)
    assert result.returncode == 0, result.output[-3000:]  # a bad reply never stops the run
    results = results_of(result)

    # per phase: one reply in no format, asked again in JSON, still unreadable
    assert results["unparsed"] == {"baseline": 1, "compile": 1, "tuned": 1}
    for phase, replies in (("baseline", 3), ("tuned", 3)):
        assert results["replies"][phase] == {
            "replies": replies,
            "not_in_format": 1,
            "plain": 0,  # ChatAdapter reads no reply whole: that is the plain-reply adapter
            "near_miss": 0,
            "json_rescued": 0,
            "unparsed": 1,
            "first_unparsed": FREE_TEXT,
        }
        # the JSON retry is a call of its own, counted with the phase
        calls = results["lm_calls"][phase]
        assert calls["sent"] + calls["cache_hits"] == replies + 1
    # scored 0 and counted as unusable, while the other answers are untouched
    assert results["unusable"] == {"baseline": 1, "tuned": 1}
    seasons = next(q for q in results["questions"] if q["question"] == SEASONS)
    assert seasons["baseline"] == seasons["tuned"] == ""
    assert seasons["baseline_score"] == seasons["tuned_score"] == 0
    assert all(q["tuned"] for q in results["questions"] if q["question"] != SEASONS)

    # compiling went on, and the unreadable run is not a demo
    program = json.loads((result.cwd / "outputs" / "dspy" / "program.json").read_text())
    boot = [demo for demo in program["predict"]["demos"] if demo.get("augmented")]
    assert boot and PHOTOSYNTHESIS not in {demo["question"] for demo in boot}

    # shown: after each phase (stages 4 and 5) with the raw reply, and in stage 6's table
    out = flat(result.stdout)
    for phase in ("compile", "baseline", "tuned"):
        assert f"{phase}: " in out and "1 unparsed: an empty answer, scored 0" in out
    assert out.count(FREE_TEXT) >= 3
    table = re.search(r"replies, by phase.*?└", result.stdout, re.DOTALL).group(0)
    assert re.search(r"│ baseline │\s+3 │\s+2 │\s+0 │\s+1 │\s+0 │\s+1 │", table), table
    assert re.search(r"│ tuned\s+│\s+3 │\s+2 │\s+0 │\s+1 │\s+0 │\s+1 │", table), table
    assert "(unusable:" in result.stdout  # the side-by-side view


def test_an_empty_reply_is_counted_as_a_reply_not_in_format(dspy_run, server):
    # DSPy raises before its parse() on an empty reply, so no parse event tells of it
    server.empty_for = {SEASONS}
    result = dspy_run("--run", "--yes", "--optimizer", "labeled", "--test-limit", "2")
    assert result.returncode == 0, result.output[-3000:]
    results = results_of(result)
    for phase in ("baseline", "tuned"):
        replies = results["replies"][phase]
        assert (replies["replies"], replies["not_in_format"], replies["unparsed"]) == (2, 1, 1)
        assert replies["json_rescued"] == 0
        assert replies["first_unparsed"] == "(an empty reply)"
    assert results["unusable"] == {"baseline": 1, "tuned": 1}
    assert "1 unparsed: an empty answer, scored 0" in flat(result.stdout)


# ----------------------------------------------------------------------------- --results-name


def test_results_name_writes_its_own_file_beside_the_others(dspy_run, server):
    args = ("--run", "--yes", "--optimizer", "labeled", "--test-limit", "1")
    result = dspy_run(*args, "--results-name", "dspy-smollm2")
    assert result.returncode == 0, result.output[-3000:]
    results = result.cwd / "outputs" / "results"
    assert (results / "dspy-smollm2.json").is_file()
    assert not (results / "dspy.json").exists()
    assert results_of(result, "dspy-smollm2")["approach"] == "dspy"
    assert "| dspy-smollm2 gpt-4o-mini |" in (results / "comparison.md").read_text()


@pytest.mark.parametrize("name", ["../elsewhere", "a/b", "dspy.json", ".hidden", ""])
def test_a_results_name_that_is_not_a_plain_file_stem_is_exit_2(run_script, name):
    result = run_script(SCRIPT, f"--results-name={name}")
    assert result.returncode == 2, result.output[-2000:]
    assert "--results-name" in result.stderr and "Traceback" not in result.output


# ----------------------------------------------------------------------------- --serve


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie, dead but not yet reaped, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not alive(pid)


def server_pid(output: str) -> int:
    match = re.search(r"started `.*?` \(pid (\d+)\)", flat(output))
    assert match, output[-3000:]
    return int(match.group(1))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A random 2-layer Llama with a 300-token tokenizer, saved as a model folder (~1 s)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(["[[ ## question ## ]] What causes the seasons on Earth?"], trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16384,  # a byte-level 300-token vocabulary makes long prompts
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    folder = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


SERVE_ENV = {"OMP_NUM_THREADS": "1"}  # 4.9 times faster on a busy 2-core machine (measured)
SERVE_PACKAGES = ("fastapi", "uvicorn", "pydantic", "openai")
needs_serve = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in SERVE_PACKAGES),
    reason="transformers serve needs fastapi, uvicorn: pip install 'transformers[serving]'",
)


def test_serve_of_a_folder_that_is_no_model_is_one_line_and_starts_nothing(run_script, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "README.txt").write_text("not a model")
    result = run_script(SCRIPT, "--serve", "notes", "--run")
    assert result.returncode == 2
    assert "not a transformers model folder (no config.json)" in one_error_line(result)
    assert "started `" not in result.stdout

    result = run_script(SCRIPT, "--serve", "nowhere", "--run")
    assert result.returncode == 2
    assert "--serve" in one_error_line(result) and "no such folder" in result.stderr

    result = run_script(SCRIPT, "--serve", "notes", "--model", "openai/gpt-4o-mini")
    assert result.returncode == 2
    assert "--serve sets the model and its server; drop --model" in result.stderr


def test_serve_dry_run_says_what_it_would_start_and_starts_nothing(run_script, tiny_folder):
    result = run_script(SCRIPT, "--serve", str(tiny_folder), "--test-limit", "2")
    assert result.returncode == 0, result.output[-3000:]
    out = flat(result.stdout)
    match = re.search(
        r"dry run: would start `HF_HUB_OFFLINE=1 transformers serve (\S+) --host 127\.0\.0\.1 "
        r"--port (\d+)`; nothing is started\.",
        out,
    )
    assert match, out[-3000:]
    assert match.group(1) == str(tiny_folder)
    assert f"openai/{tiny_folder}" in out  # the model string a real run uses
    assert "fits the model" in out and "16384 tokens" in out
    assert "started `" not in out and not (result.cwd / "outputs" / "dspy" / "serve.log").exists()
    with socket.socket() as probe:  # nobody listens on the port it named
        assert probe.connect_ex(("127.0.0.1", int(match.group(2)))) != 0


@needs_serve
def test_serve_of_a_broken_model_is_one_line_exit_2_and_leaves_no_process(run_script, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama"}')  # no weights, no tokenizer
    result = run_script(SCRIPT, "--serve", "broken", "--run", env=SERVE_ENV, timeout=240)
    assert result.returncode == 2, result.output[-3000:]
    line = one_error_line(result)
    assert "transformers serve stopped before it answered" in line
    assert "outputs/dspy/serve.log" in line
    assert not alive(server_pid(result.stdout))
    assert not (result.cwd / "outputs" / "results").exists()


@needs_serve
def test_serve_runs_a_tiny_model_and_stops_the_server_at_the_end(run_script, tiny_folder):
    args = ["--serve", str(tiny_folder), "--run", "--optimizer", "labeled", "--test-limit", "2"]
    args += ["--max-tokens", "8", "--results-name", "dspy-tiny"]
    result = run_script(SCRIPT, *args, env=SERVE_ENV, timeout=240)
    assert result.returncode == 0, result.output[-3000:]
    pid = server_pid(result.stdout)
    assert f"stopped the local server (pid {pid})" in result.stdout
    assert not alive(pid)
    out = flat(result.stdout)
    assert re.search(r"the server answered after \d+ s; --model openai/\S+ --api-base", out)

    assert "Loading weights" not in result.output  # the similarity encoder loads quietly

    results = results_of(result, "dspy-tiny")
    # named by its folder, not by the openai/ route LiteLLM needed to reach it
    assert results["model"] == f"{tiny_folder} (transformers serve)"
    assert results["server"].startswith("HF_HUB_OFFLINE=1 transformers serve ")
    assert results["decoding"] == {"temperature": 0.0, "max_tokens": 8, "stop": STOP}
    assert results["cost_usd"] == 0
    # a random model writes noise: every reply is counted, none silently
    for phase in ("baseline", "tuned"):
        replies = results["replies"][phase]
        assert replies["replies"] == 2
        assert replies["unparsed"] == replies["not_in_format"] - replies["json_rescued"]
        assert results["unusable"][phase] >= results["unparsed"][phase]
    assert not (result.cwd / "outputs" / "results" / "dspy.json").exists()


def wait_for_line(proc: subprocess.Popen, text: str, seconds: float) -> str:
    """Read the script's stdout until a line holds `text`; return what was read."""
    seen, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if text in line:
            return "".join(seen)
    proc.kill()
    raise AssertionError(f"no {text!r} within {seconds} s:\n" + "".join(seen)[-3000:])


SIGNALS = {"ctrl-c": signal.SIGINT, "sigterm": signal.SIGTERM, "kill -9": signal.SIGKILL}


@needs_serve
@pytest.mark.parametrize("how", SIGNALS)
def test_serve_stops_the_server_when_the_run_is_interrupted(how, tiny_folder, tmp_path):
    if how == "kill -9" and not sys.platform.startswith("linux"):
        pytest.skip("the server's parent-death signal (prctl) is Linux's")
    # The random model writes until --max-tokens: a reply takes about 40 s here, so one is in
    # flight when the signal comes, and the server would finish it before stopping on SIGTERM.
    args = ["--serve", str(tiny_folder), "--run", "--optimizer", "labeled"]
    args += ["--test-limit", "30", "--max-tokens", "4000", "--no-cache"]
    proc = start_script_in(tmp_path, SCRIPT, *args, env=SERVE_ENV)
    seen = wait_for_line(proc, "the server answered after", 240)
    pid = server_pid(seen)
    assert alive(pid)
    log, deadline = tmp_path / "outputs" / "dspy" / "serve.log", time.monotonic() + 60
    while "[Request received]" not in log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "no request reached the server"
        time.sleep(0.1)
    signalled = time.monotonic()
    proc.send_signal(SIGNALS[how])
    proc.wait(timeout=120)
    seconds = time.monotonic() - signalled
    # read, not communicate(): that reads the pipe past what readline() already buffered
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if how != "kill -9":
        assert proc.returncode == 128 + SIGNALS[how], stderr[-2000:]
        assert "interrupted: " in stderr and "run the same command to resume" in stderr
        assert f"stopped the local server (pid {pid})" in stdout
        assert not alive(pid)
        assert seconds < 10, f"{seconds:.1f} s from the signal to the exit"
    else:
        assert proc.returncode == -signal.SIGKILL
        assert gone_within(pid, 20), "the server outlived the script that started it"


# ----------------------------------------------------------------------------- the real model


@needs_serve
def test_dspy_compiles_and_answers_with_the_real_smollm2_through_transformers_serve(
    request, tmp_path
):
    """The whole run against SmolLM2-135M-Instruct, served by `transformers serve`.

    Measured on 2 busy CPU cores with these arguments (greedy decoding, so the same every
    run): 127 s in all, 22 s of it building the folder and 74 s compiling, answering and
    scoring; the first training question's run scored above 30 ROUGE-L and became the one
    bootstrapped demo; baseline ROUGE-L 13 and similarity 43 (one of the 2 replies unreadable
    even in JSON), compiled ROUGE-L 25 and similarity 86, both replies read. The thresholds
    below leave room for another CPU's rounding (tuned ROUGE-L >= 15, similarity >= 60), and
    check what a user sees: it compiled with the model's own run, it answered, the compiled
    prompt answered better, and every unreadable reply is counted.
    """
    folder = request.getfixturevalue("smollm2_folder")  # built once per session; skips without
    args = ["--serve", str(folder), "--run", "--train-limit", "4", "--test-limit", "2"]
    args += ["--max-bootstrapped-demos", "1", "--max-tokens", "128"]
    started = time.monotonic()
    proc = start_script_in(tmp_path, SCRIPT, *args, env=SERVE_ENV)
    stdout, stderr = proc.communicate(timeout=600)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, (stdout + stderr)[-4000:]
    assert not alive(server_pid(stdout)), "the server outlived the run"

    program = json.loads((tmp_path / "outputs" / "dspy" / "program.json").read_text())
    assert "predict" not in program, "a model on this machine gets dspy.Predict"
    boot = [demo for demo in program["demos"] if demo.get("augmented")]
    assert len(boot) == 1, "compiling kept the model's own run on a training question"

    results = json.loads((tmp_path / "outputs" / "results" / "dspy.json").read_text())
    assert results["n_test"] == 2
    assert results["decoding"] == {"temperature": 0.0, "max_tokens": 128, "stop": STOP}
    assert all(q["tuned"].strip() for q in results["questions"]), "real answers, none empty"
    assert results["tuned_score"] >= 15 and results["tuned_similarity"] >= 60
    assert results["tuned_score"] > results["baseline_score"]
    for phase in ("baseline", "compile", "tuned"):
        replies = results["replies"][phase]
        assert replies["json_rescued"] == 0, "the plain-reply adapter never asks again in JSON"
        assert results["unparsed"][phase] == replies["unparsed"] == replies["not_in_format"]
    assert results["unusable"]["tuned"] == results["unparsed"]["tuned"] == 0
    assert results["plain_model"]["score"] > 10, "the plain chat prompt answered for real"
    print(f"real SmolLM2 run: {seconds:.0f} s, {json.dumps(results['replies'])}")


@needs_serve
def test_the_chosen_program_leaves_at_most_1_of_12_real_replies_unreadable(
    request, script, tmp_path, monkeypatch
):
    """The program and adapter a model on this machine gets, zero-shot, on SmolLM2-135M.

    DSPy's usual ChainOfThought with ChatAdapter left 0 of 36 replies in format on this model
    (bench/dspy_program.py). The script's own stages 1 to 3 and its answer_all(), as stage 5
    runs the baseline, on the first 12 test questions, all at once against a server started
    with --continuous-batching, as a user may start one and pass it with --api-base: it ignores
    `stop`, so this also reads real replies that ran on past the stop strings. (2.1 times
    faster than one at a time on 2 idle cores, the same 12 answers.)
    """
    folder = request.getfixturevalue("smollm2_folder")
    for name, value in SERVE_ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("OPENAI_API_KEY", "local")  # the OpenAI client wants one; the server none
    script.console.quiet = True
    server = script.LocalServer(folder.resolve(), tmp_path / "serve.log")
    # A KV cache for the 12 replies, not 60% of the free memory (its default)
    server.args += ["--continuous-batching", "--cb-num-blocks", "64"]
    server.start(300)
    try:
        cfg = script.parse_config(
            ["--run", "--yes", "--model", f"openai/{folder.resolve()}", "--api-base",
             server.api_base, "--test-limit", "12", "--no-cache",
             "--max-tokens", "128", "--output-dir", str(tmp_path)]
        )  # fmt: skip
        assert (cfg.program, cfg.adapter) == ("predict", "chat-plain")
        data = script.prepare_data(cfg)
        formatted = script.format_data(cfg, data)
        plan = script.configure_model(cfg, formatted)
        program = script.build_program(cfg.program, formatted.signature)
        replies = script.answer_all(program, formatted.testset, 12, "baseline")
    finally:
        server.stop()
    answers = [reply["answer"] for reply in replies]
    assert sum(not answer.strip() for answer in answers) <= 1, answers
    assert plan.replies["baseline"]["replies"] == 12
    rouge = [script.rouge_l(a, row["answer"]) for a, row in zip(answers, data.test, strict=True)]
    assert sum(rouge) / 12 > 10, "answers about the questions, not template residue"


# ----------------------------------------------------------------------------- program, adapter


def test_a_model_on_this_machine_gets_predict_and_the_plain_reply_adapter(script, tmp_path):
    def config(**kwargs):
        return script.Config(data=script.DATA_FILE, **kwargs)

    hosted = config()
    assert (hosted.program, hosted.adapter, hosted.max_tokens) == ("cot", "chat", 1000)
    # a priced name behind a loopback address is a proxy to a paid API: still hosted
    proxy = config(api_base="http://127.0.0.1:4000/v1")
    assert (proxy.program, proxy.adapter, proxy.max_tokens) == ("cot", "chat", 1000)
    # a user's own server (transformers serve, LM Studio's OpenAI route): the local care
    own = config(model="openai/SmolLM2-135M-Instruct", api_base="http://localhost:8000/v1")
    assert (own.program, own.adapter, own.max_tokens) == ("predict", "chat-plain", 128)
    assert (config(serve=tmp_path).program, config(serve=tmp_path).adapter) == (
        "predict",
        "chat-plain",
    )
    assert config(model="ollama_chat/llama3.2").adapter == "chat-plain"
    chosen = config(serve=tmp_path, program="cot", adapter="json")
    assert (chosen.program, chosen.adapter) == ("cot", "json")


@pytest.mark.parametrize(
    ("adapter", "calls", "unusable"),
    [
        ("chat-plain", 3 + 3 + 3, 0),  # the reply without markers is the answer: no retry
        ("chat", 3 + 3 + 1 + 3 + 1, 1),  # ChatAdapter asks again in JSON, which fails too
        ("chat-no-retry", 3 + 3 + 3, 1),  # ChatAdapter without the retry: unread, no more calls
    ],
)
def test_the_plain_reply_adapter_reads_a_reply_without_markers_as_the_answer(
    dspy_run, server, adapter, calls, unusable
):
    server.free_text_for = {SEASONS}
    args = ("--run", "--yes", "--program", "predict", "--adapter", adapter)
    result = dspy_run(*args, "--optimizer", "labeled", "--test-limit", "3")
    assert result.returncode == 0, result.output[-3000:]
    assert server.count == calls  # plain model, baseline and tuned: 3 questions each
    results = results_of(result)
    assert results["unusable"] == {"baseline": unusable, "tuned": unusable}
    seasons = results["questions"][0]
    assert seasons["question"] == SEASONS
    assert seasons["baseline"] == ("" if unusable else FREE_TEXT)
    assert results["replies"]["baseline"]["plain"] == (0 if unusable else 1)
    # one reply counted once, though the plain-reply adapter's parse() calls ChatAdapter's
    assert results["replies"]["baseline"]["replies"] == 3
    assert results["replies"]["baseline"]["not_in_format"] == unusable
    # the retry is named only where there is one
    assert ("asked each again in JSON" in result.output) == (adapter == "chat")
    assert (results["program"], results["adapter"]) == ("predict", adapter)
    # Predict asks for the answer alone: no request names a reasoning field
    assert not any("reasoning" in json.dumps(body["messages"]) for body in server.requests)


@pytest.mark.parametrize("adapter", ["chat-plain", "chat-no-retry"])
def test_a_reply_opening_with_a_near_miss_of_the_header_is_read_as_the_answer(
    dspy_run, server, adapter
):
    server.near_miss_for = {SEASONS}  # "[[## answer ## ]]\n" + prose
    args = ("--run", "--yes", "--program", "predict", "--adapter", adapter)
    result = dspy_run(*args, "--optimizer", "labeled", "--test-limit", "3")
    assert result.returncode == 0, result.output[-3000:]
    results = results_of(result)
    seasons = results["questions"][0]
    replies = results["replies"]["baseline"]
    if adapter == "chat-plain":  # the header read as the answer's, the prose as the answer
        assert seasons["baseline"] == seasons["tuned"] == FREE_TEXT
        assert (replies["near_miss"], replies["plain"], replies["not_in_format"]) == (1, 0, 0)
        shown = "1 of them opened with a near miss of the answer's header (such as [[## answer "
        shown += "## ]])"
        assert shown in flat(result.stdout)
    else:  # DSPy's ChatAdapter cannot read it: an empty answer, scored 0
        assert seasons["baseline"] == ""
        assert (replies["near_miss"], replies["plain"], replies["not_in_format"]) == (0, 0, 1)


def test_a_reply_that_runs_on_past_a_stop_string_is_read_up_to_it_and_not_counted_as_cut(
    dspy_run, server
):
    # `transformers serve --continuous-batching` ignores `stop`: the model writes on, here
    # echoing the prompt's next question, until --max-tokens
    args = ("--run", "--yes", "--optimizer", "labeled", "--test-limit", "3", "--adapter")
    args += ("chat-plain", "--program", "predict")
    server.free_text_for = {SEASONS}  # one plain reply, read whole by chat-plain
    result = dspy_run(*args)
    assert result.returncode == 0, result.output[-3000:]
    stopped = results_of(result)
    server.run_on_past_stop = "\n\n[[ ## question ## ]]\nAnd why is the sky blue? It is. "
    result = dspy_run(*args, "--no-cache")
    assert result.returncode == 0, result.output[-3000:]
    ran_on = results_of(result)
    assert server.requests[-1]["stop"] == ["[[ ## completed ## ]]", "[[ ## question ## ]]"]
    for phase in ("plain", "baseline", "tuned"):
        assert [q[phase] for q in ran_on["questions"]] == [q[phase] for q in stopped["questions"]]
    assert ran_on["questions"][0]["baseline"] == FREE_TEXT
    assert ran_on["unusable"] == {"baseline": 0, "tuned": 0}
    assert ran_on["cut"] == {"baseline": 0, "tuned": 0}
    assert ran_on["plain_model"]["cut"] == 0


def test_the_plain_model_is_asked_with_the_plain_prompt_and_recorded_as_the_mark(
    dspy_run, server, script
):
    result = dspy_run("--run", "--yes", "--optimizer", "labeled", "--test-limit", "2")
    assert result.returncode == 0, result.output[-3000:]
    plain = [
        body for body in server.requests if body["messages"][0]["content"] == script.SYSTEM_PROMPT
    ]
    questions = [q["question"] for q in results_of(result)["questions"]]
    assert sorted(body["messages"][1]["content"] for body in plain) == sorted(questions)
    assert {len(body["messages"]) for body in plain} == {2}  # no DSPy instructions, no demos
    results = results_of(result)
    questions = results["questions"]
    mark = results["plain_model"]
    assert mark["model"] == "openai/gpt-4o-mini"
    assert mark["score"] == round(sum(q["plain_score"] for q in questions) / 2, 2)
    assert questions[0]["plain"] == answer_for(SEASONS)  # the fake's plain answer
    assert mark["unusable"] == 0 and mark["cut"] == 0
    # the same fine-tuning prompt words as the other two approaches
    assert script.SYSTEM_PROMPT == load_script("huggingface_lora.py").SYSTEM_PROMPT


def test_base_model_answers_the_plain_prompt_and_the_baseline_of_a_tuned_model(dspy_run, server):
    base = "openai/gpt-4o-mini-2024-07-18"
    args = ("--run", "--yes", "--optimizer", "labeled", "--test-limit", "2", "--base-model", base)
    result = dspy_run(*args)
    assert result.returncode == 0, result.output[-3000:]
    models = [body["model"] for body in server.requests]
    assert models.count("gpt-4o-mini-2024-07-18") == 4  # the plain model's and the baseline's
    assert models.count("gpt-4o-mini") == 2  # the compiled program on the tuned model
    assert results_of(result)["plain_model"]["model"] == base


def test_the_train_pairs_are_written_as_the_program_sends_them(dspy_run, server, run_script):
    result = dspy_run(
        "--run", "--yes", "--optimizer", "labeled", "--train-limit", "3", "--test-limit", "1"
    )
    assert result.returncode == 0, result.output[-3000:]
    path = result.cwd / "outputs" / "dspy" / "finetune.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    data = [
        json.loads(line) for line in (result.cwd / "small_edu_qa.jsonl").read_text().splitlines()
    ]
    train = [row for row in data if row["split"] == "train"]
    assert len(records) == len(train) == 144  # every train pair, not only --train-limit's
    assert [r["id"] for r in records] == [row["id"] for row in train]
    assert {r["split"] for r in records} == {"train"}
    # the very system message and user template the program sent the server
    baseline = next(b for b in server.requests if question_of(b["messages"]) == SEASONS)
    first = records[0]["messages"]
    assert first[0] == baseline["messages"][0]
    assert first[1]["content"] == baseline["messages"][-1]["content"].replace(
        SEASONS, train[0]["question"]
    )
    assert first[2]["role"] == "assistant"
    assert train[0]["answer"] in first[2]["content"]
    assert first[2]["content"].startswith("[[ ## reasoning ## ]]")  # ChainOfThought's format
    assert "huggingface_lora.py --data" in flat(result.stdout)
    # an optimizer that only picks demos leaves the instructions: written in stage 3, once the
    # cost guard has passed and before the first call, so fine-tuning can start while it compiles
    out = flat(result.stdout)
    assert out.index("Stage 3/6") < out.index("wrote ") < out.index("Stage 4/6")
    # a file the fine-tuning API takes as it is
    check = run_script("openai_finetune.py", "--check-file", str(path), cwd=result.cwd)
    assert check.returncode == 0, check.output[-2000:]


@needs_serve
def test_prompt_weights_prompt_runs_end_to_end_on_a_tiny_model(tiny_folder, tmp_path):
    """make compare's "both" row in miniature: DSPy on the base model writes its train pairs as
    its program sends them; LoRA trains on that file as it is (train only) and merges; DSPy
    compiles again on the merged model, with the base model as the plain model and baseline.
    The tiny model's answers are noise: this checks the plumbing, not the result."""
    quick = ["--run", "--optimizer", "labeled", "--test-limit", "2", "--max-tokens", "8"]
    first = run_script_in(tmp_path, SCRIPT, "--serve", str(tiny_folder), *quick)
    assert first.returncode == 0, first.output[-3000:]
    exported = tmp_path / "outputs" / "dspy" / "finetune.jsonl"
    assert len(exported.read_text().splitlines()) == 144

    weights = run_script_in(
        tmp_path,
        "huggingface_lora.py",
        *("--model", str(tiny_folder), "--data", str(exported), "--test-limit", "0"),
        *("--max-steps", "2", "--max-length", "4096", "--lora-r", "4", "--merge", "--run"),
        *("--output-dir", "outputs/bt"),
        env={"HF_HUB_OFFLINE": "1"},
    )
    assert weights.returncode == 0, weights.output[-3000:]
    merged = tmp_path / "outputs" / "bt" / "huggingface" / "merged"
    assert (merged / "config.json").is_file()
    assert not (tmp_path / "outputs" / "bt" / "results").exists(), "train only: no results"

    args = ["--serve", str(merged), "--base-model", str(tiny_folder), *quick]
    again = run_script_in(tmp_path, SCRIPT, *args, "--results-name", "better-together")
    assert again.returncode == 0, again.output[-3000:]
    base = json.loads((tmp_path / "outputs" / "results" / "dspy.json").read_text())
    both = json.loads((tmp_path / "outputs" / "results" / "better-together.json").read_text())
    # the plain model and the baseline are the untuned model's, the very answers of the first
    # run (from the cache); the tuned answers come from the merged model
    for side in ("plain", "baseline"):
        assert [q[side] for q in both["questions"]] == [q[side] for q in base["questions"]]
    assert both["plain_model"]["model"] == base["plain_model"]["model"]
    assert "merged" in both["model"]
    assert both["lm_calls"]["plain"]["sent"] == both["lm_calls"]["baseline"]["sent"] == 0
    table = (tmp_path / "outputs" / "results" / "comparison.md").read_text()
    assert "both (BetterTogether)" in table and "DSPy (prompt)" in table
