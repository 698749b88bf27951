# The README's two commands: `make demo` (the main job, InterWild at r = 0.3, on the studio variant of the embedded
# synthlab) and `make test`.
# Each creates .venv and installs what is needed on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench gpu-check gpu-wheels clean-cache

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: pip takes the 2.14.1 / 0.29.1 wheels from this machine's disk
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,scale,bench]'
	touch $(STAMP)

install: $(STAMP)

# make demo: InterWild (its demo profile) at r = 0.3 from random init, on the studio variant of synthlab (hands held
# upright before the cameras, as in a capture studio), with both torch threads and channels-last tensors, for 13
# minutes of training (train.max_minutes: the run ends at the first checkpoint step after them, at most DEMO_STEPS),
# then its predictions on the first 4 test-lab and test-wild images drawn into DEMO_OUT/figures/. The studio synthlab
# is written into DEMO_DATA on first use without train-wild (the demo neither trains nor tests on it; the generator
# draws from train-lab's labels), 88 s. A time budget, not a step count: the same 1,600 steps took 825 s of training
# on 2026-12-06 (16.0 min in all: 44.9 mm test-lab MPVPE) and 1,058 s on 2026-12-07 on the same kind of machine
# (19.8 min), so the run's steps (and its error) depend on the machine. With the budget on 2026-12-07: 15.1 min in
# all from an empty data folder (1,280 steps, 46.5 mm), and `make install` on a fresh clone 85 s before it
# (docs/results/make-demo-studio.json). On the default (sphere) synthlab, cameras from every direction, such a run
# ends far from the hands (docs/results/interwild-demo-learning.md). It replaces the previous demo run in DEMO_OUT.
# On a machine shared with other jobs set DEMO_THREADS=1 (two threads there made a step 4-7x slower).
DEMO_DATA ?= runs/synthlab-studio-demo
DEMO_OUT ?= runs/demo
DEMO_MINUTES ?= 13
DEMO_STEPS ?= 2400
DEMO_THREADS ?= 2
demo: $(STAMP)
	test -f $(DEMO_DATA)/synthlab.json || $(PY) -m hands.datasets.synthlab --out $(DEMO_DATA) --viewpoints studio --sizes 5000 500 0 500
	$(PY) -m recon.train --arch interwild --synthetic-ratio 0.3 --data-root $(DEMO_DATA) --out $(DEMO_OUT) --overwrite \
		--max-steps $(DEMO_STEPS) train.max_minutes=$(DEMO_MINUTES) threads=$(DEMO_THREADS) train.channels_last=true
	$(PY) -m recon.test --ckpt $(DEMO_OUT)/averaged --data-root $(DEMO_DATA) --max-samples 4 --figure 4 \
		--out $(DEMO_OUT)/figures/metrics-first-4.json

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) -m benchmarks.run --quick

# On a machine with one CUDA GPU (sized for 8 minutes; not yet run on a GPU; nothing downloaded): the tests marked
# cuda, then the benchmarks on the GPU (P1-P4 and P6 with the tiny generator, P2 as two 200-step recon.train runs
# at r = 0.3 online and r = 0, P5 an SD1.5-sized random-init generator at 512 px), which write
# benchmarks/results/cuda.{json,md} even when a test failed; the exit status reports both.
# Its Python: .venv's if that torch sees a CUDA device; else $(PYTHON) itself, with its own CUDA torch and whatever
# else it has used as they are (nothing is reinstalled), and the project's other packages (GPU_WHEEL_PACKAGES, no
# dependencies resolved) put into $(GPU_SITE) with pip --target, from pip's index or, on a machine with no network,
# from the wheels in WHEELS=DIR (`make gpu-wheels WHEELS=DIR` fetches them where there is network); the project
# runs from this folder (PYTHONPATH), not installed. docs/performance.md, "The GPU path".
GPU_SITE := .gpu-site
WHEELS ?=
SEES_CUDA := import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)
# the project's packages (and their needs) that a CUDA image with torch, torchvision, transformers, accelerate,
# timm, scipy, tensorboard, pytest, psutil, requests and huggingface-hub lacks; versions from constraints.txt
GPU_WHEEL_PACKAGES := diffusers importlib_metadata smplx open_clip_torch ftfy wcwidth nltk defusedxml textblob \
	kornia kornia_rs omegaconf trimesh moderngl glcontext hypothesis sortedcontainers attrs
# hypothesis: pytest collects every test module before selecting `-m cuda`, and the fuzz tests import it
GPU_IMPORTS := import diffusers, smplx, open_clip, nltk, textblob, kornia, omegaconf, trimesh, moderngl, hypothesis

gpu-check:
	@if [ -x $(PY) ] && $(PY) -c "$(SEES_CUDA)" 2>/dev/null; then py=$(PY); \
	elif $(PYTHON) -c "$(SEES_CUDA)" 2>/dev/null; then \
	  py=$(PYTHON); export PYTHONPATH=$(CURDIR)/$(GPU_SITE):$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH}; \
	  $$py -c "$(GPU_IMPORTS)" 2>/dev/null || \
	  $$py -m pip install --quiet --no-deps --target $(GPU_SITE) $(if $(WHEELS),--no-index --find-links $(WHEELS)) \
	    -c constraints.txt $(GPU_WHEEL_PACKAGES) || \
	    { echo "gpu-check: installing $(GPU_WHEEL_PACKAGES) for $(PYTHON) failed; with no network, pass WHEELS=DIR (make gpu-wheels)"; exit 2; }; \
	  $$py -c "$(GPU_IMPORTS)" || { echo "gpu-check: $(PYTHON) still lacks a package the project imports (above)"; exit 2; }; \
	else echo "gpu-check: neither $(PY) nor $(PYTHON) has a torch that sees a CUDA device (PYTHON=... names a Python that has)"; exit 2; fi; \
	echo "gpu-check: $$py ($$($$py -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))'))"; \
	status=0; \
	$$py -m pytest -q -p no:cacheprovider -m cuda tests || status=1; \
	$$py -m benchmarks.run --device cuda --threads 4 || status=1; \
	exit $$status

# Wheels of GPU_WHEEL_PACKAGES for `make gpu-check WHEELS=DIR` on a machine with no network (CPython 3.12,
# x86-64 Linux by default: GPU_PYTHON_VERSION=3.11 etc. for another)
GPU_PYTHON_VERSION ?= 3.12
gpu-wheels:
	@test -n "$(WHEELS)" || { echo "gpu-wheels: pass WHEELS=DIR"; exit 2; }
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PYTHON_VERSION) \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 --platform any -c constraints.txt -d $(WHEELS) $(GPU_WHEEL_PACKAGES)
