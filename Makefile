# The README's two commands: `make demo` (the main job on the embedded default) and `make test`.
# Each creates .venv and installs what is needed on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test bench gpu-check clean-cache

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first: pip takes the 2.14.1 / 0.29.1 wheels from this machine's disk
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev,scale,bench]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m recon.train --arch interwild --synthetic-ratio 0.3

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) -m benchmarks.run --quick

# On a machine with one CUDA GPU (sized for 8 minutes; not yet run on a GPU; nothing downloaded): the tests marked
# cuda, then the benchmarks on the GPU (P1-P4 with the tiny generator, P2 as two 200-step recon.train runs at
# r = 0.3 online and r = 0, P5 an SD1.5-sized random-init generator at 512 px), which write
# benchmarks/results/cuda.{json,md} even when a test failed; the exit status reports both.
gpu-check: $(STAMP)
	$(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch sees no CUDA device')"
	status=0; \
	$(PY) -m pytest -q -p no:cacheprovider -m cuda tests || status=1; \
	$(PY) -m benchmarks.run --device cuda --threads 4 || status=1; \
	exit $$status
