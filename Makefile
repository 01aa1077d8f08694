# simmer: the README's two commands are `make run` and `make test`.
SHELL := /bin/bash
PY_BOOT ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BUNDLE ?= models/default
RUN_DIR ?= runs/quick
PRESET ?= quick
HOST ?= 127.0.0.1
PORT ?= 8000
CACHE ?= $(HOME)/.cache/simmer

.PHONY: install system-deps corpus model run serve test lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PY_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[train,dev]"
	touch $(STAMP)

# Debian tools the test suite drives: redis-server, prometheus/promtool, chromium.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	test -x /usr/bin/chromium || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

corpus: install
	@$(PY) -m training.fetch --cache $(CACHE) >/dev/null

model: corpus
	@if [ -f $(BUNDLE)/manifest.json ]; then \
		echo "bundle found at $(BUNDLE)"; \
	else \
		corpus=$$($(PY) -m training.fetch --cache $(CACHE)) && \
		$(PY) -m training --data "$$corpus" --out $(RUN_DIR) --preset $(PRESET) && \
		$(PY) -m export --checkpoint $(RUN_DIR) --out $(BUNDLE) --data "$$corpus"; \
	fi

run: model
	SIMMER_BUNDLE=$(BUNDLE) SIMMER_HOST=$(HOST) SIMMER_PORT=$(PORT) $(PY) -m service

serve: install
	SIMMER_BUNDLE=$(BUNDLE) SIMMER_HOST=$(HOST) SIMMER_PORT=$(PORT) $(PY) -m service

test: install system-deps
	$(PY) -m pytest

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy .

# Not part of `make test` (tests/bench runs it at tiny sizes). Needs the train extras to
# build the random book-size bundle once into $(CACHE)/bench-bundles.
bench: install
	$(PY) -m bench --out bench-results/bench.json --cache $(CACHE)

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
