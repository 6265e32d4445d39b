"""Wall time of `make demo` and `make compare`, stage by stage: where a user's wait goes.

Runs the commands those two targets run (the same scripts, flags and order as the Makefile),
each as its own process, reads its output as it comes and notes when each "Stage N/6" header
appears. A stage's time runs from its header to the next one (stage 6 to the process's end);
"start-up" is the time before stage 1 (Python, imports). Nothing is skipped or reused except
what the scripts themselves reuse (the dequantized model, after its first run).

- demo: the three dry runs, then huggingface_lora.py --model smollm2-offline --run --max-steps 60;
- compare: the Makefile's steps: LoRA on the same model; DSPy on the base model served locally
  (it writes its train pairs as its program sends them); LoRA on those pairs, merged (train
  only); DSPy again on the merged model, with the base model as the plain model and baseline;
  OpenAI's --record-plan row. dspy_example.py serves each model itself with --serve where it
  has that flag; otherwise this bench starts `transformers serve` for it and times the server's
  start as its own row.

`make compare` takes tens of minutes on two cores; --small runs the same commands scaled down
(LoRA --max-steps 4 --test-limit 4; DSPy --train-limit 4 --test-limit 4 --max-tokens 128),
which shows the shape, not the full figures.

    python bench/time_to_result.py --small                 # demo and a scaled-down compare
    python bench/time_to_result.py                         # the real demo and compare
    python bench/time_to_result.py --targets demo
    python bench/time_to_result.py --model tiny --small    # smoke run (tiny model), seconds
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common
from common import REPO

STAGE = re.compile(r"Stage (\d)/6 · (\w+)")


def timed_run(command: list[str], cwd: Path, log) -> dict:
    """Run `command`; (seconds before stage 1, [(stage, name, seconds)], total seconds)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    marks = []
    with subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    ) as proc:
        for line in proc.stdout:
            log.write(line)
            if found := STAGE.search(line):
                marks.append((int(found[1]), found[2], time.perf_counter() - started))
    total = time.perf_counter() - started
    if proc.returncode:
        print(f"{' '.join(command)} exited {proc.returncode}; see {log.name}", file=sys.stderr)
    stages = [
        (number, name, (marks[i + 1][2] if i + 1 < len(marks) else total) - at)
        for i, (number, name, at) in enumerate(marks)
    ]
    startup = marks[0][2] if marks else total
    return {"startup": startup, "stages": stages, "total": total, "exit": proc.returncode}


def has_flag(script: str, flag: str, cwd: Path) -> bool:
    done = subprocess.run(
        [sys.executable, script, "--help"], cwd=cwd, capture_output=True, text=True
    )
    return flag in done.stdout


def plans(model: str, small: bool, cwd: Path) -> dict[str, list]:
    """The commands of each target: (label, argv) or (label, ("serve", folder, argv))."""
    py = sys.executable
    demo_steps = ["--max-steps", "4", "--test-limit", "4"] if small else ["--max-steps", "60"]
    demo = [
        ("dspy_example.py dry run", [py, "dspy_example.py"]),
        ("openai_finetune.py dry run", [py, "openai_finetune.py"]),
        ("huggingface_lora.py dry run", [py, "huggingface_lora.py", "--model", model]),
        (
            "huggingface_lora.py --run",
            [py, "huggingface_lora.py", "--model", model, "--run", *demo_steps]
            + ["--output-dir", "outputs/demo"],
        ),
    ]
    cmp_dir = Path("outputs/compare")
    base = common.hl.resolve_model(model).base(common.hl.Config(output_dir=cmp_dir))
    lora = ["--max-steps", "4", "--test-limit", "4"] if small else []
    dspy = ["--train-limit", "4", "--test-limit", "4", "--max-tokens", "128"] if small else []
    if model == "tiny":  # random weights never write DSPy's format: compile without calls
        dspy += ["--optimizer", "labeled"]
    serve = has_flag("dspy_example.py", "--serve", cwd)

    def dspy_step(label: str, folder: Path, extra: list[str]):
        argv = [py, "dspy_example.py", "--run", *dspy, *extra, "--output-dir", str(cmp_dir)]
        if serve:
            return (label, argv[:2] + ["--serve", str(folder)] + argv[2:])
        return (label, ("serve", folder, argv))

    weights = cmp_dir / "bt"  # prompt, weights, prompt: the weights' run and its merged model
    compare = [
        (
            "huggingface_lora.py --run",
            [py, "huggingface_lora.py", "--model", model, "--run", *lora]
            + ["--output-dir", str(cmp_dir)],
        ),
        dspy_step("dspy_example.py --run, base model", base, []),
        (
            "huggingface_lora.py --run on DSPy's train pairs",
            [py, "huggingface_lora.py", "--model", str(base), "--run", "--merge", *lora]
            + ["--data", str(cmp_dir / "dspy" / "finetune.jsonl"), "--test-limit", "0"]
            + ["--output-dir", str(weights)],
        ),
        dspy_step(
            "dspy_example.py --run, tuned model",
            weights / "huggingface" / "merged",
            ["--base-model", str(base), "--results-name", "better-together"],
        ),
        ("openai_finetune.py --record-plan", [py, "openai_finetune.py", "--record-plan"]
         + ["--output-dir", str(cmp_dir)]),
    ]  # fmt: skip
    return {"demo": demo, "compare": compare}


