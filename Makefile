# The two commands: `make demo` and `make test`. Each creates or refreshes .venv itself.
# Operations: `make lint` (ruff + mypy), `make image` / `make image-test` (container image),
# `make tools` (promtool and prometheus for the alert-rule and metrics tests).
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# Container engine: docker when its daemon answers, else podman.
ENGINE ?= $(shell if docker info >/dev/null 2>&1; then echo docker; elif command -v podman >/dev/null 2>&1; then echo podman; fi)
IMAGE ?= tickcast:latest
# Host networking for the build's apt/pip downloads (sandboxes without a bridge network), and
# this host's pip configuration and CA bundle when it has a pip.conf (podman can mount them into
# the build; pip there may only reach PyPI through a TLS-re-signing proxy).
HOST_PIP := $(if $(and $(filter podman,$(ENGINE)),$(wildcard /etc/pip.conf)),-v /etc/pip.conf:/etc/pip.conf:ro -v /etc/ssl/certs/ca-certificates.crt:/etc/pip-host-ca.crt:ro --build-arg PIP_CERT=/etc/pip-host-ca.crt)
# podman writes OCI images by default, which have no HEALTHCHECK: ask for Docker's format.
BUILD_OPTS ?= --network host $(if $(filter podman,$(ENGINE)),--format docker) $(HOST_PIP)

.PHONY: demo test venv bench clean lint tools image image-test

$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (Python >= 3.11)"; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel
	$(BIN)/pip install -q -e '.[test,load]'
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tickcast actors serve_app training tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

demo: $(STAMP)
	$(BIN)/python -m tickcast.demo

bench: $(STAMP)
	$(BIN)/python -m bench.ingest
	$(BIN)/python -m bench.inference
	$(BIN)/python -m bench.drift
	$(BIN)/python -m bench.serve
	$(BIN)/python -m bench.scale
	$(BIN)/python -m bench.feature_cache
	$(BIN)/python -m bench.safety_days
	$(BIN)/python -m bench.gaps
	$(BIN)/python -m bench.consensus
	$(BIN)/python -m bench.storage
	$(BIN)/python -m bench.calendar

# promtool (alert rules) and prometheus (the metrics test) from Debian's `prometheus` package.
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || { \
	  SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
	  $$SUDO apt-get update -q && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	    apt-get install -y -q --no-install-recommends prometheus; }
	promtool --version | head -1

image:
	@test -n "$(ENGINE)" || { echo "need docker (with a running daemon) or podman"; exit 1; }
	$(ENGINE) build $(BUILD_OPTS) -t $(IMAGE) .

# Builds the image, runs it with no arguments and checks that POST /v1/predict answers (the
# first start trains small models: a few minutes), then the same through compose.yaml when
# docker compose or podman-compose exists. Not part of `make test`.
image-test: image $(STAMP)
	TICKCAST_IMAGE=$(IMAGE) TICKCAST_CONTAINER_ENGINE=$(ENGINE) \
	  $(BIN)/python -m pytest -q -rP -p no:cacheprovider tests/ops/test_image.py

clean:
	rm -rf $(VENV) .pytest_cache data registry reports
