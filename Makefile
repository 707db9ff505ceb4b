# The README's commands. Each target installs what it needs, so they work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BUNDLE ?= bundles/default
HOST ?= 127.0.0.1
PORT ?= 8000
# The CPU build of torch must be installed before the project: a bare `torch` requirement would
# otherwise pull a multi-GB CUDA build.
TORCH_CPU := torch==2.13.0
APT_PACKAGES := wordnet-base prometheus nginx docker-compose

.PHONY: serve test model lint bench system-deps clean

$(BIN)/encoder: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e '.[train,cpu,hf,dev]'
	touch $@

# Debian packages used by the demo data and the end-to-end tests (real Prometheus, nginx).
system-deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

test: $(BIN)/encoder system-deps
	$(BIN)/ruff check .
	$(BIN)/pytest -q

# Docker cannot build on the development machine: the deployment files are kept correct by their linters.
lint: $(BIN)/encoder system-deps
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile
	for profile in gpu cpu scale; do docker-compose --profile $$profile config --quiet || exit 1; done
	promtool check config deploy/prometheus.yml

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
