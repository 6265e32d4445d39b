"""Bad input at the edges, the same way in the three scripts: a path that is not a readable
file, an output folder that cannot be written, a flag value a library would choke on, text
that is not what it seems, Ctrl-C. Each ends with one line on stderr and exit 2 (130 for
Ctrl-C), no traceback, nothing half-written, and nothing hangs.

Most cases fail before any heavy import, so they run in this process through each script's
own run_cli(main, argv), which is what `python script.py ARGS` runs. What needs a process of
its own (a pipe that must not block, a file size limit, a signal) runs as one.
"""

from __future__ import annotations

import ast
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    DATA_FILE,
    REPO,
    SCRIPTS,
    child_env,
    load_script,
    run_script_in,
    start_script_in,
)

LINUX = sys.platform.startswith("linux")


@pytest.fixture(scope="module")
def modules():
    return {script: load_script(script) for script in SCRIPTS}


@pytest.fixture
def cli(modules, tmp_path, monkeypatch, capsys):
    """Run a script's main in this process, in tmp_path; return (exit code, stderr lines)."""
    monkeypatch.chdir(tmp_path)
    # The LoRA script sets this for a dry run; monkeypatch puts the old value back after.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def run(script: str, *args: str) -> tuple[int, list[str]]:
        module = modules[script]
        code = module.run_cli(module.main, ["--output-dir", str(tmp_path / "out"), *args])
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        return code, [line for line in err.splitlines() if line.strip()]

    return run


def assert_one_error(code: int, lines: list[str], pattern: str) -> None:
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert re.match(r"error: " + pattern, lines[0]), lines[0]


def written_files(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file()] if folder.exists() else []


def unreadable_file(tmp_path: Path) -> str:
    """A path this process may not open for reading, or a skip saying why there is none."""
    if os.geteuid() != 0:
        path = tmp_path / "secret.jsonl"
        path.write_text('{"question": "q", "answer": "a"}\n')
        path.chmod(0)
        return str(path)
    # Root reads any file, except what the kernel itself refuses (ptrace or sysctl rules).
    for candidate in ("/proc/1/mem", "/proc/sys/vm/compact_memory"):
        try:
            with open(candidate, "rb"):
                pass
        except PermissionError:
            return candidate
        except OSError:
            continue
    pytest.skip("running as root, and no file here that root may not read")


