"""Write docs/dry-runs.md from the scripts themselves (`make docs`).

Each transcript is one script's dry run as a user first sees it: a fresh folder holding only the
script and the data file, no key, no network (HF_HUB_OFFLINE=1), 100 columns. tests/test_docs.py
runs the same commands and fails when a committed transcript no longer matches what the script
prints, the machine's figures aside (comparable() below says which).

    python docs/build.py            # rewrite docs/dry-runs.md
    python docs/build.py --check    # exit 1 when it is out of date, saying where
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = REPO / "docs" / "dry-runs.md"
# (anchor, script, arguments, what the heading says of the run)
RUNS = (
    ("dspy-example", "dspy_example.py", [], "no key set"),
    ("openai-finetune", "openai_finetune.py", [], "no key set"),
    ("huggingface-lora", "huggingface_lora.py", ["--model", "smollm2-offline"], "offline model"),
)
KEYS = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "MISTRAL_API_KEY", "HF_TOKEN", "NEBIUS_API_KEY")
# Where tiktoken finds its files, which openai_finetune.py prints: set by whatever ran before in
# this process (a test that called the script's token counter sets it), not by a user's shell.
NOT_PASSED = (*KEYS, "TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR")
HEADER = """# Dry runs, as printed

Each script run without `--run`: all six stages, nothing sent, nothing spent, no model
downloaded. Written by `make docs` (`docs/build.py`) in a fresh folder holding only the script and
`small_edu_qa.jsonl`, with no key set and `HF_HUB_OFFLINE=1`, at 100 columns; a test fails when a
script no longer prints what is here. The figures of your run depend on your data, your flags
and your machine (stage 3 of `huggingface_lora.py` measures this CPU's speed).
"""


def transcript(script: str, args: list[str]) -> str:
    """What `python SCRIPT ARGS` prints in a fresh folder, stdout then stderr."""
    with tempfile.TemporaryDirectory(prefix="dry-run-") as folder:
        shutil.copy(REPO / script, folder)
        shutil.copy(REPO / "small_edu_qa.jsonl", folder)
        env = {key: value for key, value in os.environ.items() if key not in NOT_PASSED}
        env |= {"HF_HUB_OFFLINE": "1", "COLUMNS": "100", "PYTHONUNBUFFERED": "1"}
        env.pop("FORCE_COLOR", None)
        done = subprocess.run(
            [sys.executable, script, *args],
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=600,
        )
        text = done.stdout + done.stderr
        if done.returncode:
            raise SystemExit(f"{script} {' '.join(args)} exited {done.returncode}:\n{text[-3000:]}")
        text = text.replace(os.path.realpath(folder), ".").replace(folder, ".")
        # the model wheel's file, wherever this machine's virtual environment is
        for prefix in (sys.prefix, os.path.realpath(sys.prefix)):
            text = text.replace(prefix + os.sep, ".venv" + os.sep)
    return "\n".join(line.rstrip() for line in text.strip().splitlines())


def document() -> str:
    parts = [HEADER]
    for anchor, script, args, note in RUNS:
        command = " ".join(["python", script, *args])
        body = transcript(script, args)
        parts.append(f'<a id="{anchor}"></a>\n\n## `{command}` ({note})\n\n```text\n{body}\n```\n')
    return "\n".join(parts)


# Figures that depend on the machine and the moment, not on the script: this CPU's measured
# speed and what follows from it (the time estimates), and the timings of the run itself.
MACHINE_FIGURES = re.compile(
    r"\d[\d,.]*\s*(GFLOP/s|TFLOP/s|s\b|ms\b|min\b|minutes?\b|hours?\b|h\b|seconds?\b)"
)


def comparable(text: str) -> str:
    """A transcript with the machine's figures masked, for comparing two of them."""
    return MACHINE_FIGURES.sub(lambda m: "#" + m.group(1), text)


def stale_lines(committed: str, fresh: str) -> list[str]:
    """The differing lines of two documents, the machine's figures aside (a unified diff).

    Words are compared, not line breaks: a figure one digit longer on another machine ("23 min"
    for "5 min") moves rich's wrapping of the rest of the paragraph, and that is not a change.
    """
    if comparable(committed).split() == comparable(fresh).split():
        return []
    diff = difflib.unified_diff(
        comparable(committed).splitlines(),
        comparable(fresh).splitlines(),
        "committed",
        "printed now",
        lineterm="",
        n=1,
    )
    return list(diff)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    fresh = document()
    if args.check:
        stale = stale_lines(TARGET.read_text(encoding="utf-8"), fresh)
        if stale:
            print("\n".join(stale[:80]))
            raise SystemExit(f"{TARGET.relative_to(REPO)} is out of date: run `make docs`")
        print(f"{TARGET.relative_to(REPO)} is current")
        return
    TARGET.write_text(fresh, encoding="utf-8")
    print(f"wrote {TARGET.relative_to(REPO)}")


if __name__ == "__main__":
    main()
