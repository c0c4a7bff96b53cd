# UnSAM developer entry points. `make setup` is idempotent: a second run is a no-op unless
# the requirements or the setup script changed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.unsam-setup-done
PYTEST := OMP_NUM_THREADS=2 $(PY) -m pytest
# the shared sample data (photos, COCO subsets): the library reads only $UNSAM_SHARED; make points it
# at ../shared beside the checkout unless it is set
REPO_DIR := $(dir $(abspath $(lastword $(MAKEFILE_LIST))))
UNSAM_SHARED ?= $(abspath $(REPO_DIR)../shared)
export UNSAM_SHARED

.PHONY: setup quickstart selftrain app test test-slow test-all lint format bench ablation ablation-pseudo gpu-check clean-outputs

setup: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml scripts/setup.sh scripts/fetch_sdist.py
	bash scripts/setup.sh $(VENV)
	@touch $@

quickstart: setup
	$(PY) scripts/quickstart.py

# one self-training round on the shared photos, measured (issue 29): round 1 trained on the classical pseudo
# labels, its predictions (merged with them) train round 2; AR of labels and both rounds on both shared sets'
# human masks -> outputs/selftrain/REPORT.md (resumable; about half an hour on 2 quiet cores, estimated from the
# quickstart's step times). ARGS="--max-images 3 --iters 2": a cut-down run
selftrain: setup
	$(PY) scripts/selftrain.py $(ARGS)

# the browser demo on http://127.0.0.1:7860, with the quickstart's model once `make quickstart` trained it
QS_WEIGHTS := outputs/quickstart/train/model_final.pth
app: setup
	$(PY) -m unsam.app $(if $(wildcard $(QS_WEIGHTS)),--opts MODEL.WEIGHTS $(QS_WEIGHTS))

test: setup
	$(PYTEST) -q --durations=10

# the lint and format gate CI runs (ruff, settings in pyproject.toml); `make format` rewrites
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

test-slow: setup
	$(PYTEST) -q -m slow

test-all: setup
	$(PYTEST) -q -m "slow or not slow"

bench: setup
	$(PY) benchmarks/whole_image.py
	$(PY) benchmarks/pseudo.py

# the ViSA/ATS ablation (issue 19): 7 variants x 3 seeds x 800 iterations, hours on CPU, resumable
# (finished runs are kept in docs/ablation_runs/runs, committed: the ablation takes several sessions);
# writes docs/ablation.md + docs/ablation_ar.png.
# More runs at once: ARGS="--jobs 2"
ablation: setup
	$(PY) benchmarks/ablate_visa_ats.py --docs $(ARGS)

# the same ablation trained on the pseudo labels (classical engine, default settings) of the shared train
# photos, held-out AR on both shared sets' human masks: docs/ablation_pseudo.md, runs in
# docs/ablation_runs_pseudo/runs (a run is redone when the labels' digest changed). Labels are written once.
ABLATION_LABELS := outputs/ablation/pseudo_coco_tiny_train2017
ablation-pseudo: setup
	test -d $(ABLATION_LABELS) || { rm -rf $(ABLATION_LABELS).partial && $(PY) -m unsam.pseudo --workers 2 --output $(ABLATION_LABELS).partial \
		--input $(UNSAM_SHARED)/data/coco_tiny_train2017/images && mv $(ABLATION_LABELS).partial $(ABLATION_LABELS); }
	$(PY) benchmarks/ablate_visa_ats.py --docs --pseudo $(ABLATION_LABELS) $(ARGS)

# the CUDA path end to end (training + AMP, inference, prompts, pseudo labels, multi-GPU): one JSON of
# figures, also in outputs/gpu_check.json; non-zero exit on any failure. CPU-sized: ARGS="--device cpu --quick"
gpu-check: setup
	$(PY) scripts/gpu_check.py --out outputs/gpu_check.json $(ARGS)

clean-outputs:
	rm -rf outputs
