"""The questions a script asks before it spends money, answered on a real terminal (a pty).

A paid step asks "Go ahead? [y/N]" on a terminal and refuses without one (piped stdin is no
terminal: tests/test_openai_finetune.py and tests/test_dspy_example.py check that refusal);
openai_finetune.py also asks whether to reuse a job it already started with the same data.
Here the script's stdin is a pseudo-terminal, and the test types the answer: yes, no, Enter, or
Ctrl-D (end of input), which must be a no, in one line, never a traceback.
"""

from __future__ import annotations

import os
import pty

import pytest
from conftest import ScriptResult, run_script_in
from fake_dspy_server import FakeChatServer
from fake_finetune_api import FakeAPI

KEY = "sk-test-" + "5e1d0c" * 6
CTRL_D = b"\x04"


def run_on_a_terminal(workdir, script: str, *args: str, keys: bytes, env: dict) -> ScriptResult:
    """Run a script whose stdin is a terminal on which `keys` have been typed."""
    terminal, script_side = pty.openpty()
    try:
        os.write(terminal, keys)  # the terminal holds typed lines until the script reads them
        return run_script_in(workdir, script, *args, env=env, stdin_fd=script_side, timeout=180)
    finally:
        os.close(script_side)
        os.close(terminal)


def one_error_line(result: ScriptResult) -> str:
    assert "Traceback" not in result.output, result.output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def finetune_api():
    fake = FakeAPI("openai", KEY).start()
    yield fake
    fake.stop()


@pytest.fixture
def chat_server():
    fake = FakeChatServer()
    fake.url = fake.start()
    yield fake
    fake.stop()


def finetune(workdir, fake: FakeAPI, *extra: str, keys: bytes) -> ScriptResult:
    args = ("--run", "--base-url", fake.base_url, "--poll-interval", "0.02", "--test-limit", "2")
    return run_on_a_terminal(
        workdir, "openai_finetune.py", *args, *extra, keys=keys, env={"OPENAI_API_KEY": KEY}
    )


def test_openai_paid_step_goes_ahead_when_the_user_types_y(finetune_api, tmp_path):
    result = finetune(tmp_path, finetune_api, keys=b"y\n")
    assert result.returncode == 0, result.output[-3000:]
    assert "Go ahead? [y/N]" in result.stdout
    assert len(finetune_api.jobs) == 1
    assert (tmp_path / "outputs" / "results" / "openai.json").is_file()


@pytest.mark.parametrize("keys", [b"n\n", b"\n", CTRL_D], ids=["n", "Enter", "Ctrl-D"])
def test_openai_paid_step_sends_nothing_unless_the_user_says_yes(finetune_api, tmp_path, keys):
    result = finetune(tmp_path, finetune_api, keys=keys)
    assert result.returncode == 2, result.output[-3000:]
    assert "not confirmed; nothing was sent" in one_error_line(result)
    assert finetune_api.requests == []


@pytest.mark.parametrize(
    "keys, jobs",
    [(b"y\n\n", 1), (b"y\nn\n", 2)],
    ids=["Enter reuses", "n starts another"],
)
def test_openai_asks_before_starting_a_second_job_for_the_same_data(
    finetune_api, tmp_path, keys, jobs
):
    first = finetune(tmp_path, finetune_api, "--yes", keys=b"")
    assert first.returncode == 0, first.output[-3000:]
    again = finetune(tmp_path, finetune_api, keys=keys)
    assert again.returncode == 0, again.output[-3000:]
    assert "Reuse it instead of starting (and paying for) a new one? [Y/n]" in again.stdout
    assert len(finetune_api.jobs) == jobs


def test_openai_ctrl_d_at_the_reuse_question_starts_nothing_new(finetune_api, tmp_path):
    first = finetune(tmp_path, finetune_api, "--yes", keys=b"")
    assert first.returncode == 0, first.output[-3000:]
    uploads = len(finetune_api.files)
    again = finetune(tmp_path, finetune_api, keys=b"y\n" + CTRL_D)
    assert again.returncode == 2, again.output[-3000:]
    assert "nothing new was started" in one_error_line(again)
    assert len(finetune_api.jobs) == 1 and len(finetune_api.files) == uploads


def dspy(workdir, server: FakeChatServer, *, keys: bytes) -> ScriptResult:
    args = ("--api-base", server.url, "--run", "--model", "openai/gpt-4o-mini")
    args += ("--optimizer", "labeled", "--test-limit", "1")
    env = {"OPENAI_API_KEY": "test", "HOME": str(workdir / "home")}
    return run_on_a_terminal(workdir, "dspy_example.py", *args, keys=keys, env=env)


def test_dspy_paid_step_goes_ahead_when_the_user_types_y(chat_server, tmp_path):
    result = dspy(tmp_path, chat_server, keys=b"y\n")
    assert result.returncode == 0, result.output[-3000:]
    assert "Go ahead? [y/N]" in result.stdout
    assert chat_server.count == 3  # the plain model, the baseline, the tuned program


@pytest.mark.parametrize("keys", [b"n\n", b"\n", CTRL_D], ids=["n", "Enter", "Ctrl-D"])
def test_dspy_paid_step_sends_nothing_unless_the_user_says_yes(chat_server, tmp_path, keys):
    result = dspy(tmp_path, chat_server, keys=keys)
    assert result.returncode == 2, result.output[-3000:]
    assert "not confirmed; nothing was sent" in one_error_line(result)
    assert chat_server.count == 0
