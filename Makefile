# Two commands on a fresh machine (see README):  make main   |   make test
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: install data main test lint docs bench-overhead clean

install: $(VENV)/.installed

# The constraints file pins a torch/torchvision pair that works on CPU (see README, "Install on its own").
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

# docs/options.md is generated from the options' own help texts (tests/test_docs.py checks it is up to date).
docs: install
	$(PY) -m smooth_hf.scripts.options_doc > docs/options.md

bench-overhead: install
	$(PY) benchmarks/step_overhead.py

clean:
	rm -rf runs .pytest_cache
