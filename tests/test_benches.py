"""Smoke runs of the benches in bench/ on the tiny model: each runs and prints its headline.

Nothing here checks a timing or a ratio (a shared CI machine is too noisy for that, and the
tiny model's figures mean nothing); the figures live in bench/README.md. Each bench writes under
the test's temporary --output-dir, so the repository's outputs/ is not touched.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
from conftest import REPO, child_env


def bench(name: str, tmp_path, *args: str, timeout: float = 600) -> str:
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / name), "--model", "tiny"]
        + ["--output-dir", str(tmp_path / "outputs"), *args],
        cwd=tmp_path,
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "\nheadline: " in proc.stdout, proc.stdout[-3000:]
    return proc.stdout


def test_generation_bench_compares_batched_with_one_at_a_time(tmp_path):
    out = bench("generation.py", tmp_path, "--test-limit", "3", "--max-new-tokens", "8")
    assert "same greedy answers: 3 of 3 (all)" in out


def test_throughput_bench_measures_the_default_and_a_lever(tmp_path):
    # two of the seven arms: each is a process of its own (about 15 s here), the code the same
    args = ("--steps", "1", "--repeats", "1", "--levers", "default", "dropout 0")
    out = bench("throughput.py", tmp_path, *args)
    assert "padding-free check: loss of padded vs flattened batches differs by" in out
    assert "| default |" in out and "| dropout 0 |" in out


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="TRL is bench-only")
def test_vs_trl_bench_trains_both(tmp_path):
    out = bench("vs_trl.py", tmp_path, "--steps", "1", "--repeats", "1")
    assert "| ours |" in out and "| TRL |" in out


def test_dspy_local_bench_answers_through_both_servers(tmp_path):
    args = ("--test-limit", "1", "--max-tokens", "8", "--repeats", "1")
    out = bench("dspy_local.py", tmp_path, *args)
    assert "| transformers serve --continuous-batching | 8 |" in out


def test_time_to_result_bench_times_the_stages_of_the_demo(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "time_to_result.py"), "--model", "tiny"]
        + ["--small", "--targets", "demo", "--keep", str(tmp_path / "run")],
        env=child_env(),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| huggingface_lora.py --run |" in proc.stdout
    assert "headline: the slowest stage is make demo: " in proc.stdout
