# The two commands: `make demo` and `make test`. Each creates or refreshes .venv itself.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test venv bench clean

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (Python >= 3.11)"; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	$(BIN)/pip install -q -e '.[test,load]'
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tickcast actors serve_app training tests

demo: $(STAMP)
	$(BIN)/python -m tickcast.demo

bench: $(STAMP)
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.inference
	$(BIN)/python -m bench.drift
	$(BIN)/python -m bench.serve

clean:
	rm -rf $(VENV) .pytest_cache data registry reports
