"""Each script reads like a tutorial: the stages first, the plumbing after, the shared part last.

A reader opens one file and finds, in the first 200 lines, what it does and in what order:
settings, main() as the table of contents, then the six stages with the same parameters in all
three scripts. The helpers every script carries (data, metric, results, comparison, errors) are
one block of text at the end, byte for byte the same in the three files, so a fix made in one
is a fix to copy to the other two, and this test says when that was forgotten.
"""

from __future__ import annotations

import ast
import difflib

import pytest
from conftest import REPO

SCRIPTS = ["dspy_example.py", "openai_finetune.py", "huggingface_lora.py"]
STAGES = ["prepare_data", "format_data", "configure_model", "tune", "answer", "compare"]
# The parameters of each stage, in order, in every script: a reader of one knows the others.
SIGNATURES = {
    "prepare_data": ["cfg"],
    "format_data": ["cfg", "data"],
    "configure_model": ["cfg", "formatted"],
    "tune": ["cfg", "formatted", "plan"],
    "answer": ["cfg", "data", "formatted", "plan", "tuned"],
    "compare": ["cfg", "plan", "tuned", "answers", "seconds"],
}
FIRST_STAGE_WITHIN = 200  # lines
LONGEST_STAGE = 60  # lines, from `def` to the last line
BANNER = (
    "# =====================================================================================\n"
    "# Shared helpers: data, metric, results, comparison, errors (the same text in each approach)\n"
    "# =====================================================================================\n"
)
# What may differ between the scripts' shared parts: nothing. APPROACH, the one name that
# differs, is set in each script's settings, above the block.
ALLOWED_DIFFERENCES: list[str] = []


def source(script: str) -> str:
    return (REPO / script).read_text(encoding="utf-8")


def functions(script: str) -> dict[str, ast.FunctionDef]:
    tree = ast.parse(source(script))
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


def shared_block(script: str) -> str:
    text = source(script)
    assert text.count(BANNER) == 1, f"{script}: the shared block's banner must appear once"
    return text[text.index(BANNER) :]


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_first_stage_starts_within_the_first_200_lines(script):
    start = functions(script)["prepare_data"].lineno
    assert start <= FIRST_STAGE_WITHIN, f"{script}: prepare_data starts at line {start}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_main_comes_first_then_the_six_stages_in_order_with_nothing_between(script):
    tree = ast.parse(source(script))
    names = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    first = names.index("main")
    assert names[first : first + 7] == ["main", *STAGES], names[first : first + 7]


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_stage_is_longer_than_60_lines(script):
    defs = functions(script)
    lengths = {name: defs[name].end_lineno - defs[name].lineno + 1 for name in STAGES}
    too_long = {name: n for name, n in lengths.items() if n > LONGEST_STAGE}
    assert not too_long, f"{script}: {too_long}"


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_stages_take_the_same_arguments_in_the_same_order(script):
    defs = functions(script)
    for name, expected in SIGNATURES.items():
        got = [arg.arg for arg in defs[name].args.args]
        assert got == expected, f"{script}: {name}({', '.join(got)})"


@pytest.mark.parametrize("script", SCRIPTS)
def test_ask_is_one_function(script):
    assert "ask" in functions(script)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_shared_block_is_last(script):
    block = shared_block(script)
    assert block.endswith('\nif __name__ == "__main__":\n    sys.exit(run_cli(main))\n')


def test_the_shared_block_is_the_same_text_in_the_three_scripts():
    first, *others = SCRIPTS
    reference = shared_block(first).splitlines(keepends=True)
    for script in others:
        lines = shared_block(script).splitlines(keepends=True)
        diff = [
            line
            for line in difflib.unified_diff(reference, lines, first, script, n=1)
            if line not in ALLOWED_DIFFERENCES
        ]
        assert not diff, "".join(diff[:40])


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_copied_script_names_no_file_it_does_not_ship_with(script):
    text = source(script)
    for word in ("CONVENTIONS", "contract", "../shared"):
        assert word not in text, f"{script} mentions {word!r}, which a copied script lacks"


@pytest.mark.parametrize("script", SCRIPTS)
def test_no_shared_helper_takes_the_name_of_one_of_the_scripts_own(script):
    """The shared block comes last, so a name it defines again silently replaces the script's
    own (a shared `usd()` once replaced openai_finetune.py's, and its stage 3 crashed)."""
    text = source(script)
    banner_line = text[: text.index(BANNER)].count("\n") + 1
    own, shared = set(), set()
    for node in ast.parse(text).body:
        names = {node.name} if isinstance(node, ast.FunctionDef | ast.ClassDef) else set()
        names |= {t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)}
        (own if node.lineno < banner_line else shared).update(names)
    assert not own & shared, f"defined in the script and again in the shared block: {own & shared}"


def test_option_is_the_same_text_in_the_three_scripts():
    """Config's option() must come before Config, so it cannot live in the shared block at the
    end; it is shared all the same, word for word."""

    def option(script: str) -> str:
        node = functions(script)["option"]
        return "\n".join(source(script).splitlines()[node.lineno - 1 : node.end_lineno])

    first, *others = SCRIPTS
    for script in others:
        assert option(script) == option(first), f"{script}'s option() differs from {first}'s"


def test_no_tracked_file_is_a_symbolic_link():
    """A clone must hold files, not links into the machine it was made on: a committed `.venv`
    link once replaced the environment of whoever pulled it, and a fresh clone's `make install`
    failed on it ("File exists")."""
    import shutil
    import subprocess

    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    listing = subprocess.run(
        ["git", "ls-files", "-s"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    links = [line.split("\t", 1)[1] for line in listing.splitlines() if line.startswith("120000")]
    assert not links, f"tracked symbolic links: {links}"
