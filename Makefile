# make app   - set up (venv, packages, data) and start the routing explorer on the shipped checkpoint
# make test  - set up and run the test suite but the slow re-training tests, notebooks included (14-19 min on an idle 2-core machine)
# make lab   - set up and open JupyterLab on notebooks/ (with --allow-root when run as root)
# Set-up: .venv with the package; Fashion-MNIST and chromium through apt-get only when run as root (else it prints
# the command and goes on).  Afterwards: source .venv/bin/activate (or use .venv/bin/python).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz

.PHONY: setup data app test test-slow lab bench clean

setup: $(STAMP) data

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Fashion-MNIST (Debian's dataset-fashion-mnist) for training and the tests; chromium (headless) for the app's
# browser test and plotly PNG export.  apt runs only as root; otherwise this prints the command and make goes on.
data:
	@if [ -f "$(FMNIST)" ] || [ -n "$$WORKBENCH_DATA" ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "Fashion-MNIST not found: set WORKBENCH_DATA to a folder with its four idx .gz files"; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's dataset-fashion-mnist with apt-get (the Fashion-MNIST files, for training and tests)"; \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null \
			|| echo "apt-get could not install dataset-fashion-mnist; set WORKBENCH_DATA to a folder with the four idx .gz files"; \
	else \
		echo "Fashion-MNIST not found. Install it with: sudo apt-get install dataset-fashion-mnist"; \
		echo "  (or set WORKBENCH_DATA to a folder with its four idx .gz files); continuing without it"; \
	fi
	@if command -v chromium >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ]; then \
		echo "installing chromium with apt-get (headless browser for the app's browser test and plotly PNG export)"; \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
			|| echo "apt-get could not install chromium; the tests that need it are skipped"; \
	else \
		echo "chromium not found (headless browser for the app's browser test and plotly PNG export)."; \
		echo "  Install it with: sudo apt-get install chromium; continuing without it (the tests that need it are skipped)"; \
	fi

app: setup
	$(PY) app.py

test: setup
	$(PY) -m pytest -q -m "not slow" --nbval --nbval-current-env --nbval-sanitize-with tests/nbval_sanitize.cfg

# the full re-training of a recorded study run, compared with its record exactly, and the README's commands and
# Python blocks at small budgets (a few minutes)
test-slow: setup
	$(PY) -m pytest -q -m slow tests

# JupyterLab refuses to run as root unless told: pass --allow-root then (containers often run as root)
lab: setup
	$(VENV)/bin/jupyter lab notebooks/ $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

bench: setup
	$(PY) -m workbench bench moe

clean:
	rm -rf $(VENV) *.egg-info
