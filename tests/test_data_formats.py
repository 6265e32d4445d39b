"""--data in the formats people already have, and the files that are not data at all.

The three scripts read one file format three ways (question/answer lines, OpenAI chat records,
TRL prompt/completion records), detected per file, with the same one-line errors; a CSV file,
a JSON array, an Excel workbook, UTF-16 text or a key in the wrong case is named, with the
command that converts it. Each script then does its own thing with a chat: DSPy takes the
question and answer only, openai_finetune.py uploads the messages as they are, and
huggingface_lora.py trains them through the chat template with the loss on the assistant turns.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA_FILE, SCRIPTS, load_script, run_script_in
from fake_finetune_api import FakeAPI

ROWS = [json.loads(line) for line in DATA_FILE.read_text(encoding="utf-8").splitlines()]
OWN_SYSTEM = "You are a tutor for a class of twelve-year-olds."  # not any script's own prompt
GREETING = [
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hello! What would you like to know today?"},
]


def kept_keys(row: dict, number: int) -> dict:
    """id, subject, split as the row has them, except that every 7th line has neither id nor
    split: the line number and the question's hash must stand in, in every format alike."""
    keys = {"id": row["id"], "subject": row["subject"], "split": row["split"]}
    return {"subject": row["subject"]} if number % 7 == 0 else keys


# Each format as a function of one shared row: the same pairs, written four ways.
FORMATS = {
    "qa": lambda row: {"question": row["question"], "answer": row["answer"]},
    "chat": lambda row: {
        "messages": [
            {"role": "system", "content": OWN_SYSTEM},
            *GREETING,
            {"role": "user", "content": row["question"]},
            {"role": "assistant", "content": row["answer"]},
        ],
        "source": "exported by another tool",  # an unknown key: ignored
    },
    "prompt": lambda row: {"prompt": row["question"], "completion": row["answer"]},
    "conversational": lambda row: {
        "prompt": [
            {"role": "system", "content": OWN_SYSTEM},
            {"role": "user", "content": row["question"]},
        ],
        "completion": [{"role": "assistant", "content": row["answer"]}],
    },
}
NAMES = {
    "qa": "question/answer",
    "chat": 'chat ("messages")',
    "prompt": "prompt/completion (text)",
    "conversational": "prompt/completion (message lists)",
}


def records(kind: str, rows: list[dict] = ROWS) -> list[dict]:
    return [kept_keys(row, number) | FORMATS[kind](row) for number, row in enumerate(rows, start=1)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    # ASCII escapes, so that half a character ("\ud83d") can be written to test its refusal
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), "utf-8")
    return path


def data_file(folder: Path, kind: str) -> Path:
    return write_jsonl(folder / f"data-{kind}.jsonl", records(kind))


@pytest.fixture(scope="module")
def modules():
    return {script: load_script(script) for script in SCRIPTS}


@pytest.fixture
def cli(modules, tmp_path, monkeypatch, capsys):
    """Run a script's main in this process, in tmp_path: (exit code, stderr lines)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the LoRA script sets it; monkeypatch resets it
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def run(script: str, *args: str) -> tuple[int, list[str]]:
        module = modules[script]
        code = module.run_cli(module.main, ["--output-dir", str(tmp_path / "out"), *args])
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        return code, [line for line in err.splitlines() if line.strip()]

    return run


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def between(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end)]


# ------------------------------------------------------------------ the same examples
@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("kind", ["chat", "prompt", "conversational"])
def test_every_format_gives_the_examples_of_the_same_question_answer_file(
    script, kind, modules, tmp_path
):
    load = modules[script].load_examples
    expected = load(data_file(tmp_path, "qa"))
    examples = load(data_file(tmp_path, kind))
    fields = ("id", "subject", "question", "answer", "split")
    assert [[e[f] for f in fields] for e in examples] == [[e[f] for f in fields] for e in expected]
    assert {e["format"] for e in examples} == {kind}
    if kind == "prompt":
        assert not any("messages" in e for e in examples)
        return
    # a chat keeps its messages as given: the system prompt, the earlier turns, every key
    given = records(kind)
    for example, record in zip(examples, given, strict=True):
        messages = record.get("messages") or record["prompt"] + record["completion"]
        assert example["messages"] == messages
    # a missing id is the line number, a missing split the question's hash, as for pairs
    unmarked = examples[6::7]
    assert [e["id"] for e in unmarked] == [str(n) for n in range(7, len(examples) + 1, 7)]
    assert [e["split"] for e in unmarked] == [
        modules[script].split_of(e["question"]) for e in unmarked
    ]
    assert {e["split"] for e in unmarked} == {"train", "test"}


def stage_1_rows(output: str) -> list[str]:
    """The rows of stage 1's table of counts (subject, train, test...)."""
    stage_1 = between(output, "Stage 1/6", "Stage 2/6")
    return [line for line in stage_1.splitlines() if line.startswith("│")]


