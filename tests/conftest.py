"""Fixtures every test file shares.

- `network_guard` (autouse): no test may reach past loopback, neither in the pytest process
  nor in any process a test starts. An attempt is refused and fails the test.
- `server`, `dspy_run`: the DSPy tests' fake chat server, and dspy_example.py run against it.
- `run_script`: runs one of the three scripts as a real process in a temporary directory, the
  way a user runs a copied script, and returns its exit code, stdout and stderr.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NETBLOCK_DIR = Path(__file__).resolve().parent / "netblock"
DATA_FILE = REPO / "small_edu_qa.jsonl"
SCRIPTS = ("dspy_example.py", "openai_finetune.py", "huggingface_lora.py")


def _load_netblock():
    spec = importlib.util.spec_from_file_location("_netblock", NETBLOCK_DIR / "sitecustomize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_netblock = _load_netblock()

# The suite runs many torch processes at once on a few cores (a script, the server it talks to,
# pytest itself). Spinning OpenMP threads would take the time slices the working ones need;
# sleeping ones (the LoRA script's own default) keep a busy CI machine fast.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# A shell without job control (CI, a script running `make test &`) starts a background job with
# SIGINT ignored, and an ignored signal stays ignored in every process it starts: the tests'
# Ctrl-C would reach no script. A handled signal is reset to the default in a child instead, and
# the child's Python turns that into KeyboardInterrupt as under a terminal. Fixed here, not in the
# scripts: they leave an ignored SIGINT ignored, as a background job expects, and stop on SIGTERM.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Variables that would let a script reach a real service or read a developer's real keys. The
# proxy variables matter as much: a proxy on loopback passes the block's loopback rule and would
# carry the traffic out.
_SECRET_OR_ROUTING_VARS = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "OPENAI_ORG_ID",
    "OPENAI_PROJECT_ID",
    "ANTHROPIC_API_KEY",
    "MISTRAL_API_KEY",
    "AZURE_OPENAI_API_KEY",
    "AZURE_OPENAI_ENDPOINT",
    "NEBIUS_API_KEY",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    *_netblock.PROXY_VARS,
)


# The files whose tests take minutes run first, longest first: `make test` gives each file to
# one of its workers in collection order, and a long file collected late runs alone at the end
# while the other workers have nothing left to do (the real LoRA run, 5 min, once did; in the
# last fresh-clone run the load fell from 3 to 1.2 in its last two minutes). Worker
# seconds measured with --durations (2026-12-07, 2 AMD EPYC cores, since a fork's exit skips the
# interpreter's teardown): about 350, 280, 260, 240 (one test: the real LoRA run), 170, 120.
SLOW_FIRST = (
    "test_dspy_local.py",
    "test_huggingface_lora.py",
    "test_dspy_example.py",
    "test_real_lora.py",
    "test_benches.py",
    "test_openai_finetune.py",
)


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: each file keeps its own order


# Processes started from module- or session-scoped fixtures run before any test's own guard
# exists; they report here, and the session fails at its end if anything was attempted.
SESSION_LOG = Path(tempfile.mkdtemp(prefix="netblock-session-")) / "attempts.log"


@pytest.fixture(scope="session", autouse=True)
def session_network_guard():
    yield
    if SESSION_LOG.exists() and SESSION_LOG.read_text(encoding="utf-8").strip():
        pytest.fail(
            "network access past loopback was attempted by a process started from a shared "
            "fixture:\n" + SESSION_LOG.read_text(encoding="utf-8")
        )


class NetworkGuard:
    """What the block saw during one test (this process and its children)."""

    def __init__(self, log_path: Path):
        self.log_path = log_path
        self._expected = False

    def attempts(self) -> list[str]:
        if not self.log_path.exists():
            return []
        return self.log_path.read_text(encoding="utf-8").splitlines()

    def expect_attempts(self) -> None:
        """For the test that proves the block works: attempts are the point, not a failure."""
        self._expected = True


@pytest.fixture(autouse=True)
def network_guard(tmp_path_factory, monkeypatch):
    log_path = tmp_path_factory.mktemp("netblock") / "attempts.log"
    monkeypatch.setenv("NETBLOCK_LOG", str(log_path))
    # Offline switches a user would set on a plane; the scripts must also cope without them.
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("DO_NOT_TRACK", "1")
    for name in _SECRET_OR_ROUTING_VARS:
        monkeypatch.delenv(name, raising=False)
    originals = _netblock.install(str(log_path))
    guard = NetworkGuard(log_path)
    try:
        yield guard
    finally:
        _netblock.uninstall(originals)
    if not guard._expected and guard.attempts():
        pytest.fail("network access past loopback was attempted:\n" + "\n".join(guard.attempts()))


def load_script(script: str):
    """Import one of the scripts as a module (under a test-only name), for its functions."""
    spec = importlib.util.spec_from_file_location(script[:-3] + "_under_test", REPO / script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@dataclass
class ScriptResult:
    returncode: int
    stdout: str
    stderr: str
    cwd: Path

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def child_env(extra: dict | None = None) -> dict:
    """The environment of a process a test starts: blocked network, no real keys."""
    env = dict(os.environ)
    env.setdefault("NETBLOCK_LOG", str(SESSION_LOG))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(NETBLOCK_DIR), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "120"  # rich wraps tables at the terminal width; make it predictable
    env.pop("FORCE_COLOR", None)
    for name in _SECRET_OR_ROUTING_VARS:
        env.pop(name, None)
    env.update(extra or {})
    return env


def copy_into(workdir: Path, script: str, copy_data: bool) -> None:
    """The script, and by default the shared data file, in `workdir`, as a user copies them."""
    workdir.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / script, workdir / script)
    if copy_data and DATA_FILE.exists() and not (workdir / DATA_FILE.name).exists():
        shutil.copy(DATA_FILE, workdir / DATA_FILE.name)


def start_script_in(
    workdir: Path,
    script: str,
    *args: str,
    env: dict | None = None,
    copy_data: bool = True,
    launcher: list[str] | None = None,
    stdin_pipe: bool = False,
    stdin_fd: int | None = None,
) -> subprocess.Popen:
    """Copy a script (and, by default, the shared data file) into `workdir` and start it there.

    For tests that must act while it runs (send Ctrl-C, watch a checkpoint appear). `stdin_fd`
    gives it a terminal of the test's own (a pty) to answer prompts on."""
    copy_into(workdir, script, copy_data)
    return subprocess.Popen(
        [*(launcher or [sys.executable]), script, *args],
        cwd=workdir,
        env=child_env(env),
        # Never the developer's terminal: a script must see "no terminal" unless a test
        # gives it input, so paid-step prompts refuse the same way here as in CI.
        stdin=stdin_fd
        if stdin_fd is not None
        else subprocess.PIPE
        if stdin_pipe
        else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_script_in(
    workdir: Path,
    script: str,
    *args: str,
    input: str | None = None,
    timeout: float = 300,
    **options,
) -> ScriptResult:
    """Start a script in `workdir` (see start_script_in) and wait for it to finish.

    The scripts run as a fork of a process that has imported their heavy libraries already
    (tests/zygote.py: the same script, argv, directory, environment and streams, 5 to 11 s less
    a run for DSPy's and OpenAI's, the torch import less for the LoRA script's)."""
    if forkable(script, options) and os.name == "posix":
        return run_forked(workdir, script, *args, input=input, timeout=timeout, **options)
    proc = start_script_in(workdir, script, *args, stdin_pipe=input is not None, **options)
    try:
        stdout, stderr = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return ScriptResult(proc.returncode, stdout, stderr, workdir)


# ----- a script forked from a process that imported its libraries once (tests/zygote.py)

# What each script imports that takes seconds: LiteLLM (DSPy's client), the similarity score's
# torch and transformers, the OpenAI SDK; and what every run that reaches stage 6 imports, the
# chart's matplotlib and the ROUGE-L scorer (1.5 of the 4.6 s a DSPy run takes once forked).
STAGE_6 = ["matplotlib.pyplot", "rouge_score.rouge_scorer"]
PRELOAD = {
    "dspy_example.py": ["dspy", "litellm", "torch", "transformers", *STAGE_6],
    "openai_finetune.py": ["openai", "torch", "transformers", *STAGE_6],
    # Not the Hugging Face libraries: the script sets the hub's variables before it imports
    # them, and they read them at import (huggingface_hub's constants, HF_HOME from HOME).
    # bitsandbytes reads none and imports none of them, but torch's compiler (torch._dynamo,
    # sympy): 3.5 of the 8 s of a dry run on the tiny model, which peft imports through it.
    "huggingface_lora.py": ["torch", "bitsandbytes", *STAGE_6],
}
# Read once, as a process starts: Python's own (PYTHONPATH, the encodings, the locale), and
# OpenMP's, which its runtime takes when the zygote imports torch.
READ_AT_START = re.compile(r"PYTHON|LANG$|LC_|(OMP|GOMP|KMP|MKL)_")


def forkable(script: str, options: dict) -> bool:
    """Whether a run can be a fork of the zygote: not under a launcher (torchrun), and not with
    a variable of its own that a process reads as it starts (a fork has started already)."""
    if script not in PRELOAD or options.get("launcher"):
        return False
    return not any(map(READ_AT_START.match, options.get("env") or {}))


_zygotes: dict = {}  # this pytest process's zygotes, by script: (Popen, socket path)


def zygote_socket(script: str) -> str:
    """Start this process's zygote for `script` on first use; return its socket's path."""
    proc, path = _zygotes.get(script, (None, None))
    if proc is None or proc.poll() is not None:
        folder = Path(tempfile.mkdtemp(prefix="zygote-"))
        path = str(folder / "socket")
        log = (folder / "zygote.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("zygote.py")), path, *PRELOAD[script]],
            env=child_env({"HOME": str(folder)}),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"tests/zygote.py did not start; see {log.name}")
        atexit.register(proc.kill)  # it would wait for the next run forever
        atexit.register(shutil.rmtree, folder, True)
        _zygotes[script] = (proc, path)
    return path


def run_forked(
    workdir: Path,
    script: str,
    *args: str,
    input: str | None = None,
    timeout: float = 300,
    env: dict | None = None,
    copy_data: bool = True,
    stdin_fd: int | None = None,
) -> ScriptResult:
    """run_script_in's way for the scripts in PRELOAD: the zygote forks, the child runs it."""
    import array
    import json
    import socket
    import threading

    copy_into(workdir, script, copy_data)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    in_r, in_w = os.pipe() if input is not None else (None, None)
    stdin = stdin_fd if stdin_fd is not None else in_r
    devnull = os.open(os.devnull, os.O_RDONLY) if stdin is None else None
    request = {"argv": [script, *args], "cwd": str(workdir), "env": child_env(env)}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(zygote_socket(script))
    fds = array.array("i", [devnull if stdin is None else stdin, out_w, err_w])
    conn.sendmsg(
        [json.dumps(request).encode() + b"\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)]
    )
    for fd in (out_w, err_w, in_r, devnull):
        if fd is not None:
            os.close(fd)
    if in_w is not None:
        with os.fdopen(in_w, "w") as pipe:
            pipe.write(input)
    reply = conn.makefile("r")
    pid = int(reply.readline().split()[1])
    streams = {}

    def drain(name: str, fd: int) -> None:
        with os.fdopen(fd, "r", encoding="utf-8", errors="replace") as pipe:
            streams[name] = pipe.read()

    pipes = (("out", out_r), ("err", err_r))
    readers = [threading.Thread(target=drain, args=pipe) for pipe in pipes]
    for reader in readers:
        reader.start()
    conn.settimeout(timeout)
    try:
        code = int(reply.readline().split()[1])
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        raise subprocess.TimeoutExpired([script, *args], timeout) from None
    finally:
        for reader in readers:
            reader.join()
        conn.close()
    return ScriptResult(code, streams["out"], streams["err"], workdir)


@pytest.fixture
def run_script(tmp_path):
    """Run a script as a real process in the test's temporary directory.

    `run_script("openai_finetune.py", "--run", env={...}, input="y\\n")` returns a ScriptResult.
    The working directory is the temporary directory, so `outputs/` and any `.env` land there;
    `cwd=` picks another one.
    """

    def run(script: str, *args: str, cwd: Path | None = None, **options) -> ScriptResult:
        return run_script_in(cwd or tmp_path, script, *args, **options)

    return run


# The two fixtures of the DSPy test files: a fresh fake chat server per test (fake_dspy_server.py),
# and dspy_example.py run against it (a key and a home directory of its own; key=None: no key).
@pytest.fixture
def server():
    from fake_dspy_server import FakeChatServer

    fake = FakeChatServer()
    fake.url = fake.start()
    yield fake
    fake.stop()


@pytest.fixture
def dspy_run(run_script, server, tmp_path):
    """Run dspy_example.py against the fake server, with a key and a home directory of its own."""

    def run(*args: str, key: str | None = "test", env: dict | None = None):
        env = {"HOME": str(tmp_path / "home"), **(env or {})}
        if key is not None:
            env["OPENAI_API_KEY"] = key
        return run_script("dspy_example.py", "--api-base", server.url, *args, env=env)

    return run
