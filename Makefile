# The README's two commands: `make run` (the main job on the embedded default) and `make test`.
# Both do their own set-up: .venv is created or reused, torch==2.13.0 (CPU) installed first when no
# torch is importable, then this package with its stack.
SHELL := /bin/bash
VENV ?= .venv
BIN := $(VENV)/bin
export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_HOME ?= $(abspath .prefect)
OVERRIDES ?=

.PHONY: setup run test test-fast lint format params lock check-reference bench bench-train bench-packing bench-packing-long-tail bench-eval bench-gpu bench-quant bench-e2e bench-prepare bench-cpu-kernels bench-stage-startup bench-dvc-yaml bench-fork-dvc bench-run-end bench-first-stage clean

setup:
	@bash scripts/setup.sh

run: setup ## compose conf/ and run the whole pipeline (Prefect flow over DVC stages)
	$(BIN)/qlora-pipeline run $(OVERRIDES)

test: setup lint ## lint, type-check, then the whole test suite (CPU; GPU tests skip)
	$(BIN)/pytest -q --durations=12

test-fast: setup
	$(BIN)/pytest -q -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

params: setup ## re-compose params.yaml from conf/
	$(BIN)/qlora-pipeline compose

lock: setup ## re-pin requirements.lock to what .venv has (after changing dependencies)
	{ sed -n '1,4p' requirements.lock; $(BIN)/pip freeze --exclude-editable | grep -v -e '^qlora-pipeline' -e '^uv==' | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

check-reference: run ## after `make run`: the committed reference run must be reproduced exactly
	git diff --exit-code --stat -- dvc.lock reports/metrics.json reports/summary.json reports/scores.csv
	@echo "reference run reproduced: dvc.lock and reports/metrics.json unchanged"

bench: bench-quant bench-train bench-packing bench-eval bench-e2e bench-dvc-yaml bench-fork-dvc bench-run-end bench-prepare ## every benchmark of benchmarks/RESULTS.md

bench-train: run ## pipeline QLoRA/LoRA vs the stock Trainer+PEFT+bitsandbytes recipe, side by side
	$(BIN)/python benchmarks/bench_train.py

bench-packing: run ## data.packing on vs per-batch padding in the pipeline's training, side by side
	$(BIN)/python benchmarks/bench_packing.py

GSM8K ?= ../shared/datasets/gsm8k
LONG_TAIL := $(or $(TMPDIR),/tmp)/qlora-pipeline-long-tail.jsonl
bench-packing-long-tail: run ## the same on a long-tailed mix: the default data + GSM8K (GSM8K=folder holding its train.jsonl)
	$(BIN)/python benchmarks/long_tail_data.py $(GSM8K) $(LONG_TAIL)
	$(BIN)/python benchmarks/bench_packing.py --steps 150 --out benchmarks/results/packing_long_tail.json \
	  data=local data.path=$(LONG_TAIL) data.max_length=128 data.length_policy=drop data.dedupe=false

bench-eval: run ## the evaluate stage at several eval.batch_size values, side by side (and same answers?)
	$(BIN)/python benchmarks/bench_eval.py

bench-gpu: run ## on a GPU: real-size random-init Llama 1B and 8B, 50 steps of 2048 tokens, vs stock
	$(BIN)/python benchmarks/bench_train.py --shape llama-1b --steps 50
	$(BIN)/python benchmarks/bench_train.py --shape llama-8b --steps 50

bench-quant: run ## measured bits per parameter of 4-bit weights vs 4.127 / 4.5, footprint vs bf16
	$(BIN)/python benchmarks/bench_quant.py

bench-e2e: setup ## the default run cold and warm in a scratch copy: compute vs orchestration
	$(BIN)/python benchmarks/bench_e2e.py

bench-cpu-kernels: setup ## speed of native vs pinned (avx2) CPU kernels, side by side
	$(BIN)/python benchmarks/bench_cpu_kernels.py

bench-stage-startup: setup ## stage commands in their own process vs in the flow's fork server, side by side
	$(BIN)/python benchmarks/bench_stage_startup.py

bench-dvc-yaml: setup ## DVC's per-stage YAML parsing with ruamel's C parser vs pure Python, side by side
	$(BIN)/python benchmarks/bench_dvc_yaml.py

bench-fork-dvc: run ## DVC's time around a stage in the fork server, as it runs and with its preparations for DVC undone, side by side
	$(BIN)/python benchmarks/bench_fork_dvc.py

bench-run-end: run ## a warm no-op run as it ends and with its fast exit or Prefect's heartbeats undone, side by side
	$(BIN)/python benchmarks/bench_run_end.py

bench-first-stage: setup ## a fresh clone's start to its first stage, as it runs and with two changes tried (not kept), side by side
	$(BIN)/python benchmarks/bench_first_stage.py

bench-prepare: setup ## time the prepare step on 100k generated rows (prints a table)
	$(BIN)/python benchmarks/bench_prepare.py

clean: ## remove generated outputs (DVC's cache keeps them restorable)
	rm -rf models data/prepared results .prefect
