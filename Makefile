# make app   - set up (venv, packages, data) and start the routing explorer on the shipped checkpoint
# make test  - set up and run the whole test suite, notebooks included
# make lab   - set up and open JupyterLab on notebooks/
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: setup data app test lab bench clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

data:
	@if [ -f "$(FMNIST)" ] || [ -n "$$WORKBENCH_DATA" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing Debian's dataset-fashion-mnist"; \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist chromium >/dev/null; \
	else echo "Fashion-MNIST not found: set WORKBENCH_DATA to a folder with its four idx .gz files"; fi
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && apt-get install -y -qq chromium >/dev/null || true; fi

app: setup
	$(PY) app.py

test: setup
	$(PY) -m pytest -q --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

lab: setup
	$(VENV)/bin/jupyter lab notebooks/

bench: setup
	$(PY) -m workbench bench moe

clean:
	rm -rf $(VENV) *.egg-info
