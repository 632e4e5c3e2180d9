# richpref: `make demo` curates the bundled prompts end to end on the tiny profile; `make test` runs the suite.
# Both create the virtual environment and install what they need on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DATA ?= data
MODELS ?= $(DATA)/models/tiny
RUN ?= demo
TEST_WORKERS ?= 2

# Offline by design: a model that is not local fails at once instead of retrying the Hub.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_DISABLE_PROGRESS_BARS := 1
export TRANSFORMERS_VERBOSITY := error

.PHONY: install models demo test bench serve system-packages clean-runs help

help:
	@echo "make demo   - install, build tiny models, curate bundled prompts, print a duckdb summary"
	@echo "make test   - install and run the test suite"
	@echo "make serve  - local Prefect server (127.0.0.1:4200) + work pools + deployments + a worker"
	@echo "make bench  - run the benchmarks in bench/ (prints figures)"

# uv installs what pip would, from pip's own indexes and constraints, in a quarter of pip's time
# (tools/install.py; pip is the fallback).
$(VENV)/.installed: pyproject.toml tools/install.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PYTHON) tools/install.py $(PY) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

$(MODELS)/BUILD.json: $(VENV)/.installed
	$(VENV)/bin/richpref models build-tiny $(MODELS)

models: $(MODELS)/BUILD.json

demo: models
	$(VENV)/bin/richpref --data-dir $(DATA) curate --profile tiny --run $(RUN)
	@echo
	@echo "Query it:  $(VENV)/bin/richpref --data-dir $(DATA) inspect $(RUN)"
	@echo "      or:  $(VENV)/bin/richpref --data-dir $(DATA) inspect $(RUN) -c \"select status, reason, count(*) from filter group by all\""

# Debian packages some tests need, installed in one apt-get call where missing (when we can: root + apt):
# chromium renders the report test's HTML; postgresql and iproute2 run the multi-node test's Prefect server
# and network namespaces (tests/scenarios/test_multinode.py).
system-packages:
	@missing=""; command -v chromium >/dev/null || missing=" chromium"; \
	{ ls /usr/lib/postgresql/*/bin/initdb || command -v initdb; } >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v ip >/dev/null || missing="$$missing iproute2"; \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && apt-get install -y -qq $$missing) >/dev/null 2>&1; } \
	  || echo "note: could not install$$missing (apt-get install$$missing); the tests that need them will fail or skip"

# The tests build the tiny models into $(MODELS) once and reuse them there (as `make demo` does); they
# are rebuilt when their builders change (tests/conftest.py `tiny_models`). Saves ~100 s a run.
# Two pytest workers, one test file each at a time (module fixtures stay shared; the files sharing a costly
# session fixture go to one worker: tests/conftest.py `xdist_groups`): the suite is mostly one busy core,
# so the second core halves its wall. The tiny models are built once before they start.
# The venv install and the Debian packages run side by side (apt mostly waits on the network and disk).
test:
	$(MAKE) --no-print-directory -j2 install system-packages
	export RICHPREF_TEST_MODELS="$${RICHPREF_TEST_MODELS:-$(abspath $(MODELS))}"; \
	$(VENV)/bin/richpref models build-tiny "$$RICHPREF_TEST_MODELS" > /dev/null && \
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup --durations=25 tests

serve: models
	$(VENV)/bin/richpref --data-dir $(DATA) serve

bench: models
	@echo "Benchmarks print figures; recorded results and their commands: docs/benchmarks.md"
	$(PY) bench/vlm_stages.py --n 32 --repeats 2
	$(PY) bench/image_stages.py --repeats 3
	$(PY) bench/rewards.py --models $(MODELS) --repeats 5
	$(PY) bench/reliability.py overhead --items 1024 --models $(MODELS)
	$(PY) bench/reliability.py resume --items 1024 --models $(MODELS)
	$(PY) bench/reliability.py memory --items 256 4096 --models $(MODELS)
	$(PY) bench/edit_candidates.py --items 32 --num-edits 1 2 4 --models $(MODELS)
	$(PY) bench/demo_budget.py
	@echo "bench/dpo_step.py needs a diffusers checkout: see docs/benchmarks.md"

clean-runs:
	rm -rf $(DATA)/runs $(DATA)/.prefect
