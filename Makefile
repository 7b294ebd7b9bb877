# tgis developer entry points. `make test` and `make serve` work on a fresh machine with nothing but Python 3.11+:
# each installs what it needs first (a stamp file makes that a no-op when nothing changed).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
IMAGE  ?= tgis:latest
PYTEST_ARGS ?=
# guided decoding's library, installed without its triton dependency (pyproject.toml: guided-cpu)
XGRAMMAR ?= xgrammar==0.2.8

export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install proto test lint serve bench build clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,guided-cpu]'
	$(PY) -m pip install -q -c constraints.txt --no-deps '$(XGRAMMAR)'
	touch $(STAMP)

proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --grpc_python_out=. --pyi_out=. proto/generation.proto

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

serve: $(STAMP)
	$(VENV)/bin/tgis serve

bench: $(STAMP)
	$(VENV)/bin/tgis bench

build:
	docker build -t $(IMAGE) .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
