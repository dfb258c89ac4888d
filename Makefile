# `make test` and `make demo` create .venv on first use and install the package into it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo quality figures clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

# everything, as CI runs it (multi-process, CLI-training and end-to-end chains included)
test: $(STAMP)
	WANDB_MODE=offline WANDB_SILENT=true $(PY) -m pytest -q

# every module's unit tests, without the tests marked slow: the loop while developing
test-fast: $(STAMP)
	WANDB_MODE=offline WANDB_SILENT=true $(PY) -m pytest -q -m "not slow"

demo: $(STAMP)
	$(PY) -m ssl_vit demo --output runs/demo

# CIFAR-10 representation quality on one GPU (docs/results.md); QUALITY_ARGS adds options, e.g.
# QUALITY_ARGS="--budget-minutes 10 --stop-after dino_pretrain"
CIFAR10 ?= ../shared/datasets/cifar10-jpg.tar.gz
quality: $(STAMP)
	$(PY) tools/bench_quality.py --data $(CIFAR10) --output runs/quality --resume $(QUALITY_ARGS)
	cp runs/quality/attention_gallery.png docs/attention_gallery.png

# the CPU figures the docs quote, re-measured on this machine: sharding, 20 steps of each CIFAR-10
# recipe, the demo (runs/figures/figures.json; prints a summary)
figures: $(STAMP)
	$(PY) tools/measure_figures.py --data $(CIFAR10) --output runs/figures --demo

clean:
	rm -rf runs .pytest_cache
