"""LoRA vs full fine-tuning of the default model's architecture, measured in one run.

huggingface_lora.py's stage 3 prints, before loading anything, how much memory training needs
(weights + gradients + AdamW states) and roughly how long it takes. This checks those numbers
against a real training step of the same architecture, SmolLM2-135M (built from its preset
config with random weights: no download, and speed and memory do not depend on the values),
on this machine's CPU in fp32:

- the bytes of weights, gradients and optimizer states, counted tensor by tensor after a step,
  against stage 3's formula, for LoRA and for full fine-tuning;
- seconds per optimizer step and peak resident memory, LoRA against full fine-tuning (ratios);
- the script's time estimate for the default run against steps x measured seconds per step.

Each arm runs in a fresh process, so peak memory is its own.

    python bench/lora_vs_full.py                     # batch 4 x 128 tokens, 5 timed steps
    python bench/lora_vs_full.py --steps 10 --seq-len 256
    python bench/lora_vs_full.py --lora-dropout 0    # what LoRA's dropout costs in activations
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

# The scripts are plain modules: import the one measured from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import huggingface_lora as hl  # noqa: E402

PRESET = "smollm2-135m"


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def one_arm(arm: str, batch: int, seq_len: int, steps: int, dropout: float) -> dict:
    """Train `steps` + 1 optimizer steps with LoRA or full fine-tuning; measure them."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hl.quiet_library_noise()
    torch.manual_seed(0)
    config = AutoConfig.for_model(**hl.PRESETS[PRESET]["config"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    cfg = hl.Config()
    if arm == "lora":
        model = hl.add_lora(model, cfg, dropout=dropout)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Trainer's default optimizer: AdamW, two fp32 moments per trained weight.
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len))
    before = rss_bytes()

    times = []
    for step in range(steps + 1):  # the first step is a warm-up: it allocates the states
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients allocated, as Trainer does
        if step:
            times.append(time.perf_counter() - started)

    weights = tensor_bytes(model.parameters())
    gradients = tensor_bytes(p.grad for p in trainable)
    states = tensor_bytes(
        value
        for state in optimizer.state.values()
        for value in state.values()
        if torch.is_tensor(value) and value.dim() > 0  # not the scalar step counters
    )
    return {
        "arm": arm,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": sum(p.numel() for p in trainable),
        "weights": weights,
        "gradients": gradients,
        "optimizer": states,
        "seconds_per_step": statistics.median(times),
        "rss_before_training": before,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "threads": torch.get_num_threads(),
    }


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per arm (default 5)")
    parser.add_argument("--batch", type=int, default=4, help="the script's default batch size")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per example")
    parser.add_argument(
        "--lora-dropout", type=float, default=0.05, help="the script's default, 0.05"
    )
    parser.add_argument("--arm", choices=("lora", "full"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:  # a child process: one arm, JSON out
        arm = one_arm(args.arm, args.batch, args.seq_len, args.steps, args.lora_dropout)
        print(json.dumps(arm))
        return

    arms = {}
    for arm in ("lora", "full"):
        child = [sys.executable, __file__, "--arm", arm, "--steps", str(args.steps)]
        child += ["--batch", str(args.batch), "--seq-len", str(args.seq_len)]
        child += ["--lora-dropout", str(args.lora_dropout)]
        done = subprocess.run(child, capture_output=True, text=True, check=True)
        arms[arm] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{arm}: {arms[arm]['seconds_per_step']:.2f} s/step", file=sys.stderr)

    # Stage 3's estimate for the same settings, from the same functions the script uses.
    hl.quiet_library_noise()
    from transformers import AutoConfig

    cfg = hl.Config()
    config = AutoConfig.for_model(**hl.PRESETS[PRESET]["config"])
    sizes = hl.size_model(config, cfg, args.lora_dropout)
    rows = {(method, precision): row for method, precision, *row in hl.memory_rows(sizes)}
    estimate = {"lora": rows[("LoRA", "fp32")], "full": rows[("full fine-tuning", "fp32")]}

    lora, full = arms["lora"], arms["full"]
    print(f"\n{PRESET} architecture, fp32 on the CPU ({lora['threads']} threads), batch "
          f"{args.batch} x {args.seq_len} tokens, median of {args.steps} steps\n")  # fmt: skip
    print(f"| | LoRA (r=16, all-linear, dropout {args.lora_dropout:g}) | full fine-tuning "
          "| LoRA / full |")  # fmt: skip
    print("| --- | ---: | ---: | ---: |")
    print(f"| trained parameters | {lora['trainable']:,} | {full['trainable']:,} | "
          f"{lora['trainable'] / full['trainable']:.3f} |")  # fmt: skip
    for arm in (lora, full):
        arm["states"] = arm["weights"] + arm["gradients"] + arm["optimizer"]
    print(f"| weights + gradients + AdamW, counted | {mib(lora['states'])} | "
          f"{mib(full['states'])} | {lora['states'] / full['states']:.2f} |")  # fmt: skip
    est_lora, est_full = estimate["lora"][2], estimate["full"][2]
    print(f"| the same, stage 3's estimate | {mib(est_lora)} | {mib(est_full)} | "
          f"{est_lora / est_full:.2f} |")  # fmt: skip
    print(f"| peak resident memory (activations, allocator included) | {mib(lora['peak_rss'])} "
          f"| {mib(full['peak_rss'])} | {lora['peak_rss'] / full['peak_rss']:.2f} |")  # fmt: skip
    lora["added"], full["added"] = (a["peak_rss"] - a["rss_before_training"] for a in (lora, full))
    print(f"| of which training added (states, activations) | {mib(lora['added'])} | "
          f"{mib(full['added'])} | {lora['added'] / full['added']:.2f} |")  # fmt: skip
    print(f"| seconds per optimizer step | {lora['seconds_per_step']:.2f} | "
          f"{full['seconds_per_step']:.2f} | "
          f"{lora['seconds_per_step'] / full['seconds_per_step']:.2f} |")  # fmt: skip

    # The dry run's time estimate for these tokens, the way configure_model makes it.
    tokens = args.batch * args.seq_len
    estimated = tokens * 4 * sizes["active"] / (0.3 * hl.measure_flops("cpu", "fp32"))
    measured = lora["seconds_per_step"]
    print(
        f"\nstage 3's time estimate for one LoRA step of {tokens} tokens: {estimated:.2f} s; "
        f"measured {measured:.2f} s (measured / estimate = {measured / estimated:.2f})"
    )
    for name, counted, est in (
        ("LoRA", lora["states"], estimate["lora"][2]),
        ("full", full["states"], estimate["full"][2]),
    ):
        if not math.isclose(counted, est, rel_tol=0.01):
            print(f"note: {name} states counted {mib(counted)} vs estimated {mib(est)}")


if __name__ == "__main__":
    main()
