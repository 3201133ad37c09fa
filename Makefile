# moelens — everything a fresh machine needs is here: `make demo`, `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU wheel of torch first (override: make TORCH=torch), then the package in editable mode.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.moelens-installed
DEMO   ?= .demo

.PHONY: install demo test bench bench-align bench-distance bench-modules bench-scale bench-gpu bench-trace bench-route bench-forward bench-zoo lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check "$(TORCH)"
	$(PIP) install -q --disable-pip-version-check -e ".[dev,ray]"
	touch $(STAMP)

install: $(STAMP)

# The main job end to end: train the tiny zoo (cached), then the atlas of base and tuned: router
# alignment, expert distance (base → tuned, within, and within HC-SMoE / M-SMoE clusters with and
# without permutation), module metrics, interventions on the zoo's facts, clustering and merge
# costs, one HTML report and every figure as PNG and SVG.
demo: install
	$(VENV)/bin/moelens zoo build --out $(DEMO)/zoo
	$(VENV)/bin/moelens atlas $(DEMO)/zoo/base --tuned $(DEMO)/zoo/tuned --out $(DEMO)/atlas --trace-limit 200 \
		--title "moelens demo: the zoo's base and tuned models"

test: install
	@# The report's browser test needs headless Chromium; install it where we may (root with apt).
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
		echo "chromium not installed: the browser test will be skipped"; }
	@# Any failing status fails the target, 5 (no tests collected) included, with a line saying so.
	$(PY) -m pytest -q -n 2 --dist loadfile || { status=$$?; [ $$status -ne 5 ] || \
		echo "make test: pytest collected no tests (exit status 5)" >&2; exit $$status; }

# Every benchmark, each against a plain reference at real shapes (hours on 2 cores in full; --quick
# for minutes), e.g. make bench BENCH_ARGS="--shapes qwen3 --quick --threads 1"
bench: bench-align bench-distance bench-modules bench-scale bench-trace bench-route

bench-align: install
	$(PY) benchmarks/run.py $(BENCH_ARGS)

bench-distance: install
	$(PY) benchmarks/distance.py $(BENCH_ARGS)

bench-modules: install
	$(PY) benchmarks/modules.py $(BENCH_ARGS)

# A 4-layer Mixtral-shaped checkpoint: the local executor against Ray with 2 workers, and the
# full model projected.
bench-scale: install
	$(PY) benchmarks/scale.py $(BENCH_ARGS)

# One full-shape Mixtral layer on a CUDA GPU against the CPU and the read (not part of bench:
# it needs a GPU; make bench-gpu BENCH_ARGS="--device cpu --small" checks it anywhere).
bench-gpu: install
	$(PY) benchmarks/gpu_weight_space.py $(BENCH_ARGS)

# Interventions: cells per second of the batched tracer against a one-forward-per-cell hook loop
# (make bench-trace BENCH_ARGS="--device cuda" on a GPU; causal tracing against ROME's loop at
# S = 10, 100, 1000: BENCH_ARGS="--restore --quick --threads 1").
bench-trace: install
	$(PY) benchmarks/trace.py $(BENCH_ARGS)

# Forward passes of a model larger than the memory budget: moelens layer-streamed against
# transformers + accelerate device_map="auto" with CPU/disk offload under the same max_memory, side
# by side in one run (a quick CPU shape; BENCH_ARGS="--shape medium" for the 9 GB float32 one, "--shape real"
# for Mixtral-8x7B's, on a machine with the disk for it).
bench-forward: install
	$(PY) benchmarks/forward.py $(BENCH_ARGS)

# Router edits: batched rows against a plain loop (edit the weight, run, restore) on the demo zoo
# (or the small zoo), e.g. make bench-route BENCH_ARGS="--prompts 32 --threads 1".
bench-route: install
	$(PY) benchmarks/router_edits.py $(BENCH_ARGS)

# Zoo training: seconds per step of transformers' eager and grouped_mm experts against the sorted
# experts and fused AdamW the zoo trains with, at the default 4 layers and at 12 (a few minutes),
# e.g. make bench-zoo BENCH_ARGS="--layers 12 16 --threads 2"
bench-zoo: install
	$(PY) benchmarks/zoo_training.py $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache build src/*.egg-info
