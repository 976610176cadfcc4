# Set-up and checks. `make demo` runs the toolkit on its embedded default; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
# The embedded default's data: Debian's package when apt can install it, else torchvision's download.
FASHION_MNIST_PACKAGE ?= dataset-fashion-mnist
APT_GET ?= apt-get
DPKG ?= dpkg

.PHONY: install fashion-mnist demo test lint gpu-wheels gpu-check

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'

# Installs Debian's Fashion-MNIST where apt and root (or password-less sudo) are available; else one
# line says how to get it. Never fatal: without it the toolkit falls back to torchvision's download.
fashion-mnist:
	@if $(DPKG) -s $(FASHION_MNIST_PACKAGE) >/dev/null 2>&1; then \
		:; \
	elif command -v $(APT_GET) >/dev/null 2>&1 && { [ "$$(id -u)" = 0 ] && as= || { sudo -n true 2>/dev/null && as=sudo; }; }; then \
		echo "installing Debian's $(FASHION_MNIST_PACKAGE) (Fashion-MNIST for the tests and the demo)"; \
		{ $$as $(APT_GET) update -q >/dev/null && DEBIAN_FRONTEND=noninteractive $$as $(APT_GET) install -y -q $(FASHION_MNIST_PACKAGE) >/dev/null; } \
			|| echo "could not install $(FASHION_MNIST_PACKAGE); Fashion-MNIST will be downloaded by torchvision (needs internet)"; \
	else \
		echo "Fashion-MNIST: run 'sudo apt-get install $(FASHION_MNIST_PACKAGE)' (Debian/Ubuntu), or have internet for torchvision's download"; \
	fi

demo: install fashion-mnist
	HF_HUB_OFFLINE=1 $(BIN)/nemesis demo

test: install fashion-mnist
	HF_HUB_OFFLINE=1 $(BIN)/pytest -q

lint: install
	$(BIN)/ruff check .

# The GPU check (tools/gpu_check.py; README "The GPU check"). The GPU machine has Python 3.12 and
# torch but not open_clip or this typer, and reaches no package index: `make gpu-wheels`, run here,
# downloads the versions this venv holds into .whl/ (git-ignored; it travels with the checkout), and
# `make gpu-check` installs them there first (where open_clip is missing). Without CUDA it runs the CPU mode.
GPU_WHEELS ?= .whl
GPU_SITE ?= /tmp/nemesis-gpu-site
GPU_PACKAGES ?= open_clip_torch ftfy wcwidth typer annotated-doc pydantic pydantic-core annotated-types typing-inspection
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)

gpu-wheels: install
	$(BIN)/pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d $(GPU_WHEELS) $$($(BIN)/pip freeze | grep -i -E "^($$(echo $(GPU_PACKAGES) | sed 's/[-_]/[-_]/g; s/ /|/g'))==")

gpu-check:
	@if ! $(GPU_PYTHON) -c "import open_clip" 2>/dev/null && ls $(GPU_WHEELS)/*.whl >/dev/null 2>&1; then \
		$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
			--target $(GPU_SITE) $(GPU_WHEELS)/*.whl; fi
	PYTHONPATH=$(GPU_SITE):$(CURDIR) HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 $(GPU_PYTHON) tools/gpu_check.py \
		--json gpu-check.json $(GPU_CHECK_ARGS)
