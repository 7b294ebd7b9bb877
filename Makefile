# tgis developer entry points. `make test` and `make serve` work on a fresh machine with nothing but Python 3.11+:
# each installs what it needs first (a stamp file makes that a no-op when nothing changed).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
IMAGE  ?= tgis:latest
PYTEST_ARGS ?=
# Kubernetes: an overlay of deployment/overlays, optional components of deployment/components ("tls mtls openshift")
OVERLAY    ?= smollm2
COMPONENTS ?=
NAMESPACE  ?=
DEPLOY_SH  := IMAGE='$(IMAGE)' COMPONENTS='$(COMPONENTS)' NAMESPACE='$(NAMESPACE)' deployment/deploy.sh
# guided decoding's library, installed without its triton dependency (pyproject.toml: guided-cpu)
XGRAMMAR ?= xgrammar==0.2.8
# tensor parallelism for architectures without our own split rules. PyPI has only its sdist: built without build
# isolation (else the isolated build env pulls another torch) and without compiled ops (DS_BUILD_OPS=0)
DEEPSPEED ?= deepspeed==0.19.8

export HF_HUB_DISABLE_TELEMETRY := 1

.PHONY: install proto test lint serve bench bench-baseline gpu-wheels build push manifests deploy undeploy clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -c constraints.txt --no-build-isolation '$(DEEPSPEED)'
	$(PY) -m pip install -q -c constraints.txt -e '.[dev,guided-cpu,deepspeed]'
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

# `make bench`: a reproducible CI gate on the tiny test Llama (built offline into .bench/) against the committed
# baseline. Counts are gated exactly (forced output lengths make them a property of the workload), throughput only
# against a 4x slowdown, the prefix-cache hit rate (it depends on which prompts share a step) against halving, and
# latencies not at all: the baseline was recorded on another machine (README: "tgis bench in CI").
# `make bench-baseline` re-records it.
BENCH_MODEL    := .bench/llama
BENCH_BASELINE := bench/baseline-tiny.json
BENCH_ARGS     := $(BENCH_MODEL) -n 64 --input-len 16:64 --output-len 16:32 --shared-prefix 32 --concurrency 8 \
                  --seed 0 --repeat 3
BENCH_GATE     := --max-regression 75% --max-regression prefix_cache_hit_rate=50% --max-regression ttft_ms=off \
                  --max-regression itl_ms=off --max-regression e2e_ms=off

$(BENCH_MODEL)/config.json: | $(STAMP)
	$(PY) -c "import sys, pathlib; sys.path.insert(0, 'tests'); import models; models.build('llama', pathlib.Path('.bench'))"

bench: $(STAMP) $(BENCH_MODEL)/config.json
	HF_HUB_OFFLINE=1 $(PY) -m tgis_cli bench $(BENCH_ARGS) --baseline $(BENCH_BASELINE) $(BENCH_GATE) -o .bench/report.json

bench-baseline: $(STAMP) $(BENCH_MODEL)/config.json
	HF_HUB_OFFLINE=1 $(PY) -m tgis_cli bench $(BENCH_ARGS) -o $(BENCH_BASELINE)

# DeepSpeed and what it needs that the GPU machines' image lacks, for scripts/gpu_tp.py: carried in .whl/. That
# image runs Python 3.12 on x86-64 Linux; DeepSpeed's wheel is pure Python, built here from its sdist.
gpu-wheels: $(STAMP)
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-build-isolation --no-deps -w .whl '$(DEEPSPEED)'
	$(PY) -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl \
	    hjson pydantic

build:
	docker build -t $(IMAGE) .

push:
	docker push $(IMAGE)

manifests:
	$(DEPLOY_SH) render $(OVERLAY)

deploy:
	$(DEPLOY_SH) apply $(OVERLAY)

undeploy:  # the cache volume goes too
	$(DEPLOY_SH) delete $(OVERLAY)

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache .bench
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
