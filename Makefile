# Two commands do everything: `make train` and `make test` (`make test-fast`: the quick loop). Each sets up what it needs first.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: install data train test test-fast benchmark clean

install: $(STAMP)

# Re-runs only when pyproject.toml changes; a second `make install` is a no-op.
$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,wandb,sweep]'
	@touch $(STAMP)

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

test: install data
	$(PY) -m pytest -q

# The quick loop while editing: everything but the end-to-end runs (marked slow) and the wheel
# check (marked install); `make test` still runs all of them.
test-fast: install
	$(PY) -m pytest -q -m "not slow and not install"

benchmark: install data
	$(PY) experiments/fashion_transfer/benchmark.py

clean:
	rm -rf outputs multirun .pytest_cache build dist   # .venv and .venv-wheelcheck stay (slow to rebuild)
