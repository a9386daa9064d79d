# RLHF Studio. The two commands a newcomer needs:
#   make run    venv, install, fetch default models, initialise the database with the sample project, start the app
#   make test   install what tests need (PostgreSQL, Chromium), start a throwaway PostgreSQL, run the whole suite
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: run test venv models init serve bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "$(PYTHON) not found: RLHF Studio needs Python 3.11" >&2; exit 1; }
	[ -x $(BIN)/python ] || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

models: venv
	$(BIN)/rlhf models fetch

init: venv
	$(BIN)/rlhf init --sample

serve: venv
	@echo "RLHF Studio on http://localhost:8501"
	$(BIN)/rlhf serve --port 8501

run: models init serve

test: venv
	bash scripts/test.sh

# The quick benchmarks (minutes); rm_bench.py and ppo_bench.py train real models and take much longer.
bench: venv
	$(BIN)/python benchmarks/io_bench.py
	$(BIN)/python benchmarks/agreement_bench.py
	$(BIN)/python benchmarks/assign_bench.py --db sqlite

clean:
	rm -rf $(VENV) build *.egg-info tests/artifacts
