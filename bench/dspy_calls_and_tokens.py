"""How many LM calls and tokens a default real run of dspy_example.py makes, and how light its
dry run is. Offline: the calls go to the fake OpenAI-compatible server the tests use.

    .venv/bin/python bench/dspy_calls_and_tokens.py

What it does, in one run:
1. a default real run (BootstrapFewShot, first 30 train / first 30 test questions of the shared
   data, openai/gpt-4o-mini as the model name) against tests/fake_dspy_server.py on 127.0.0.1;
   counts the requests the server received, per phase, and the input tokens of every prompt it
   received with LiteLLM's tokenizer for gpt-4o-mini (the usage the fake reports is not
   used). Output tokens depend on the model, so they are reported as the script's estimate.
   The fake model never reaches the 30 ROUGE-L threshold, so the compile phase goes through all
   30 training questions: the upper bound. A real model that bootstraps its 4 demos sooner
   makes fewer compile calls.
2. the same run again: the number of requests it sends (DSPy's cache should make it 0).
3. wall time of a dry run, of `import dspy` and of `import litellm`, each the median of 3, so
   the share of the dry run spent importing LiteLLM (its token counter and price map) shows.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from fake_dspy_server import FakeChatServer  # noqa: E402

MODEL = "openai/gpt-4o-mini"


def run(workdir: Path, *args: str, env: dict | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *args],
        cwd=workdir,
        env={**os.environ, "COLUMNS": "120", **(env or {})},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise SystemExit(f"{args} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - started, proc.stdout


def median_seconds(workdir: Path, *args: str) -> float:
    return statistics.median(run(workdir, *args)[0] for _ in range(3))


def main() -> None:
    import litellm

    workdir = Path(tempfile.mkdtemp(prefix="dspy-bench-"))
    shutil.copy(REPO / "dspy_example.py", workdir)
    shutil.copy(REPO / "small_edu_qa.jsonl", workdir)
    server = FakeChatServer()
    url = server.start()
    try:
        real = ("dspy_example.py", "--run", "--yes", "--model", MODEL, "--test-limit", "30")
        seconds, _ = run(workdir, *real, "--api-base", url, env={"OPENAI_API_KEY": "bench"})
        requests = list(server.requests)
        results = json.loads((workdir / "outputs" / "results" / "dspy.json").read_text())
        run(workdir, *real, "--api-base", url, env={"OPENAI_API_KEY": "bench"})
        second = server.count - len(requests)
    finally:
        server.stop()

    tokens = [litellm.token_counter(model=MODEL, messages=r["messages"]) for r in requests]
    print(f"default real run, 30 train / 30 test, BootstrapFewShot, {MODEL} name, fake server")
    print(f"  requests received: {len(requests)} (run took {seconds:.1f} s)")
    start = 0
    for phase in ("compile", "baseline", "tuned"):  # the order the script sends them in
        n = results["lm_calls"][phase]["sent"]
        chunk = tokens[start : start + n]
        start += n
        mean = sum(chunk) / n if n else 0
        print(f"  {phase:>8}: {n:3d} calls, {sum(chunk):7,d} input tokens ({mean:,.0f} per call)")
    print(f"     total: {len(tokens):3d} calls, {sum(tokens):7,d} input tokens")
    print(f"  same command again: {second} requests sent (DSPy cache)")

    dry = median_seconds(workdir, "dspy_example.py", "--test-limit", "30")
    import_dspy = median_seconds(workdir, "-c", "import dspy")
    import_litellm = median_seconds(workdir, "-c", "import litellm")
    print("dry run, median of 3 (seconds)")
    print(
        f"  dry run {dry:.2f}; import dspy {import_dspy:.2f}; import litellm {import_litellm:.2f}"
    )
    print(f"  import litellm / dry run = {import_litellm / dry:.2f}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
