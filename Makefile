# `make test` and `make demo` work on a fresh machine with only Python 3.11: the virtual environment is created
# and filled on first use, and again whenever a requirements file changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test lint demo demo-charades clean

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

# Charades on the demo: fine-tunes make demo's Kinetics checkpoint (made first when missing) on procedural Charades
# frames (10 actions, each an object of one colour doing one motion, with start and end times; 240 training and 80
# test videos), first for multi-label classification, then for per-frame localization, and prints each mAP beside
# its chance level (the mAP of constant scores).
CHARADES_DATA := data/demo_charades
CHARADES_FLAGS := --data-root $(CHARADES_DATA)/charades --finetune $(DEMO_RUN)/checkpoint.pt --model x3d_xs \
	--frames 8 --sampling-rate 6 --crop 56 --jitter 64 80 --test-crop 64 --batch-size 8 --epochs 16 \
	--lr-policy cosine --warmup-epochs 1 --lr 0.03 --dropout 0 --flip-prob 0 --multigrid none --workers 2 \
	--eval-every 4 --precise-bn-batches 10 --test-crops 1

$(DEMO_RUN)/checkpoint.pt:
	$(MAKE) demo

demo-charades: $(VENV)/.installed $(DEMO_RUN)/checkpoint.pt
	$(PY) tools/make_demo_data.py --out $(CHARADES_DATA) --datasets charades --charades-videos 240 \
		--charades-test-videos 80
	$(PY) train_x3d_charades.py --output-dir logs/demo_charades $(CHARADES_FLAGS) --val-views 2 --test-views 10
	$(PY) train_x3d_charades_loc.py --output-dir logs/demo_charades_loc $(CHARADES_FLAGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
