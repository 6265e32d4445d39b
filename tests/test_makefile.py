"""`make compare`'s recipe: the order of its steps, the step that runs in the background, reuse.

The recipe itself is under test, not the scripts (their own tests run them): the Makefile and
the requirements files are copied into a temporary folder whose `.venv/bin/python` is a
stand-in. It logs each call with its time, sleeps a little, and writes the file the real step
would write, which is all the recipe looks at. A step fails when the test asks it to.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import REPO

# What each step writes, as make compare's recipe names it (the file that marks it done).
STAND_IN = textwrap.dedent(
    f"""\
    #!{sys.executable}
    import os, sys, time
    from pathlib import Path

    script, args = sys.argv[1], " ".join(sys.argv[2:])
    step = (
        "bt-weights" if "--merge" in args
        else "better-together" if "better-together" in args
        else script.split("_")[0].replace("huggingface", "lora")
    )
    log = Path("calls.log")
    def note(what):
        with log.open("a") as out:
            wait = os.environ.get("OMP_WAIT_POLICY", "-")
            out.write(f"{{time.monotonic():.3f}} {{what}} {{step}} {{os.getpid()}} {{wait}}\\n")
    note("start")
    cmp = Path("outputs/compare")
    def write(path, text="{{}}"):
        (cmp / path).parent.mkdir(parents=True, exist_ok=True)
        (cmp / path).write_text(text)
    if step == "dspy":
        write("dspy/finetune.jsonl", "{{}}\\n")  # stage 3: the train pairs, early
    print(f"{{step}} says hello", flush=True)
    time.sleep(float(os.environ.get(step.upper().replace("-", "_") + "_SECONDS", "0.2")))
    if os.environ.get("FAIL") == step:
        print(f"{{step}} failed here", flush=True)
        sys.exit(3)
    files = {{
        "lora": "results/huggingface.json",
        "dspy": "results/dspy.json",
        "bt-weights": "bt/huggingface/merged/config.json",
        "better-together": "results/better-together.json",
    }}
    if step in files:
        write(files[step])
    note("end")
    """
)


@pytest.fixture
def project(tmp_path):
    for name in ("Makefile", "requirements.txt", "requirements-models.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(STAND_IN)
    python.chmod(0o755)
    # installed already: the stamp is the requirements as last installed
    stamp = (tmp_path / "requirements.txt").read_text()
    stamp += (tmp_path / "requirements-models.txt").read_text()
    (tmp_path / ".venv" / ".installed-requirements").write_text(stamp)
    return tmp_path


def make_compare(project: Path, **env: str) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    return subprocess.Popen(
        ["make", "--no-print-directory", "compare"],
        cwd=project,
        env={**environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives it
    )


def calls(project: Path) -> dict[str, dict]:
    """step -> {"start": t, "end": t, "pid": n, "wait": OMP_WAIT_POLICY} from the stand-in's log."""
    found: dict[str, dict] = {}
    for line in (project / "calls.log").read_text().splitlines():
        when, what, step, pid, wait = line.split()
        found.setdefault(step, {})[what] = float(when)
        found[step]["pid"], found[step]["wait"] = int(pid), wait
    return found


def alive(pid: int) -> bool:
    """Running, and not a zombie left for a parent that is gone (in a container, PID 1 may
    never reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make here")


@needs_make
def test_bt_weights_trains_beside_dspy_and_a_second_run_reuses_every_step(project):
    proc = make_compare(project, DSPY_SECONDS="14", BT_WEIGHTS_SECONDS="3")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    seen = calls(project)
    order = sorted(seen, key=lambda step: seen[step]["start"])
    assert order == ["lora", "dspy", "bt-weights", "better-together", "openai"], seen
    # bt-weights starts once dspy has written its train pairs (it looks every 5 s), and trains
    # while dspy answers
    assert seen["bt-weights"]["start"] < seen["dspy"]["end"]
    # the prompt-weights-prompt step needs the tuned weights, not the end of step dspy: it runs
    # beside the rest of it
    assert seen["bt-weights"]["end"] < seen["better-together"]["start"] < seen["dspy"]["end"]
    assert seen["openai"]["start"] > max(seen["dspy"]["end"], seen["better-together"]["end"])
    # what the background steps printed is shown, after dspy's own output
    assert out.index("dspy says hello") < out.index("bt-weights says hello")
    assert out.index("bt-weights says hello") < out.index("better-together says hello")
    assert re.search(r"== bt-weights, better-together done \d+ s after step dspy began", out)
    assert (project / "outputs/compare/both.log").read_text().startswith("== bt-weights")
    # torch's threads spin only in the step that has the cores to itself
    assert {step: seen[step]["wait"] for step in order} == {
        "lora": "ACTIVE", "dspy": "PASSIVE", "bt-weights": "PASSIVE",
        "better-together": "PASSIVE", "openai": "PASSIVE",
    }  # fmt: skip
    # both LoRA runs train with the same settings
    lora_flags = [line for line in out.splitlines() if "huggingface_lora.py" in line]
    assert len(lora_flags) == 2 and all("--epochs 2" in line for line in lora_flags), lora_flags

    (project / "calls.log").unlink()
    again = make_compare(project)
    out, _ = again.communicate(timeout=60)
    assert again.returncode == 0, out
    assert list(calls(project)) == ["openai"], "only the estimate row runs again"
    for step in ("huggingface", "dspy"):
        assert f"== {step}: done before" in out
    assert "== bt-weights, better-together: done before, reused" in out


@needs_make
@pytest.mark.parametrize("failing", ["bt-weights", "better-together"])
def test_a_failed_background_step_stops_make_compare_with_its_log_and_runs_nothing_after(
    project, failing
):
    proc = make_compare(project, FAIL=failing, BT_WEIGHTS_SECONDS="1")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"{failing} failed here" in out  # its log, shown
    assert "== bt-weights or better-together failed (exit 3): outputs/compare/both.log" in out
    seen = calls(project)
    assert "openai" not in seen
    if failing == "bt-weights":
        assert "better-together" not in seen
    assert (project / "outputs/compare/results/dspy.json").is_file(), "dspy's step is kept"


@needs_make
@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_stopping_make_compare_stops_the_training_in_the_background_too(project, how):
    proc = make_compare(project, DSPY_SECONDS="30", BT_WEIGHTS_SECONDS="30")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        log = project / "calls.log"
        if log.is_file() and " start bt-weights " in log.read_text():
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("bt-weights never started: " + proc.communicate()[0])
    # Ctrl-C reaches the whole foreground group; a background job of a script's shell ignores
    # SIGINT, so only the recipe's own trap can stop it. SIGTERM, as a job manager sends it, to
    # the group likewise.
    os.killpg(proc.pid, how)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0, out
    seen = calls(project)
    deadline = time.monotonic() + 10
    while alive(seen["bt-weights"]["pid"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not alive(seen["bt-weights"]["pid"]), "the training in the background outlived make"
    time.sleep(1)
    seen = calls(project)
    assert "end" not in seen["bt-weights"]
    assert "better-together" not in seen, "the next background step started after make ended"