# ------------------------------------------------------------------ a user's file to read
def data_cases(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """case: (the --data value, the pattern of the error line after 'error: ')."""
    folder = tmp_path / "a_folder"
    folder.mkdir()
    long_line = tmp_path / "long.jsonl"
    with long_line.open("w") as handle:
        handle.write('{"question": "q?", "answer": "' + "a" * (2**24 + 10) + '"}\n')
    surrogate = tmp_path / "surrogate.jsonl"
    surrogate.write_text('{"question": "What is \\ud83d?", "answer": "A half."}\n')
    not_utf8 = tmp_path / "latin1.jsonl"
    not_utf8.write_bytes(b'{"question": "q?", "answer": "a"}\n{"question": "caf\xe9?"}\n')
    deep = tmp_path / "deep.jsonl"
    deep.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    huge_number = tmp_path / "number.jsonl"
    huge_number.write_text('{"question": "q?", "answer": ' + "9" * 5000 + "}\n")
    return {
        "a folder": (str(folder), r"\S*a_folder is a folder; pass --data the path of a file"),
        "an empty path": ("", r"--data: empty path \(an unset shell variable\?\) \(see --help\)"),
        "a line over 16 MiB": (str(long_line), r"long\.jsonl:1: a line longer than 16 MiB"),
        "a lone surrogate": (
            str(surrogate),
            r'surrogate\.jsonl:1: "question" holds a lone surrogate escape',
        ),
        "invalid UTF-8": (
            str(not_utf8),
            r"latin1\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 18\)",
        ),
        "nested too deeply": (str(deep), r"deep\.jsonl:1: not valid JSON \(nested too deeply\)"),
        "a 5000-digit number": (str(huge_number), r"number\.jsonl:1: not valid JSON \(.*digits"),
    }


DATA_CASES = [
    "a folder",
    "an empty path",
    "a line over 16 MiB",
    "a lone surrogate",
    "invalid UTF-8",
    "nested too deeply",
    "a 5000-digit number",
]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", DATA_CASES)
def test_a_data_path_that_is_not_good_text_is_one_line_exit_2(script, case, cli, tmp_path):
    value, pattern = data_cases(tmp_path)[case]
    code, lines = cli(script, "--data", value)
    assert_one_error(code, lines, pattern)
    assert written_files(tmp_path / "out") == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unreadable_data_file_is_one_line_naming_it(script, cli, tmp_path):
    path = unreadable_file(tmp_path)
    code, lines = cli(script, "--data", path)
    assert_one_error(code, lines, re.escape(path) + r": cannot read it \(permission denied\)")


@pytest.mark.skipif(not Path("/proc/self/mem").exists(), reason="needs Linux's /proc")
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_data_file_whose_read_fails_is_one_line_naming_it(script, cli):
    # /proc/self/mem opens, then its first read fails (address 0 is never mapped): EIO.
    code, lines = cli(script, "--data", "/proc/self/mem")
    assert_one_error(code, lines, r"/proc/self/mem: cannot read it \(Input/output error\)")


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_file_starting_with_a_byte_order_mark_is_read_as_utf8(script, modules, tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + DATA_FILE.read_bytes())
    examples = modules[script].load_examples(path)
    assert examples[0]["question"] == "What causes the seasons on Earth?"
    assert examples[0]["id"] == "earth-001"


def test_check_file_refuses_a_byte_order_mark_since_the_file_is_uploaded_as_is(cli, tmp_path):
    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = tmp_path / "chat.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(good) + "\n").encode() * 12)
    code, lines = cli("openai_finetune.py", "--check-file", str(path))
    assert_one_error(code, lines, r"chat\.jsonl:1: the file starts with a UTF-8 byte-order mark")


@pytest.mark.parametrize(
    "script, flag",
    [
        ("dspy_example.py", "--load"),
        ("openai_finetune.py", "--check-file"),
    ],
)
def test_a_folder_given_for_another_file_flag_says_so(script, flag, cli, tmp_path):
    (tmp_path / "a_folder").mkdir()
    code, lines = cli(script, flag, str(tmp_path / "a_folder"))
    assert_one_error(code, lines, rf"\S*a_folder is a folder; pass {flag} the path of a file")


STREAMS = [(script, "--data") for script in SCRIPTS] + [
    ("dspy_example.py", "--load"),
    ("openai_finetune.py", "--check-file"),
]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
@pytest.mark.parametrize("script, flag", STREAMS)
def test_a_pipe_with_no_writer_is_refused_at_once_not_waited_on(script, flag, tmp_path):
    os.mkfifo(tmp_path / "pipe")
    # A real process: opening a pipe for reading normally blocks until someone writes to it.
    result = run_script_in(tmp_path, script, flag, "pipe", "--output-dir", "out", timeout=60)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert_one_error(result.returncode, lines, r"pipe is a pipe, not a file: it may never end")


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
@pytest.mark.parametrize("script", SCRIPTS)
def test_a_device_that_never_ends_is_refused_not_read_until_memory_runs_out(script, cli):
    code, lines = cli(script, "--data", "/dev/zero")
    assert_one_error(code, lines, r"/dev/zero is a device or a socket, not a file")


def test_check_file_of_a_missing_file_says_file_not_found(cli, tmp_path):
    code, lines = cli("openai_finetune.py", "--check-file", str(tmp_path / "nowhere.jsonl"))
    assert_one_error(code, lines, r"\S*nowhere\.jsonl: file not found")


# ------------------------------------------------------------ a folder to write to
@pytest.mark.parametrize("script", SCRIPTS)
def test_an_output_dir_that_cannot_be_written_is_one_line_before_any_stage(
    script, modules, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "a_file").write_text("not a folder")
    cases = [
        ("a_file", r"a_file is a file, not a folder; pick another --output-dir"),
        ("a_file/results", r"a_file/results: cannot write \(Not a directory\); a file is in"),
    ]
    if LINUX and Path("/sys").is_dir():
        # sysfs refuses new folders, to root too.
        cases.append(
            (
                "/sys/utta-outputs",
                r"/sys/utta-outputs: cannot write \((Operation not permitted|Permission denied)\)",
            )
        )
    module = modules[script]
    for folder, pattern in cases:
        code = module.run_cli(module.main, ["--output-dir", folder, "--data", str(DATA_FILE)])
        captured = capsys.readouterr()
        lines = [line for line in captured.err.splitlines() if line.strip()]
        assert_one_error(code, lines, pattern)
        assert "Stage 1/6" not in captured.out, "a stage ran before the folder was checked"
    assert (tmp_path / "a_file").read_text() == "not a folder"


def run_with_file_size_limit(tmp_path: Path, script: str, limit: int, *args: str):
    """Run a script whose writes fail past `limit` bytes per file, as on a full disk."""
    shutil.copy(REPO / script, tmp_path / script)

    def limit_writes():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, script, "--data", str(DATA_FILE), *args],
        cwd=tmp_path,
        env=child_env({"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}),
        preexec_fn=limit_writes,  # Python ignores SIGXFSZ, so a write past it raises EFBIG
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_disk_that_takes_nothing_more_stops_the_dry_run_before_stage_1(script, tmp_path):
    result = run_with_file_size_limit(tmp_path, script, 1024)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert_one_error(result.returncode, lines, r"outputs: cannot write \(File too large\)")
    assert "Stage 1/6" not in result.stdout
    assert written_files(tmp_path / "outputs") == []


def test_a_disk_that_fills_up_midway_leaves_nothing_half_written(tmp_path):
    # The probe (4 KiB) passes; stage 2's ~60 KB training file does not.
    result = run_with_file_size_limit(tmp_path, "openai_finetune.py", 32 * 1024)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert_one_error(
        result.returncode,
        lines,
        r"\S*openai_edu_qa_training\.jsonl: cannot write \(File too large\); the file is over",
    )
    assert "Stage 2/6" in result.stdout
    assert written_files(tmp_path / "outputs") == []  # neither the file nor its temporary


# ------------------------------------------------------------------------ flag values
SHARED_FLAGS = {
    "nan cost": (["--max-cost", "nan"], r"--max-cost: must be a finite number, got nan"),
    "infinite cost": (["--max-cost", "inf"], r"--max-cost: must be a finite number, got inf"),
    "negative seed": (["--seed", "-1"], r"--seed: must be at least 0, got -1"),
    "seed numpy refuses": (["--seed", str(2**32)], r"--seed: must be at most 4294967295"),
    "limit not a number": (["--train-limit", "ten"], r"--train-limit: expected a whole number"),
    "empty model": (["--model", ""], r"--model: empty value \(an unset shell variable\?\)"),
    "empty question": (["--ask", " "], r"--ask: empty value"),
    "empty output dir": (["--output-dir", ""], r"--output-dir: empty path"),
    "mistyped flag": (
        ["--train-limt", "3"],
        r"unknown flag --train-limt; did you mean --train-limit\?",
    ),
    "flag without its value": (["--test-limit"], r"--test-limit: expected one argument"),
}
OWN_FLAGS = {
    "huggingface_lora.py": {
        "no target modules": (["--target-modules", ""], r"--target-modules: empty value"),
        "only commas": (["--target-modules", ",,"], r"--target-modules: no module names"),
        "dropout 2": (["--lora-dropout", "2"], r"--lora-dropout: must be below 1, got 2"),
        "nan epochs": (["--epochs", "nan"], r"--epochs: must be a finite number"),
        "infinite epochs": (["--epochs", "inf"], r"--epochs: must be a finite number"),
        "nan eval fraction": (["--eval-fraction", "nan"], r"--eval-fraction: must be a finite"),
        "nan learning rate": (["--learning-rate", "nan"], r"--learning-rate: must be a finite"),
    },
    "openai_finetune.py": {
        "zero epochs": (["--epochs", "0"], r"--epochs: must be at least 1, got 0"),
        "zero batch size": (["--batch-size", "0"], r"--batch-size: must be at least 1, got 0"),
        "fractional batch size": (["--batch-size", "2.5"], r"--batch-size: expected a whole"),
        "zero multiplier": (
            ["--learning-rate-multiplier", "0"],
            r"--learning-rate-multiplier: must be more than 0, got 0",
        ),
        "nan multiplier": (
            ["--learning-rate-multiplier", "nan"],
            r"--learning-rate-multiplier: must be a finite",
        ),
        "infinite multiplier": (
            ["--learning-rate-multiplier", "inf"],
            r"--learning-rate-multiplier: must be a finite",
        ),
        "nan poll interval": (["--poll-interval", "nan"], r"--poll-interval: must be a finite"),
        "endless poll interval": (["--poll-interval", "1e300"], r"--poll-interval: must be at"),
        "base URL without scheme": (
            ["--base-url", "localhost:8000/v1"],
            r"--base-url localhost:8000/v1: not an http\(s\) URL",
        ),
    },
    "dspy_example.py": {
        "nan temperature": (["--temperature", "nan"], r"--temperature: must be a finite"),
        "nan threshold": (["--metric-threshold", "nan"], r"--metric-threshold: must be a finite"),
        "no threads": (["--threads", "0"], r"--threads: must be at least 1, got 0"),
    },
}
FLAG_CASES = [(s, c) for s in SCRIPTS for c in SHARED_FLAGS] + [
    (s, c) for s, cases in OWN_FLAGS.items() for c in cases
]


@pytest.mark.parametrize("script, case", FLAG_CASES)
def test_a_bad_flag_value_is_one_line_pointing_at_help(script, case, cli):
    args, pattern = SHARED_FLAGS.get(case) or OWN_FLAGS[script][case]
    code, lines = cli(script, *args)
    assert_one_error(code, lines, pattern + r".* \(see --help\)$")


def test_a_base_url_without_its_trailing_slash_is_joined_right(run_script):
    result = run_script(
        "openai_finetune.py", "--base-url", "http://localhost:8000/v1", "--train-limit", "20"
    )
    assert result.returncode == 0, result.output[-2000:]
    assert "POST http://localhost:8000/v1/files" in result.stdout
    assert "v1files" not in result.stdout and "v1chat" not in result.stdout


# ------------------------------------------------------------------ over-long examples
def long_data(tmp_path: Path, positions: range) -> Path:
    """The shared data with a 300,000-character answer in these train pairs (0 = the first)."""
    rows = [json.loads(line) for line in DATA_FILE.read_text(encoding="utf-8").splitlines()]
    train = [row for row in rows if row["split"] == "train"]
    for index in positions:
        train[index]["answer"] = "The answer goes on. " * 15_000
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


LONG_CASES = {
    # every one of the first 20 is long, so the validation file (2 of them) has some too
    "openai_finetune.py": (
        range(20),
        ["--train-limit", "20"],
        [
            r"training file: 18 example\(s\) over the 65,536-token limit \(\S+.*\): fine-tuning"
            r" truncates each to the limit",
            r"validation file: 2 example\(s\) over the 65,536-token limit",
        ],
    ),
    "huggingface_lora.py": (
        range(1),
        ["--train-limit", "10", "--eval-fraction", "0"],
        [
            r"1 training and 0 held-out examples are longer than --max-length 512 tokens, "
            r"estimated at ~4 characters per token \(bio-001\): a run leaves them out",
        ],
    ),
    "dspy_example.py": (
        range(1),
        [],
        [
            r"the tuned prompt is about [\d,]+ tokens, over openai/gpt-4o-mini's 128,000-token "
            r"context window: the provider would refuse every compiled call\. The longest demo "
            r"is training pair bio-001",
        ],
    ),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_dry_run_names_over_long_examples_and_what_will_happen_to_them(script, tmp_path):
    positions, args, patterns = LONG_CASES[script]
    data = long_data(tmp_path, positions)
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "COLUMNS": "1000"}
    result = run_script_in(tmp_path, script, "--data", str(data), *args, env=env)
    assert result.returncode == 0, result.output[-3000:]
    for pattern in patterns:
        assert re.search(pattern, result.stdout), pattern
    # The long answers are shown clipped, not printed whole.
    assert len(result.stdout) < 100_000, len(result.stdout)
    if script == "huggingface_lora.py":
        # The plan (steps, tokens, time) counts only what a real run would train on.
        longest = re.search(
            r"estimated tokens per example: min \d+, median \d+, max (\d+)", result.stdout
        )
        assert longest and int(longest.group(1)) <= 512, result.stdout[-3000:]


# ------------------------------------------------------------------------------ Ctrl-C
@pytest.mark.parametrize("script", SCRIPTS)
def test_interrupts_held_raises_once_the_block_is_done(script, modules):
    module = modules[script]
    reached = []
    with pytest.raises(KeyboardInterrupt), module.interrupts_held():
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("after the signal")  # a Ctrl-C here would skip this line
    assert reached == ["after the signal"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("script", SCRIPTS)
def test_sigterm_is_ctrl_c_with_exit_143_held_like_it_and_says_the_same(script, modules, capsys):
    module = modules[script]
    reached = []

    def held(argv):  # SIGTERM inside a held block (an import of native code): acted on after
        with module.interrupts_held():
            os.kill(os.getpid(), signal.SIGTERM)
            reached.append("after the signal")

    def knows_better(argv):  # a stage's own advice, raised from its `except KeyboardInterrupt`
        try:
            signal.raise_signal(signal.SIGTERM)  # acted on before it returns
        except KeyboardInterrupt:
            raise KeyboardInterrupt("kept this; do that to resume") from None

    def ctrl_c(argv):
        signal.raise_signal(signal.SIGINT)

    def unhandled(signum, frame):  # without run_cli's handler: a failed test, not a dead pytest
        pass

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        assert module.run_cli(held, []) == 143
        assert reached == ["after the signal"]
        assert module.run_cli(knows_better, []) == 143
        assert module.run_cli(ctrl_c, []) == 130  # a later run's Ctrl-C is still 130
        assert signal.getsignal(signal.SIGTERM) is unhandled  # run_cli put it back
    finally:
        signal.signal(signal.SIGTERM, previous)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == [
        "interrupted: nothing half-written was kept; run the same command to resume",
        "interrupted: kept this; do that to resume",
        "interrupted: nothing half-written was kept; run the same command to resume",
    ]


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_ignored_ctrl_c_stays_ignored_through_interrupts_held(script, modules):
    # a background job of a shell without job control: Ctrl-C is for the foreground job
    module = modules[script]
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with module.interrupts_held():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize(
    "script, stage",
    [(script, 1) for script in SCRIPTS] + [("huggingface_lora.py", 3)],
)
def test_ctrl_c_during_a_dry_run_is_130_with_how_to_resume(script, stage, tmp_path):
    proc = start_script_in(
        tmp_path,
        script,
        env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
    )
    # Wait for the stage's header, then press Ctrl-C while its work (imports included) runs.
    for line in proc.stdout:
        if f"Stage {stage}/6" in line:
            break
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode in (130, 0), stderr
    if proc.returncode == 0:
        pytest.skip("the dry run ended before the signal arrived")
    assert "Traceback" not in stderr and "terminate called" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines == [
        "interrupted: nothing half-written was kept; run the same command to resume"
    ], stderr


# ----------------------------------------------------------------- one copy of each helper
SHARED = [
    "CommandLine",
    "number",
    "text_arg",
    "path_arg",
    "read_error",
    "open_user_file",
    "read_lines",
    "json_line",
    "write_error",
    "check_output_dir",
    "write_atomic",
    "load_examples",
    "clip",
    "interrupts_held",
    "run_cli",
]


def test_the_new_shared_helpers_are_the_same_text_in_every_script():
    sources = {}
    for script in SCRIPTS:
        text = (REPO / script).read_text(encoding="utf-8")
        nodes = {
            getattr(node, "name", None) or ast.unparse(node.targets[0]): node
            for node in ast.parse(text).body
            if isinstance(node, ast.FunctionDef | ast.ClassDef | ast.Assign)
        }
        sources[script] = {name: ast.get_source_segment(text, nodes[name]) for name in SHARED}
    first = sources[SCRIPTS[0]]
    for script in SCRIPTS[1:]:
        for name in SHARED:
            assert sources[script][name] == first[name], f"{name} differs in {script}"