DRY_RUN = {
    "dspy_example.py": [],
    "openai_finetune.py": [],
    "huggingface_lora.py": ["--model", "tiny"],  # a tokenizer built here: labels, no download
}
ENV = {"HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
_question_answer_runs: dict[str, str] = {}


def dry_run(folder: Path, script: str, kind: str) -> subprocess.CompletedProcess:
    data = data_file(folder, kind)
    result = run_script_in(folder, script, "--data", str(data), *DRY_RUN[script], env=ENV)
    assert result.returncode == 0, result.output[-3000:]
    return result


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("kind", ["chat", "prompt", "conversational"])
def test_a_dry_run_takes_every_format_and_counts_what_the_question_answer_file_counts(
    script, kind, modules, tmp_path, tmp_path_factory
):
    if script not in _question_answer_runs:  # once per script: the reference to compare with
        folder = tmp_path_factory.mktemp("question-answer")
        _question_answer_runs[script] = dry_run(folder, script, "qa").stdout
    reference = _question_answer_runs[script]
    result = dry_run(tmp_path, script, kind)
    assert stage_1_rows(result.stdout) == stage_1_rows(reference) != []
    # stage 1 says what this script does with such a file, and only for such a file
    said = flat(between(result.stdout, "Stage 1/6", "Stage 2/6"))
    assert f"{NAMES[kind]} records:" in said
    assert "records:" not in flat(between(reference, "Stage 1/6", "Stage 2/6"))
    if kind == "prompt":
        return
    if script == "dspy_example.py":
        assert "system prompts and earlier turns are not used" in said
        return
    # a chat's test question is asked with its own messages: its system prompt, not the script's
    stage_5 = flat(between(result.stdout, "Stage 5/6", "Stage 6/6"))
    assert OWN_SYSTEM in stage_5 and modules[script].SYSTEM_PROMPT not in stage_5
    if script == "huggingface_lora.py":  # ...and trained as it is, every answer in it
        hf = modules[script]
        formatted = tmp_path / "outputs" / "huggingface" / "formatted" / "train.jsonl"
        first = json.loads(formatted.read_text("utf-8").splitlines()[0])
        tokenizer = hf.build_tiny_tokenizer()
        assert OWN_SYSTEM in tokenizer.decode(first["input_ids"])
        assert len(trained_runs(tokenizer, first)) == (2 if kind == "chat" else 1)


# ------------------------------------------------------------------ errors, one line each
def message(turn: tuple[str, object], **keys) -> dict:
    return {"role": turn[0], "content": turn[1], **keys}


def chat(*turns: tuple[str, object], **keys) -> dict:
    return {"messages": [message(turn, **keys) for turn in turns]}


QA = {"question": "What is 2 + 2?", "answer": "It is 4."}
ASKED = ("user", "What is 2 + 2?")
ANSWERED = ("assistant", "It is 4.")
# case: (records, the error line after "error: data.jsonl:")
ERRORS = {
    "a bad role": (
        [chat(("tool", "2 + 2"), ASKED, ANSWERED)],
        '1: message 1 has the role "tool"; use "system", "user" or "assistant"',
    ),
    "content that is not a string": (
        [chat(("user", [{"type": "text", "text": "What is 2 + 2?"}]), ANSWERED)],
        '1: message 1: "content" must be a non-empty string, got list',
    ),
    "empty content": (
        [chat(ASKED, ("assistant", "  "))],
        '1: message 2: "content" must be a non-empty string',
    ),
    "no user turn": (
        [chat(("system", "Be brief."), ANSWERED)],
        '1: no "user" message; a chat needs the question as a user message and the answer as '
        "the assistant message after it",
    ),
    "no assistant after the last user turn": (
        [chat(ASKED, ANSWERED, ("user", "And 3 + 3?"))],
        "1: no assistant message right after the last user message (message 3); add the answer "
        'there as {"role": "assistant", "content": ...}',
    ),
    "a system turn between the question and its answer": (
        [chat(ASKED, ("system", "Answer in one word."), ANSWERED)],
        "1: no assistant message right after the last user message (message 1); add the answer "
        'there as {"role": "assistant", "content": ...}',
    ),
    "messages not a list": (
        [{"messages": "What is 2 + 2?"}],
        '1: "messages" must be a list of {"role": ..., "content": ...} objects, got str',
    ),
    "no messages": (
        [{"messages": []}],
        "1: no messages; a chat needs a user message and the answer",
    ),
    "a message that is not an object": (
        [{"messages": ["What is 2 + 2?", {"role": "assistant", "content": "4"}]}],
        '1: message 1 is str; write each message as {"role": ..., "content": ...}',
    ),
    "a message without a role": (
        [{"messages": [{"content": "What is 2 + 2?"}]}],
        '1: message 1 has no "role"; every message needs one',
    ),
    "a tool call": (
        [chat(ASKED, ANSWERED, tool_calls=[])],
        '1: message 1 has the key "tool_calls"; a message takes only role, content, name, '
        "weight (tool calls are not supported)",
    ),
    "a weight on a user turn": (
        [chat(ASKED, ANSWERED, weight=0)],
        '1: message 1 has "weight": 0; weight may only be 0 or 1, on an assistant message',
    ),
    "nothing to train": (
        [{"messages": [message(ASKED), message(ANSWERED, weight=0)]}],
        '1: every assistant message has "weight": 0, so nothing in it is trained; drop '
        '"weight" from the answer',
    ),
    "half a character": (
        [chat(("user", "What is \ud83d?"), ANSWERED)],
        "1: message 1 holds a lone surrogate escape (\\ud800 to \\udfff), half of a character; "
        "write the character itself",
    ),
    "a chat record in a question/answer file": (
        [QA, chat(ASKED, ANSWERED)],
        '2: this record is chat ("messages") but the file\'s first record is question/answer; '
        "use one format per file",
    ),
    "a question/answer line in a chat file": (
        [chat(ASKED, ANSWERED), QA],
        '2: this record is question/answer but the file\'s first record is chat ("messages"); '
        "use one format per file",
    ),
    "message lists in a prompt/completion text file": (
        [
            {"prompt": "What is 2 + 2?", "completion": "It is 4."},
            {"prompt": [{"role": "user", "content": "?"}], "completion": []},
        ],
        "2: this record is prompt/completion (message lists) but the file's first record is "
        "prompt/completion (text); use one format per file",
    ),
    "a text completion after a message-list prompt": (
        [{"prompt": [message(ASKED)], "completion": "It is 4."}],
        '1: "completion" must be a list of messages, as in the file\'s first record, got str',
    ),
    "a message-list completion after a text prompt": (
        [{"prompt": "What is 2 + 2?", "completion": [message(ANSWERED)]}],
        '1: "completion" must be a non-empty string, got list',
    ),
    "a prompt without its completion": (
        [{"prompt": "What is 2 + 2?"}],
        '1: "completion" is missing; add a non-empty "completion" string',
    ),
    "an answer in the completion's last turn only": (
        [{"prompt": [message(ASKED)], "completion": [{"role": "user", "content": "4"}]}],
        "1: no assistant message right after the last user message (completion message 1); add "
        'the answer there as {"role": "assistant", "content": ...}',
    ),
}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", list(ERRORS))
def test_a_bad_record_is_the_same_one_line_in_every_script(script, case, cli, tmp_path):
    rows, expected = ERRORS[case]
    write_jsonl(tmp_path / "data.jsonl", rows)
    code, lines = cli(script, "--data", "data.jsonl")
    assert code == 2
    assert lines == [f"error: data.jsonl:{expected}"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_file_of_training_records_only_is_refused_unless_the_run_only_trains(
    script, cli, tmp_path
):
    write_jsonl(tmp_path / "data.jsonl", [{**chat(ASKED, ANSWERED), "split": "train"}])
    code, lines = cli(script, "--data", "data.jsonl")
    refused = 'error: data.jsonl: no "test" examples; mark some lines "split": "test"'
    if script != "dspy_example.py":  # the two that can train without answering say how
        refused += ", or pass --test-limit 0 to only train"
    assert (code, lines) == (2, [refused])


# ------------------------------------------------------------------ files that are not data
CSV = "question,answer\nWhat is 2 + 2?,It is 4.\n"
EXPECTED_QA = [{"question": "What is 2 + 2?", "answer": "It is 4."}]
CSV_COMMAND = (
    'python -c "import csv,json,sys; [print(json.dumps({{k.strip().lower(): v for k, v in '
    "r.items()}}, ensure_ascii=False)) for r in csv.DictReader(open(sys.argv[1], newline='', "
    "encoding='utf-8-sig'){option})]\" {source} > {target}"
)
JSON_COMMAND = (
    'python -c "import json,sys; [print(json.dumps(r, ensure_ascii=False)) for r in '
    "json.load(open(sys.argv[1], encoding='utf-8'))]\" data.json > data.jsonl"
)
SAVE_AS = "save it as CSV UTF-8 in Excel or LibreOffice (File > Save As), then convert the CSV: "
# case: (file name, its bytes, the error line after "error: ", converts to these pairs or None)
WRONG_FILES = {
    "CSV": (
        "data.csv",
        CSV.encode(),
        "data.csv:1: this looks like a CSV file (a header line with commas), not JSON lines; "
        "convert it: " + CSV_COMMAND.format(option="", source="data.csv", target="data.jsonl"),
        EXPECTED_QA,
    ),
    "CSV with semicolons, saved by Excel": (
        "data.csv",
        b"\xef\xbb\xbfQuestion;Answer\r\nWhat is 2 + 2?;It is 4.\r\n",
        "data.csv:1: this looks like a CSV file (a header line with semicolons), not JSON lines;"
        " convert it: "
        + CSV_COMMAND.format(option=", delimiter=';'", source="data.csv", target="data.jsonl"),
        EXPECTED_QA,
    ),
    "tab-separated values with other column names": (
        "data.tsv",
        b"frage\tantwort\nWhat is 2 + 2?\tIt is 4.\n",
        "data.tsv:1: this looks like a CSV file (a header line with tabs), not JSON lines; "
        "convert it: "
        + CSV_COMMAND.format(option=", delimiter='\\t'", source="data.tsv", target="data.jsonl")
        + "; its header must name the columns question and answer",
        None,
    ),
    "a JSON array": (
        "data.json",
        json.dumps(EXPECTED_QA, indent=2).encode(),
        "data.json:1: this looks like one JSON array of records, not JSON lines (one object a "
        "line); convert it: " + JSON_COMMAND,
        EXPECTED_QA,
    ),
    "a JSON array on one line": (
        "data.json",
        json.dumps(EXPECTED_QA).encode(),
        "data.json:1: this looks like one JSON array of records, not JSON lines (one object a "
        "line); convert it: " + JSON_COMMAND,
        EXPECTED_QA,
    ),
    "an Excel workbook": (
        "data.xlsx",
        b"PK\x03\x04\x14\x00\x06\x00\x08\x00\x00\x00!\x00[Content_Types].xml",
        "data.xlsx:1: this is an Excel workbook (.xlsx, a zip file), not JSON lines; "
        + SAVE_AS
        + CSV_COMMAND.format(option="", source="data.csv", target="data.jsonl"),
        None,
    ),
    "an old Excel workbook": (
        "data.xls",
        b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\x00" * 16,
        "data.xls:1: this is an old Excel workbook (.xls), not JSON lines; "
        + SAVE_AS
        + CSV_COMMAND.format(option="", source="data.csv", target="data.jsonl"),
        None,
    ),
    "UTF-16 with a byte-order mark": (
        "data.jsonl",
        (json.dumps(EXPECTED_QA[0]) + "\n").encode("utf-16"),
        "data.jsonl:1: this is UTF-16 text (it starts with a UTF-16 byte-order mark), not "
        "UTF-8; convert it: iconv -f UTF-16 -t UTF-8 data.jsonl > data-utf8.jsonl",
        EXPECTED_QA,
    ),
    "UTF-16 without one": (
        "data.jsonl",
        (json.dumps(EXPECTED_QA[0]) + "\r\n").encode("utf-16-le"),
        "data.jsonl:1: this is UTF-16 text (NUL bytes between the characters), not UTF-8; "
        "convert it: iconv -f UTF-16LE -t UTF-8 data.jsonl > data-utf8.jsonl",
        EXPECTED_QA,
    ),
    "a key in the wrong case": (
        "data.jsonl",
        b'{"Question": "What is 2 + 2?", "answer": "It is 4."}\n',
        'data.jsonl:1: "Question" looks like "question" in the wrong case; rename the key to '
        '"question" (keys are lower case)',
        None,
    ),
    "a key in capitals": (
        "data.jsonl",
        b'{"question": "What is 2 + 2?", "ANSWER": "It is 4."}\n',
        'data.jsonl:1: "ANSWER" looks like "answer" in the wrong case; rename the key to '
        '"answer" (keys are lower case)',
        None,
    ),
    "Messages": (
        "data.jsonl",
        json.dumps({"Messages": chat(ASKED, ANSWERED)["messages"]}).encode(),
        'data.jsonl:1: "Messages" looks like "messages" in the wrong case; rename the key to '
        '"messages" (keys are lower case)',
        None,
    ),
    "a message's Role": (
        "data.jsonl",
        json.dumps({"messages": [{"Role": "user", "content": "?"}]}).encode(),
        'data.jsonl:1: message 1: "Role" looks like "role" in the wrong case; rename the key to '
        '"role" (keys are lower case)',
        None,
    ),
}


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("case", list(WRONG_FILES))
def test_a_wrong_file_is_named_with_the_command_that_converts_it(script, case, cli, tmp_path):
    name, content, expected, _ = WRONG_FILES[case]
    (tmp_path / name).write_bytes(content)
    code, lines = cli(script, "--data", name)
    assert (code, lines) == (2, [f"error: {expected}"])


@pytest.mark.parametrize("case", [case for case, spec in WRONG_FILES.items() if spec[3]])
def test_the_command_the_error_gives_converts_the_file(case, modules, tmp_path, monkeypatch):
    name, content, expected, pairs = WRONG_FILES[case]
    (tmp_path / name).write_bytes(content)
    monkeypatch.chdir(tmp_path)
    module = modules[SCRIPTS[0]]
    with pytest.raises(module.UsageError) as refused:
        module.load_examples(Path(name))
    command = str(refused.value).split("convert it: ", 1)[1]
    assert str(refused.value) == expected
    command = re.sub(r"^python ", shlex.quote(sys.executable) + " ", command)
    subprocess.run(["bash", "-c", command], cwd=tmp_path, check=True, timeout=60)
    target = Path(shlex.split(command)[-1])
    examples = module.load_examples(target, need_test=False)
    assert [{k: e[k] for k in ("question", "answer")} for e in examples] == pairs


# ------------------------------------------------------------------ each script's own use
def test_the_lora_labels_of_a_chat_are_its_assistant_turns_only(modules):
    """Every token of the system and user turns, and the template's markup before each answer,
    is -100; each assistant turn and its end-of-turn token are trained; a turn of weight 0 is
    context only. A plain pair encodes as encode_example's lesson shows it."""
    hf = modules["huggingface_lora.py"]
    tokenizer = hf.build_tiny_tokenizer()
    hf.ensure_chat_template(tokenizer)
    messages = [
        {"role": "system", "content": OWN_SYSTEM},
        *GREETING,
        {"role": "user", "content": ROWS[1]["question"]},
        {"role": "assistant", "content": ROWS[1]["answer"]},
    ]
    row = hf.encode_chat(tokenizer, messages)
    end = "<|im_end|>"
    assert trained_runs(tokenizer, row) == [GREETING[1]["content"] + end, ROWS[1]["answer"] + end]
    assert tokenizer.decode(row["input_ids"]) == tokenizer.apply_chat_template(
        messages, tokenize=False
    ).removesuffix("\n")  # the whole chat, up to the last end of turn
    pairs = zip(row["input_ids"], row["labels"], strict=True)
    untrained = tokenizer.decode([token for token, label in pairs if label == -100])
    for text in (OWN_SYSTEM, "Hello!", ROWS[1]["question"], "<|im_start|>assistant\n"):
        assert text in untrained

    weighted = [m | {"weight": 0} if m is GREETING[1] else m for m in messages]
    assert trained_runs(tokenizer, hf.encode_chat(tokenizer, weighted)) == [ROWS[1]["answer"] + end]

    pair = hf.chat(ROWS[1]["question"], ROWS[1]["answer"])
    assert hf.encode_chat(tokenizer, pair) == hf.encode_example(
        tokenizer, ROWS[1]["question"], ROWS[1]["answer"], system_in_user=False
    )


def test_a_base_models_fallback_template_trains_each_answer_and_its_eos(modules):
    hf = modules["huggingface_lora.py"]
    tokenizer = hf.build_tiny_tokenizer()
    tokenizer.chat_template = None  # a base model's tokenizer
    tokenizer.eos_token = "<|endoftext|>"
    assert hf.ensure_chat_template(tokenizer) is True
    messages = [
        *GREETING,
        {"role": "user", "content": "Why?"},
        {"role": "assistant", "content": "Because."},
    ]
    row = hf.encode_chat(tokenizer, messages)
    assert trained_runs(tokenizer, row) == [
        GREETING[1]["content"] + "<|endoftext|>",
        "Because.<|endoftext|>",
    ]


def trained_runs(tokenizer, row: dict) -> list[str]:
    """The trained stretches of a row, each decoded."""
    runs, current = [], []
    for token, label in zip(row["input_ids"], row["labels"], strict=True):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return [tokenizer.decode(run) for run in [*runs, current] if run]


def test_the_lora_script_asks_a_chats_test_question_with_its_own_messages(modules):
    hf = modules["huggingface_lora.py"]
    messages = records("chat", ROWS[:1])[0]["messages"]
    asked = hf.test_prompt({"question": ROWS[0]["question"], "messages": messages})
    assert asked == messages[:-1]  # its system prompt and greeting, up to the last user turn
    assert hf.prompt_chat(asked, system_in_user=False) == asked
    assert hf.prompt_chat(asked, system_in_user=True)[0] == {
        "role": "user",
        "content": f"{OWN_SYSTEM}\n\n{GREETING[0]['content']}",
    }
    assert hf.test_prompt({"question": "Why?"}) == "Why?"  # a pair: the script's own chat


def split_records(modules, data: Path, split: str) -> list[dict]:
    """The records of a file that are in this split, in file order."""
    examples = modules["openai_finetune.py"].load_examples(data)
    given = [json.loads(line) for line in data.read_text("utf-8").splitlines()]
    return [r for r, e in zip(given, examples, strict=True) if e["split"] == split]


def test_openai_finetune_uploads_a_chats_messages_as_they_are(run_script, modules, tmp_path):
    data = data_file(tmp_path, "chat")
    result = run_script("openai_finetune.py", "--data", str(data), env=ENV)
    assert result.returncode == 0, result.output[-3000:]
    written = []
    for name in ("openai_edu_qa_training.jsonl", "openai_edu_qa_validation.jsonl"):
        written += (tmp_path / "outputs" / "openai" / name).read_text("utf-8").splitlines()
    train = split_records(modules, data, "train")
    expected = [json.dumps({"messages": r["messages"]}, ensure_ascii=False) for r in train]
    assert sorted(written) == sorted(expected)  # byte for byte: no id, subject, split or "source"


@pytest.fixture
def fake_api():
    fake = FakeAPI("openai", "sk-test-formats").start()
    yield fake
    fake.stop()


def real_openai_run(run_script, fake: FakeAPI, data: Path, *args: str):
    return run_script(
        "openai_finetune.py",
        "--run",
        "--yes",
        "--base-url",
        fake.base_url,
        "--poll-interval",
        "0.02",
        "--data",
        str(data),
        *args,
        env={"OPENAI_API_KEY": fake.key},
        timeout=120,
    )


def test_openai_finetune_asks_a_chats_test_question_with_its_own_messages(
    run_script, modules, fake_api, tmp_path
):
    data = data_file(tmp_path, "chat")
    result = real_openai_run(run_script, fake_api, data, "--test-limit", "2")
    assert result.returncode == 0, result.output[-3000:]
    tests = split_records(modules, data, "test")[:2]
    asked = [json.loads(r["body"])["messages"] for r in fake_api.calls("POST", "/chat/completions")]
    # base then tuned for each question, each with the record's messages up to its last user turn
    assert asked == [r["messages"][:-1] for r in tests for _ in range(2)]
    out = json.loads((tmp_path / "outputs" / "results" / "openai.json").read_text())
    assert [q["question"] for q in out["questions"]] == [
        r["messages"][-2]["content"] for r in tests
    ]
    assert [q["reference"] for q in out["questions"]] == [
        r["messages"][-1]["content"] for r in tests
    ]


def train_only_file(folder: Path) -> Path:
    """A chat file another tool exported: training records only, each marked so."""
    rows = [{**r, "split": "train"} for r in records("chat", ROWS[:16])]
    return write_jsonl(folder / "train-only.jsonl", rows)


def test_openai_finetune_with_test_limit_0_trains_and_answers_nothing(
    run_script, fake_api, tmp_path
):
    result = real_openai_run(run_script, fake_api, train_only_file(tmp_path), "--test-limit", "0")
    assert result.returncode == 0, result.output[-3000:]
    assert len(fake_api.jobs) == 1 and fake_api.calls("POST", "/chat/completions") == []
    assert "--test-limit 0: train only; no test question is answered" in result.stdout
    assert "nothing is scored and no results file is written" in flat(result.stdout)
    assert not (tmp_path / "outputs" / "results").exists()


def test_huggingface_lora_with_test_limit_0_trains_on_a_train_only_file(run_script, tmp_path):
    args = ("--model", "tiny", "--run", "--test-limit", "0", "--max-steps", "2")
    result = run_script("huggingface_lora.py", "--data", str(train_only_file(tmp_path)), *args)
    assert result.returncode == 0, result.output[-3000:]
    out = tmp_path / "outputs"
    assert (out / "huggingface" / "adapter" / "adapter_model.safetensors").is_file()
    assert "trained steps 1..2" in result.stdout
    stage_5 = between(result.stdout, "Stage 5/6", "Stage 6/6")
    assert "--test-limit 0: train only; no test question is answered" in stage_5
    assert "nothing is scored and no results file is written" in flat(result.stdout)
    assert not (out / "results").exists()
