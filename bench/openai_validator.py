"""How openai_finetune.py's validator scales: 10k vs 100k lines, measured in one run.

The validator streams the file and keeps only histograms of token counts, so validating ten
times the lines should take about ten times as long (same lines per second) and no more
memory. This writes two chat-format files whose questions and answers differ on every line
(the system prompt is the same, as in real files), validates each in a fresh process with the
real o200k_base encoding, and prints the ratios.

    python bench/openai_validator.py                  # 10k and 100k lines
    python bench/openai_validator.py --sizes 2000 20000
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

# The scripts are plain modules: import the one measured from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import openai_finetune as oft  # noqa: E402

# A small vocabulary: every line gets its own random question and answer from it.
VOCABULARY = """the a energy cell light water force atom river empire poem number graph planet heat
motion reaction market climate fraction protein orbit voltage treaty novel algorithm mountain
ocean carbon gravity speed species vote trade chapter equation signal"""
WORDS = VOCABULARY.split()


def write_file(path: Path, lines: int, system_prompt: str) -> None:
    rng = random.Random(lines)
    with path.open("w", encoding="utf-8") as out:
        for i in range(lines):
            question = f"Question {i}: why does the {' '.join(rng.choices(WORDS, k=8))}?"
            answer = " ".join(rng.choices(WORDS, k=rng.randint(30, 60))).capitalize() + "."
            example = {
                "messages": [
                    {"role": "system", "content": system_prompt},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]
            }
            out.write(json.dumps(example) + "\n")


def measure(path: Path) -> dict:
    """In this (fresh) process: one timed pass, then one pass under tracemalloc."""
    count, label = oft.load_token_counter("gpt-4o-mini-2024-07-18")
    count("warm up the encoding")  # loading the encoding is not validation
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    report = oft.validate_chat_file(path, count, 65536)
    seconds = time.perf_counter() - start
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    oft.validate_chat_file(path, count, 65536)
    traced_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "lines": report["examples"],
        "errors": report["errors"],
        "tokens": report["billed_tokens_per_epoch"],
        "seconds": seconds,
        "rss_before_kb": rss_before,
        "rss_peak_kb": rss_peak,
        "traced_peak_bytes": traced_peak,
        "label": label,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs=2, default=[10_000, 100_000])
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return

    system_prompt = oft.SYSTEM_PROMPT
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            path = Path(tmp) / f"chat_{size}.jsonl"
            write_file(path, size, system_prompt)
            proc = subprocess.run(
                [sys.executable, __file__, "--measure", str(path)],
                capture_output=True,
                text=True,
                check=True,
            )
            run = json.loads(proc.stdout)
            run["megabytes"] = path.stat().st_size / 1e6
            runs.append(run)

    print(f"tokens counted with {runs[0]['label']}")
    print(
        f"{'lines':>8} {'file MB':>8} {'tokens':>11} {'seconds':>8} {'lines/s':>9} "
        f"{'peak RSS MB':>12} {'RSS growth MB':>14} {'traced peak KB':>15}"
    )
    for run in runs:
        assert run["errors"] == {}, run["errors"]
        growth = (run["rss_peak_kb"] - run["rss_before_kb"]) / 1024
        print(
            f"{run['lines']:>8,} {run['megabytes']:>8.1f} {run['tokens']:>11,} "
            f"{run['seconds']:>8.2f} {run['lines'] / run['seconds']:>9,.0f} "
            f"{run['rss_peak_kb'] / 1024:>12.1f} {growth:>14.1f} "
            f"{run['traced_peak_bytes'] / 1024:>15.1f}"
        )
    small, large = runs
    scale = large["lines"] / small["lines"]
    print(
        f"\n{scale:.0f}x the lines: {large['seconds'] / small['seconds']:.2f}x the time "
        f"({(large['lines'] / large['seconds']) / (small['lines'] / small['seconds']):.2f}x "
        f"the throughput), {large['rss_peak_kb'] / small['rss_peak_kb']:.2f}x the peak RSS, "
        f"{large['traced_peak_bytes'] / small['traced_peak_bytes']:.2f}x the traced peak"
    )


if __name__ == "__main__":
    main()
