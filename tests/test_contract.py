"""What the three scripts promise alike (../shared/CONVENTIONS.md), checked on each of them.

Each script is run as a real process in a temporary directory, the way a user runs a copy. A
missing script fails these tests; it is never skipped.
"""

import json
import re
from collections import Counter

import pytest
from conftest import DATA_FILE, REPO, SCRIPTS, load_script, run_script_in

PRESENT = SCRIPTS  # all three, always: a deleted script must fail here, not be skipped
STAGES = ["prepare_data", "format_data", "configure_model", "tune", "answer", "compare"]


def test_all_three_scripts_exist():
    missing = [script for script in SCRIPTS if not (REPO / script).is_file()]
    assert missing == [], f"missing: {missing}"


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    """One default dry run per script, shared by the tests that only read its output."""
    return {
        script: run_script_in(
            tmp_path_factory.mktemp(script[:-3]), script, env={"HF_HUB_OFFLINE": "1"}
        )
        for script in PRESENT
    }


@pytest.mark.parametrize("script", PRESENT)
def test_six_stages_are_top_level_functions_with_the_shared_names(script):
    module = load_script(script)
    for name in [*STAGES, "main"]:
        assert callable(getattr(module, name, None)), f"{script} has no function {name}()"


@pytest.mark.parametrize("script", PRESENT)
def test_dry_run_walks_all_six_stages_in_order_and_ends_with_the_real_command(script, dry_runs):
    proc = dry_runs[script]
    assert proc.returncode == 0, proc.output[-3000:]
    headers = [int(n) for n in re.findall(r"Stage (\d)/6", proc.stdout)]
    assert headers == [1, 2, 3, 4, 5, 6], headers
    tail = proc.stdout.strip().splitlines()[-15:]
    assert any(script in line and "--run" in line for line in tail), "\n".join(tail)
    assert not (proc.cwd / "outputs" / "results").exists(), "a dry run wrote results"


@pytest.mark.parametrize("script", PRESENT)
def test_dry_run_prints_the_data_counts_by_split(script, dry_runs):
    """Stage 1's table: a row per subject and a total, train then test, as in the data file."""
    rows = [json.loads(line) for line in DATA_FILE.open(encoding="utf-8")]
    counts = Counter((row["subject"], row["split"]) for row in rows)
    stage_1 = dry_runs[script].stdout.split("Stage 1/6")[1].split("Stage 2/6")[0]
    for subject in {row["subject"] for row in rows}:
        train, test = counts[(subject, "train")], counts[(subject, "test")]
        assert re.search(rf"│ {subject}\s+│\s+{train} │\s+{test} │", stage_1), (subject, stage_1)
    total_train = sum(row["split"] == "train" for row in rows)
    total_test = len(rows) - total_train
    total = rf"│ (total|all)\s+│\s+{total_train} │\s+{total_test} │"
    assert re.search(total, stage_1), stage_1


@pytest.mark.parametrize("script", PRESENT)
def test_help_shows_the_contract_flags_and_examples(script, run_script):
    result = run_script(script, "--help")
    assert result.returncode == 0
    for flag in (
        "--data",
        "--model",
        "--run",
        "--yes",
        "--max-cost",
        "--train-limit",
        "--test-limit",
        "--output-dir",
        "--seed",
        "--ask",
    ):
        assert flag in result.stdout, f"{script} --help lacks {flag}"
    assert "example" in result.stdout.lower()


@pytest.mark.parametrize("script", PRESENT)
def test_a_copied_script_without_data_creates_the_base_pairs(script, run_script):
    result = run_script(script, copy_data=False, env={"HF_HUB_OFFLINE": "1"})
    assert "created on first run" in result.output
    written = [json.loads(line) for line in (result.cwd / "small_edu_qa.jsonl").open()]
    assert len(written) == 5
    assert written[0]["question"] == "What causes the seasons on Earth?"
    assert result.returncode == 0, result.output[-3000:]


BAD_FILES = {
    "empty": ("", r"bad\.jsonl: no examples"),
    "not json": ('{"question": "q", "answer": "a"}\n{oops\n', r"bad\.jsonl:2: not valid JSON"),
    "missing answer": ('{"question": "What is 2+2?"}\n', r'bad\.jsonl:1: "answer" is missing'),
    "not an object": ('["q", "a"]\n', r"bad\.jsonl:1: expected a JSON object"),
    "bad split": (
        '{"question": "q", "answer": "a", "split": "dev"}\n',
        r'bad\.jsonl:1: "split" must be "train" or "test"',
    ),
}


