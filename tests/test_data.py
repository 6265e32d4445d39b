"""The shared data set: every script trains and scores on it, so its shape is a contract."""

import ast
import json
import re
from collections import Counter

import pytest
from conftest import DATA_FILE, REPO, SCRIPTS

REQUIRED = ("id", "subject", "question", "answer", "split")
BASE_QUESTIONS = [
    "What causes the seasons on Earth?",
    "What is photosynthesis?",
    "What is Newton's first law of motion?",
    "What is the difference between an atom and a molecule?",
    "What is the Pythagorean theorem?",
]


def normalize(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


@pytest.fixture(scope="module")
def rows():
    with DATA_FILE.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def test_every_line_is_an_object_with_the_required_fields(rows):
    for number, row in enumerate(rows, start=1):
        assert isinstance(row, dict), f"line {number} is not an object"
        for field in REQUIRED:
            assert isinstance(row.get(field), str) and row[field].strip(), f"line {number}: {field}"
        assert row["split"] in ("train", "test"), f"line {number}: split {row['split']!r}"


def test_size_subjects_and_an_80_20_split_stratified_by_subject(rows):
    assert len(rows) >= 150
    by_subject = Counter(row["subject"] for row in rows)
    assert len(by_subject) >= 6
    train = sum(row["split"] == "train" for row in rows)
    assert 0.75 <= train / len(rows) <= 0.85
    for subject in by_subject:
        splits = Counter(row["split"] for row in rows if row["subject"] == subject)
        assert splits["train"] and splits["test"], f"{subject} is missing from a split"
        assert 0.7 <= splits["train"] / by_subject[subject] <= 0.9, subject


def test_ids_are_unique_and_no_question_or_answer_repeats(rows):
    assert len({row["id"] for row in rows}) == len(rows)
    questions = Counter(normalize(row["question"]) for row in rows)
    assert [q for q, n in questions.items() if n > 1] == []
    answers = Counter(normalize(row["answer"]) for row in rows)
    assert [a for a, n in answers.items() if n > 1] == []


def test_no_question_is_in_both_splits(rows):
    train = {normalize(row["question"]) for row in rows if row["split"] == "train"}
    test = {normalize(row["question"]) for row in rows if row["split"] == "test"}
    assert train.isdisjoint(test)


def test_answers_are_one_to_three_sentences(rows):
    for row in rows:
        # sentence ends: . ! ? followed by a space and a capital, or the end of the text
        ends = re.findall(r"[.!?](?=\s+[A-Z]|\s*$)", row["answer"])
        assert 1 <= len(ends) <= 3, f"{row['id']}: {len(ends)} sentences"
        assert row["answer"].rstrip()[-1] in '.!?"', f"{row['id']} does not end a sentence"


def test_the_five_base_pairs_open_the_file(rows):
    assert [row["question"] for row in rows[:5]] == BASE_QUESTIONS
    assert rows[0]["split"] == "test", "the showcase question must be held out"


def test_base_pairs_match_what_every_script_embeds(rows):
    """A copied script without the data file writes its embedded pairs: they must be these."""
    checked = 0
    for script in SCRIPTS:
        path = REPO / script
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "BASE_PAIRS" for t in node.targets
            ):
                embedded = ast.literal_eval(node.value)
                assert embedded == rows[:5], f"{script}: BASE_PAIRS differ from the data file"
                checked += 1
    assert checked == len(SCRIPTS), "every script embeds BASE_PAIRS"


def test_any_short_prefix_of_a_split_covers_every_subject(rows):
    """--train-limit N takes the first N of a split: the file interleaves subjects so that a
    small limit still teaches (and tests) every subject, not the first few."""
    subjects = {row["subject"] for row in rows}
    for split in ("train", "test"):
        chosen = [row for row in rows if row["split"] == split]
        assert {row["subject"] for row in chosen[: 2 * len(subjects)]} == subjects, split


def test_the_kept_openai_training_file_matches_the_data(run_script):
    """openai_edu_qa_training.jsonl is committed for readers; it must be what stage 2 writes
    from the committed data today (regenerate: python openai_finetune.py)."""
    kept = REPO / "openai_edu_qa_training.jsonl"
    result = run_script("openai_finetune.py")
    assert result.returncode == 0, result.output[-2000:]
    written = (result.cwd / "openai_edu_qa_training.jsonl").read_bytes()
    assert written == kept.read_bytes(), "run `python openai_finetune.py` and commit the file"