def run_step(step, cwd: Path, log) -> list[tuple[str, dict]]:
    label, what = step
    if isinstance(what, list):
        return [(label, timed_run(what, cwd, log))]
    import dspy_local  # starts transformers serve the way that bench does

    _, folder, argv = what
    folder = str((cwd / folder).resolve())
    started = time.perf_counter()
    with dspy_local.served(folder, [], cwd / "outputs" / "serve.log") as url:
        up = time.perf_counter() - started
        argv = argv[:2] + ["--model", f"openai/{folder}", "--api-base", url] + argv[2:]
        argv += ["--api-key-env", "TIME_TO_RESULT_KEY", "--yes"]
        os.environ["TIME_TO_RESULT_KEY"] = "local"
        measured = timed_run(argv, cwd, log)
    server = {"startup": up, "stages": [], "total": up, "exit": 0}
    return [
        (f"transformers serve start ({Path(folder).name})", server),
        (label, measured),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=common.REAL_MODEL, help="smollm2-offline or tiny")
    parser.add_argument("--small", action="store_true", help="scaled-down runs (see above)")
    parser.add_argument("--targets", nargs="*", default=["demo", "compare"])
    parser.add_argument(
        "--keep", type=Path, help="run in this folder and keep it (default: a temporary copy)"
    )
    args = parser.parse_args()
    # A terminated bench still stops the servers it started (the with-blocks run on exit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    # A fresh copy of the scripts and data: no earlier outputs/ to reuse, as after a clone.
    cwd = args.keep or Path(tempfile.mkdtemp(prefix="time-to-result-"))
    cwd.mkdir(parents=True, exist_ok=True)
    for name in ("dspy_example.py", "openai_finetune.py", "huggingface_lora.py"):
        shutil.copy(REPO / name, cwd)
    shutil.copy(REPO / "small_edu_qa.jsonl", cwd)
    (cwd / "outputs").mkdir(exist_ok=True)
    rows = {}
    with (cwd / "outputs" / "time_to_result.log").open("w") as log:
        for target in args.targets:
            rows[target] = []
            for step in plans(args.model, args.small, cwd)[target]:
                for label, measured in run_step(step, cwd, log):
                    rows[target].append((label, measured))
                    print(f"{target}: {label}: {measured['total']:.1f} s", file=sys.stderr)

    print(f"\n{common.machine()}")
    print(
        f"model {args.model}{', scaled down (--small)' if args.small else ''}; each command in "
        f"its own process, in a fresh folder ({cwd})\n"
    )
    slowest = []
    for target, steps in rows.items():
        total = sum(m["total"] for _, m in steps)
        print(f"make {target}: {total:.0f} s in all\n")
        print(
            "| command | start-up | " + " | ".join(f"stage {i}" for i in range(1, 7)) + " | total |"
        )
        print("| --- | ---: |" + " ---: |" * 7)
        for label, m in steps:
            by_stage = {number: seconds for number, _, seconds in m["stages"]}
            cells = [f"{by_stage[i]:.1f}" if i in by_stage else "" for i in range(1, 7)]
            total = f"{m['total']:.1f}" + (f" (failed: exit {m['exit']})" if m["exit"] else "")
            print(f"| {label} | {m['startup']:.1f} | " + " | ".join(cells) + f" | {total} |")
            for number, name, seconds in m["stages"]:
                slowest.append((seconds, f"make {target}: {label}, stage {number} ({name})"))
            slowest.append((m["startup"], f"make {target}: {label}, start-up"))
        print()
    seconds, where = max(slowest)
    grand = sum(m["total"] for steps in rows.values() for _, m in steps)
    print(
        f"headline: the slowest stage is {where}: {seconds:.0f} s of {grand:.0f} s "
        f"({seconds / grand:.0%})"
    )


if __name__ == "__main__":
    main()