@pytest.mark.parametrize("script", PRESENT)
@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_data_is_one_line_naming_file_and_line_exit_2(script, case, run_script, tmp_path):
    content, pattern = BAD_FILES[case]
    (tmp_path / "bad.jsonl").write_text(content, encoding="utf-8")
    result = run_script(script, "--data", "bad.jsonl", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2, result.output[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, result.stderr
    assert re.search(r"^error: .*" + pattern, errors[0]), errors[0]
    assert "Traceback" not in result.output


@pytest.mark.parametrize("script", PRESENT)
def test_missing_data_file_given_with_data_is_exit_2(script, run_script):
    result = run_script(script, "--data", "nowhere.jsonl", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert re.match(r"error: nowhere\.jsonl: file not found", result.stderr.strip())


def test_every_script_splits_a_file_without_split_fields_the_same_way(tmp_path):
    questions = [f"Question number {i} about topic {i * 7}?" for i in range(60)]
    data = tmp_path / "mine.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "answer": "An answer."}) + "\n" for q in questions)
    )
    splits = {}
    for script in PRESENT:
        module = load_script(script)
        examples = module.load_examples(data)
        assert [e["id"] for e in examples] == [str(n) for n in range(1, 61)]  # line numbers
        splits[script] = [e["split"] for e in examples]
    first = next(iter(splits.values()))
    assert all(s == first for s in splits.values()), splits
    assert 0.6 <= first.count("train") / len(first) <= 0.95  # about 80/20
    # stable: a second read gives the same split
    module = load_script(PRESENT[0])
    assert [e["split"] for e in module.load_examples(data)] == first


def test_every_script_scores_with_the_same_metric():
    pairs = [
        ("The tilt of Earth's axis causes the seasons.", "Seasons are caused by axial tilt."),
        ("Plants make glucose from light.", "Photosynthesis turns light into chemical energy."),
    ]
    scores = {s: [load_script(s).rouge_l(p, r) for p, r in pairs] for s in PRESENT}
    first = next(iter(scores.values()))
    assert all(v == first for v in scores.values())
    assert 0 < first[0] < 100


def test_both_fine_tuning_scripts_train_with_the_same_system_prompt():
    """The comparison table is fair only if the two fine-tuned models saw the same instructions."""
    fine_tuners = ("openai_finetune.py", "huggingface_lora.py")
    prompts = {load_script(s).SYSTEM_PROMPT for s in fine_tuners}
    assert len(prompts) == 1, prompts


# --test-limit 0 means "train only" where there is something to train (tests/test_data_formats.py)
LIMITS_OF_AT_LEAST_ONE = [(script, "--train-limit") for script in PRESENT] + [
    ("dspy_example.py", "--test-limit")
]


@pytest.mark.parametrize("script, flag", LIMITS_OF_AT_LEAST_ONE)
def test_a_limit_below_one_is_refused_not_read_as_all(script, flag, run_script):
    result = run_script(script, flag, "0", env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 2
    assert flag in result.stderr and "at least 1" in result.stderr


# The comparison table: every results file present, in the contract's order, broken ones skipped.
RESULTS = {
    "huggingface.json": {
        "approach": "huggingface",
        "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
        "baseline_score": 10.0,
        "tuned_score": 8.0,
        "cost_usd": 0.0,
        "seconds": 300,
        "n_test": 36,
    },
    "dspy.json": {
        "approach": "dspy",
        "model": "openai/gpt-4o-mini",
        "baseline_score": 20.0,
        "tuned_score": 25.5,
        "cost_usd": 0.0123,
        "seconds": 61,
        "n_test": 36,
    },
    "openai.json": {
        "approach": "openai",
        "model": "gpt-4o-mini-2024-07-18",
        "baseline_score": 22.0,
        "tuned_score": 31.0,
        "cost_usd": None,
        "seconds": 900,
        "n_test": 30,
    },
}
BROKEN = {
    "half-written.json": '{"approach": "dspy", "baseline',
    "no-scores.json": '{"approach": "dspy", "model": "x"}',
    "a-list.json": "[1, 2, 3]",
}


def markdown_rows(path) -> list[dict]:
    lines = path.read_text(encoding="utf-8").splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
            for line in lines[2:] if line.startswith("|")]  # fmt: skip


@pytest.mark.parametrize("script", PRESENT)
def test_the_comparison_table_lists_every_results_file_in_order_and_skips_broken_ones(
    script, tmp_path, capsys
):
    module = load_script(script)
    module.console.width = 200  # one line per row, whatever the terminal
    results = tmp_path / "results"
    results.mkdir()
    for name, data in RESULTS.items():
        (results / name).write_text(json.dumps(data), encoding="utf-8")
    for name, text in BROKEN.items():
        (results / name).write_text(text, encoding="utf-8")

    module.compare_results(tmp_path, write=False)  # what a dry run shows: nothing written
    assert not (results / "comparison.md").exists()
    capsys.readouterr()

    shown = module.compare_results(tmp_path)
    printed = capsys.readouterr().out
    # the stated order: weights (LoRA), prompt (DSPy), both, weights in the cloud (OpenAI)
    assert [r["approach"] for r in shown] == ["huggingface", "dspy", "openai"]
    for name in BROKEN:
        assert f"skipping {results / name}: not a results file" in " ".join(printed.split())
    labels = [line.split()[0] for line in printed.splitlines() if line[:2] in (" L", " D", " O")]
    assert labels == ["LoRA", "DSPy", "OpenAI"]

    rows = markdown_rows(results / "comparison.md")
    assert [row["run base model"] for row in rows] == [
        "LoRA (weights) SmolLM2-135M-Instruct",  # short labels: never a path or a hub id
        "DSPy (prompt) gpt-4o-mini",
        "OpenAI (weights) gpt-4o-mini",
    ]
    assert [(row["base"], row["tuned"]) for row in rows] == [
        ("10.0", "8.0"),
        ("20.0", "25.5"),
        ("22.0", "31.0"),
    ]
    # these files predate the plain model and the second score: shown as missing, not as 0
    assert [row["plain"] for row in rows] == ["-", "-", "-"]
    assert [row["sim. p/b/t"] for row in rows] == ["-/-/-", "-/-/-", "-/-/-"]
    assert [row["USD"] for row in rows] == ["0", "0.0123", "-"]  # None is unknown, not 0
    assert (results / "comparison.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("script", PRESENT)
def test_the_comparison_shows_the_plain_model_unusable_and_cut_answers_and_a_not_run_row(
    script, tmp_path, capsys
):
    module = load_script(script)
    module.console.width = 200
    results = tmp_path / "results"
    results.mkdir()
    scored = {
        "approach": "huggingface",
        "model": "smollm2-offline (SmolLM2-135M-Instruct.Q4_1.gguf)",
        "baseline_score": 24.5,
        "tuned_score": 30.3,
        "baseline_similarity": 78.7,
        "tuned_similarity": 79.2,
        "plain_model": {
            "model": "smollm2-offline (SmolLM2-135M-Instruct.Q4_1.gguf)",
            "score": 24.5,
            "similarity": 78.7,
        },
        "unusable": {"baseline": 2, "tuned": 0},
        "cut": {"baseline": 5, "tuned": 1},
        "cost_usd": 0.0,
        "seconds": 300,
        "n_test": 36,
    }
    (results / "huggingface.json").write_text(json.dumps(scored), encoding="utf-8")
    other = {
        **scored,
        "approach": "dspy",
        "model": "outputs/compare/bt/huggingface/merged (transformers serve)",
        "plain_model": {"model": "outputs/gguf/SmolLM2-135M-Instruct.Q4_1", "score": 24.0},
        "baseline_score": 20.0,
        "unusable": {"baseline": 0, "tuned": 0},
        "cut": {"baseline": None, "tuned": None},
    }
    (results / "my-own-run.json").write_text(json.dumps(other), encoding="utf-8")
    plan = {
        "approach": "openai",
        "model": "gpt-4o-mini",
        "status": "not run",
        "note": "not run (OPENAI_API_KEY is not set)",
        "estimated_cost_usd": 0.1168,
    }
    (results / "openai.json").write_text(json.dumps(plan), encoding="utf-8")
    module.compare_results(tmp_path)
    printed = " ".join(capsys.readouterr().out.split())
    rows = markdown_rows(results / "comparison.md")
    # a run of another name comes after the stated rows, under its own name
    assert [row["run base model"] for row in rows] == [
        "LoRA (weights) SmolLM2-135M-Instruct",
        "OpenAI (weights) gpt-4o-mini (not run)",
        "my-own-run SmolLM2-135M-Instruct",  # named by its base: the plain model's
    ]
    assert [row["plain"] for row in rows] == ["24.5", "-", "24.0"]
    assert [row["vs plain"] for row in rows] == ["+5.8", "-", "+6.3"]
    assert rows[0]["sim. p/b/t"] == "79/79/79"
    assert [row["unusable cut"] for row in rows] == ["2/0 5/1", "-", "0/0 -/-"]
    assert rows[1]["USD"] == "~0.1168"
    assert "openai: not run (OPENAI_API_KEY is not set)" in printed
    assert "n = 36 held-out questions" in printed
    assert (
        (results / "comparison.md")
        .read_text()
        .rstrip()
        .endswith("- openai: not run (OPENAI_API_KEY is not set)")
    )
