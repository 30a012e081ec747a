# `make test` and `make demo` work on a fresh machine with only Python 3.11: the virtual environment is created
# and filled on first use, and again whenever a requirements file changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test lint demo clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q tests

# The demo: procedural videos in the Kinetics regime (8 classes: 6 kinds of actor, two of them in two directions each;
# 1600 training and 400 validation videos), X3D-XS with multigrid on the CPU (8 base epochs stretched to 12), then the
# 10 x 3-view test and the plots. Re-running a finished run reports its result instead of training again.
DEMO_DATA := data/demo
DEMO_RUN := logs/demo
DEMO_FLAGS := --model x3d_xs --frames 8 --sampling-rate 8 --crop 56 --jitter 64 80 --test-crop 64 \
	--batch-size 8 --epochs 8 --warmup-epochs 1 --lr 0.015 --dropout 0 --flip-prob 0 --workers 2 \
	--eval-every 3 --precise-bn-batches 10 --test-views 10 --test-crops 3

demo: $(VENV)/.installed
	$(PY) tools/make_demo_data.py --out $(DEMO_DATA) --datasets kinetics
	$(PY) train_x3d_kinetics_multigrid.py --data-root $(DEMO_DATA)/kinetics --output-dir $(DEMO_RUN) $(DEMO_FLAGS)
	$(PY) tools/plot_run.py $(DEMO_RUN)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
