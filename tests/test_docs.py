"""The documentation cannot go stale unnoticed.

- docs/dry-runs.md is what the three dry runs print now (docs/build.py, `make docs`), the
  machine's own figures aside.
- README.md, read by a real Markdown parser (markdown-it-py, CommonMark, what rich uses): its
  second-level headings are exactly the sections its contents line lists (a wrapped line that
  begins with "#" would become a heading of its own), and every relative link and image points
  to a file that exists and, with a #fragment, to a heading or anchor in it.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
from conftest import REPO
from markdown_it import MarkdownIt


def load_build():
    spec = importlib.util.spec_from_file_location("docs_build", REPO / "docs" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_dry_run_transcripts_are_what_the_scripts_print_now():
    build = load_build()
    committed = build.TARGET.read_text(encoding="utf-8")
    stale = build.stale_lines(committed, build.document())
    assert not stale, "docs/dry-runs.md is out of date, run `make docs`:\n" + "\n".join(stale[:60])


def test_a_changed_line_is_caught_and_the_machines_figures_are_not():
    build = load_build()
    text = "Stage 3/6\nestimated 4.2 min at 31.5 GFLOP/s\n99 steps\n"
    assert not build.stale_lines(text, text.replace("4.2", "9.0").replace("31.5", "12"))
    assert build.stale_lines(text, text.replace("99 steps", "98 steps"))
    # a figure with another number of digits wraps the paragraph elsewhere: not a change
    wrapped = "roughly 5 min of training, and\nthe rest"
    assert not build.stale_lines(wrapped, "roughly 23 min of\ntraining, and the rest")
    assert build.stale_lines(wrapped, "roughly 23 min of\ntesting, and the rest")


def tokens(path: Path):
    return MarkdownIt("commonmark").enable("table").parse(path.read_text(encoding="utf-8"))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path: Path) -> list[tuple[int, str]]:
    found, parsed = [], tokens(path)
    for i, token in enumerate(parsed):
        if token.type == "heading_open":
            found.append((int(token.tag[1]), parsed[i + 1].content))
    return found


def anchors(path: Path) -> set[str]:
    text = path.read_text(encoding="utf-8")
    return {slug(title) for _, title in headings(path)} | set(re.findall(r'<a id="([^"]+)"', text))


def test_the_readme_has_the_sections_its_contents_line_lists_and_no_stray_heading():
    readme = REPO / "README.md"
    sections = [slug(title) for level, title in headings(readme) if level == 2]
    text = readme.read_text(encoding="utf-8")
    contents = re.search(r"^Contents: (.+?)\n\n", text, re.MULTILINE | re.DOTALL)
    assert contents, "README.md has a line starting 'Contents: ' that links every section"
    listed = re.findall(r"\]\(#([^)]+)\)", contents.group(1))
    assert sections == listed


def links(path: Path) -> list[str]:
    found = []

    def walk(items):
        for token in items:
            if token.type == "link_open":
                found.append(token.attrGet("href"))
            if token.type == "image":
                found.append(token.attrGet("src"))
            walk(token.children or [])

    walk(tokens(path))
    return found


@pytest.mark.parametrize("document", ["README.md", "bench/README.md", "docs/dry-runs.md"])
def test_every_relative_link_and_image_resolves(document):
    source = REPO / document
    for href in links(source):
        if re.match(r"[a-z]+:", href):  # https:, mailto:
            continue
        target, _, fragment = href.partition("#")
        path = (source.parent / target).resolve() if target else source
        assert path.exists(), f"{document}: {href} points to no file"
        if fragment and path.suffix == ".md":
            assert fragment in anchors(path), f"{document}: {href}: no such heading or anchor"
