# Two commands on a fresh machine (see README):  make main   |   make test
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install data main test lint bench-overhead clean

install: $(VENV)/.installed

# The constraints file pins a torch/torchvision pair that works on CPU (see README "Install").
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

# Real Fashion-MNIST (70,000 images, MIT) from Debian: the main job needs no Hub.
data: $(FASHION_MNIST)
$(FASHION_MNIST):
	@if [ "$$(id -u)" = 0 ]; then apt-get install -y -q dataset-fashion-mnist >/dev/null || \
		(apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null); \
	else sudo apt-get install -y -q dataset-fashion-mnist; fi

main: install data
	$(PY) recipes/smooth_vs_plain.py --output_dir runs/main

test: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check smooth_hf recipes tests benchmarks
	$(VENV)/bin/lint-imports

bench-overhead: install
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf runs .pytest_cache
