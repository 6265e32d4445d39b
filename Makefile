# make demo   dry runs of the three scripts, then a real offline smoke run (tiny local model)
# make test   lint, then the offline test suite (what CI runs)
# Both create .venv with python3 if it is missing and install requirements.txt into it,
# again only when requirements.txt has changed since the last install.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-requirements

.PHONY: demo test lint format install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The stamp is a copy of the requirements last installed: a touched but unchanged file
# installs nothing.
$(STAMP): requirements.txt | $(PY)
	@if cmp -s requirements.txt $(STAMP); then touch $(STAMP); else \
		$(PY) -m pip install -r requirements.txt && cp requirements.txt $(STAMP); fi

install: $(STAMP)

# The demo sends nothing, spends nothing and downloads no model: three dry runs (the default
# models, sized from what is known offline), then the LoRA script trains a tiny model built
# locally, for real, in seconds (its answers are noise: it checks the plumbing).
demo: install
	HF_HUB_OFFLINE=1 $(PY) dspy_example.py
	HF_HUB_OFFLINE=1 $(PY) openai_finetune.py
	HF_HUB_OFFLINE=1 $(PY) huggingface_lora.py
	HF_HUB_OFFLINE=1 $(PY) huggingface_lora.py --model tiny --run

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest

clean:
	rm -rf outputs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
