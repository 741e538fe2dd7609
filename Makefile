# Two commands do all the set-up on a fresh Debian machine (root for apt): `make demo` and `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test lint format bench slurm-start slurm-stop clean-demo

setup: $(VENV)/.installed

# Debian packages: the demo's real images; Slurm for the launcher tests is installed by slurm/local_cluster.sh.
# torch/torchvision resolve from the machine's pip index (a CUDA build that also runs on CPU).
$(VENV)/.installed: pyproject.toml
	@if [ ! -d /usr/share/datasets/fashion-mnist ]; then \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "install the Debian package dataset-fashion-mnist (sudo apt-get install dataset-fashion-mnist)"; fi; fi
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

demo: setup
	$(PY) -m pipeline.demo $(DEMO_ARGS)

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# The Slurm tests need the local single-node cluster; it is started before and stopped after pytest.
test: setup lint
	bash slurm/local_cluster.sh install
	bash slurm/local_cluster.sh start
	status=0; $(PY) -m pytest -q $(PYTEST_ARGS) || status=$$?; \
	  bash slurm/local_cluster.sh stop; exit $$status

# The quick CPU benchmarks (~5 min on 2 cores); bench_memory.py (long) and gpu_step.py (a GPU) run by hand.
bench: setup
	$(PY) benchmarks/bench_step.py --out benchmarks/results/step_cpu.json
	PYTHONPATH=. $(PY) benchmarks/bench_loader.py --spans 5 --out benchmarks/results/loader_cpu.json
	$(PY) benchmarks/bench_convert.py --images 2000 --out benchmarks/results/convert_cpu.json

slurm-start: setup
	bash slurm/local_cluster.sh install && bash slurm/local_cluster.sh start

slurm-stop:
	bash slurm/local_cluster.sh stop

clean-demo:
	rm -rf runs/demo
