# Set-up and checks. `make demo` runs the toolkit on its embedded default; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
# The embedded default's data: Debian's package when apt can install it, else torchvision's download.
FASHION_MNIST_PACKAGE ?= dataset-fashion-mnist
APT_GET ?= apt-get
DPKG ?= dpkg

.PHONY: install fashion-mnist demo test lint

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
