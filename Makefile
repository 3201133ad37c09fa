# moelens — everything a fresh machine needs is here: `make demo`, `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU wheel of torch first (override: make TORCH=torch), then the package in editable mode.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.moelens-installed
DEMO   ?= .demo

.PHONY: install demo test bench bench-align bench-distance bench-modules lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "$(TORCH)"
	$(PIP) install -q --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The main job end to end: train the tiny zoo (cached), align routers and experts in every
# layer of the base and the tuned model, measure how far the experts moved (base → tuned) against
# how far apart they are within a layer, which modules of which layers changed, and put it all in
# one HTML report.
demo: install
	$(VENV)/bin/moelens zoo build --out $(DEMO)/zoo
	$(VENV)/bin/moelens inspect $(DEMO)/zoo/base
	$(VENV)/bin/moelens align $(DEMO)/zoo/base --out $(DEMO)/runs/base
	$(VENV)/bin/moelens align $(DEMO)/zoo/tuned --out $(DEMO)/runs/tuned
	$(VENV)/bin/moelens distance $(DEMO)/zoo/base $(DEMO)/zoo/tuned --out $(DEMO)/runs/distance-base-tuned
	$(VENV)/bin/moelens distance $(DEMO)/zoo/base --out $(DEMO)/runs/distance-within
	$(VENV)/bin/moelens modules $(DEMO)/zoo/base $(DEMO)/zoo/tuned --out $(DEMO)/runs/modules
	$(VENV)/bin/moelens report $(DEMO)/runs/base $(DEMO)/runs/tuned $(DEMO)/runs/distance-base-tuned \
		$(DEMO)/runs/distance-within $(DEMO)/runs/modules --out $(DEMO)/report.html \
		--title "moelens demo: zoo base vs tuned"
	@echo "report: $(abspath $(DEMO))/report.html"

test: install
	@# The report's browser test needs headless Chromium; install it where we may (root with apt).
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: the browser test will be skipped"; }
	$(PY) -m pytest -q

# Every benchmark, each against a plain reference at real shapes (hours on 2 cores in full; --quick
# for minutes), e.g. make bench BENCH_ARGS="--shapes qwen3 --quick --threads 1"
bench: bench-align bench-distance bench-modules

bench-align: install
	$(PY) benchmarks/run.py $(BENCH_ARGS)

bench-distance: install
	$(PY) benchmarks/distance.py $(BENCH_ARGS)

bench-modules: install
	$(PY) benchmarks/modules.py $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache build src/*.egg-info
