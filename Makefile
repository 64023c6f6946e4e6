# Two commands do everything: `make train` and `make test` (`make test-fast`: the quick loop). Each sets up what it needs first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# Hydra's Optuna sweeper caps optuna below 3; the protocol needs optuna 4: the sweeper gets its own
# environment (the optuna-sweeper extra), built the same way, where `make test` runs its tests
SWEEPER_VENV  ?= .venv-sweeper
SWEEPER_PY    := $(SWEEPER_VENV)/bin/python
SWEEPER_STAMP := $(SWEEPER_VENV)/.installed-stamp
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: install install-sweeper data train test test-fast benchmark clean

install: $(STAMP)

install-sweeper: $(SWEEPER_STAMP)

# Re-runs only when pyproject.toml changes; a second `make install` is a no-op.
$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,wandb,sweep,bench]'
	@touch $(STAMP)

$(SWEEPER_STAMP): pyproject.toml setup.py
	@test -x $(SWEEPER_VENV)/bin/pip || python3 -m venv --clear $(SWEEPER_VENV)   # (again when an interrupted start left no pip)
	$(SWEEPER_PY) -m pip install -q --disable-pip-version-check -e '.[dev,optuna-sweeper]'
	@touch $(SWEEPER_STAMP)

# Debian's Fashion-MNIST package: the real data available offline.
data:
	@if [ ! -d $(FMNIST) ]; then \
	  if command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null \
	      || echo "warning: could not install dataset-fashion-mnist; tests that need it will skip"; \
	  else echo "warning: no apt-get; Fashion-MNIST will be downloaded by torchvision if online"; fi; \
	fi

train: install data
	$(PY) experiments/fashion_transfer/two_stage.py

# everything: the tests that need Hydra's Optuna sweeper (marked optuna_sweeper) in its environment, the rest here
test: install install-sweeper data
	$(PY) -m pytest -q -m "not optuna_sweeper"
	SSKT_REQUIRE_OPTUNA_SWEEPER=1 $(SWEEPER_PY) -m pytest -q -m optuna_sweeper

# The quick loop while editing: everything but the end-to-end runs (marked slow) and the wheel
# check (marked install); `make test` still runs all of them.
test-fast: install
	$(PY) -m pytest -q -m "not slow and not install and not optuna_sweeper"

benchmark: install data
	$(PY) experiments/fashion_transfer/benchmark.py

clean:
	rm -rf outputs multirun .pytest_cache build dist   # .venv, .venv-sweeper and .venv-wheelcheck stay (slow to rebuild)
