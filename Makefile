# histoclip: `make demo` runs the workflow on the synthetic demo cohort, `make test` runs every test.
# Both create .venv and install everything first (torch and torchvision first, in one pip call, as the
# pinned pair; then the project with its test extras, constrained to constraints.txt).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= 2
# The demo's settings; `make check CONFIG=my_cohort.yaml` checks a real cohort (a copy of config/config.yaml).
DEMO   := --configfile config/demo.yaml
CONFIG ?= config/demo.yaml
export PATH := $(CURDIR)/$(BIN):$(PATH)
export HF_HUB_OFFLINE ?= 1

.PHONY: install demo check test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test,conch,czi]'
	touch $(STAMP)

demo: install
	$(BIN)/snakemake --cores $(CORES) demo_cohort $(DEMO)
	$(BIN)/snakemake --cores $(CORES) $(DEMO)

check: install
	$(BIN)/snakemake --cores $(CORES) check --configfile $(CONFIG)

lint: install
	$(BIN)/ruff check src scripts tests benchmarks
	$(BIN)/snakemake --lint $(DEMO)

test: lint
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python benchmarks/bench_tiling.py
	$(BIN)/python benchmarks/bench_embedding.py
	$(BIN)/python benchmarks/bench_cohort_embedding.py
	$(BIN)/python benchmarks/bench_dag.py
	$(BIN)/python benchmarks/bench_preflight.py
	$(BIN)/python benchmarks/bench_backends.py
	$(BIN)/python benchmarks/bench_report.py

clean:
	rm -rf results/* .snakemake
	touch results/.gitkeep
