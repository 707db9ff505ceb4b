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
# Every other package comes from the lock files (exact versions and hashes; `make lock` refreshes
# them): requirements/dev.txt for this venv, cpu.txt and gpu.txt for the images (Dockerfile).
LOCK_DEV := requirements/dev.txt
APT_PACKAGES := wordnet-base prometheus nginx docker-compose wrk
# The container tests: podman with runc (crun fails on these machines), catatonit for `init: true`,
# netavark and aardvark-dns for compose networks, debootstrap for stand-in base images. Installed
# without recommends, which would bring crun, buildah and fuse-overlayfs.
APT_CONTAINER_PACKAGES := podman runc catatonit netavark aardvark-dns debootstrap

.PHONY: serve test model reranker lint bench system-deps clean lock

$(BIN)/encoder: pyproject.toml $(LOCK_DEV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-deps $(TORCH_CPU)
	$(BIN)/pip install -q --no-deps --require-hashes -r $(LOCK_DEV)
	$(BIN)/pip install -q --no-deps -e .
	$(BIN)/pip check
	touch $@

# Refresh the lock files after changing a dependency in pyproject.toml; `make lock UPGRADE=1` also
# moves every package to its newest release. Resolved for Linux x86_64: dev.txt for Python 3.11, with
# torch's CPU build from $(TORCH_WHEELS) resolved but left out; cpu.txt and gpu.txt for any Python
# from 3.11 (the cpu image's 3.11, Ubuntu 24.04's 3.12 in the gpu image), at dev.txt's versions
# wherever they share a package, so that the images run what the tests ran.
TORCH_WHEELS ?= /opt/wheels
LOCK = $(BIN)/uv pip compile pyproject.toml --quiet --generate-hashes --custom-compile-command 'make lock' \
	$(if $(UPGRADE),--upgrade)
lock: $(BIN)/encoder
	echo '$(TORCH_CPU)+cpu' > $(VENV)/torch-constraint.txt
	$(LOCK) --extra train --extra cpu --extra hf --extra dev --no-emit-package torch \
		--python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--find-links $(TORCH_WHEELS) --constraint $(VENV)/torch-constraint.txt --output-file $(LOCK_DEV)
	$(LOCK) --extra cpu --universal --python-version 3.11 --constraint $(LOCK_DEV) --output-file requirements/cpu.txt
	$(LOCK) --extra gpu --universal --python-version 3.11 --constraint $(LOCK_DEV) --output-file requirements/gpu.txt

# Debian packages used by the demo data and the end-to-end tests (real Prometheus, nginx).
system-deps:
	@missing() { for p in "$$@"; do dpkg -s $$p >/dev/null 2>&1 || printf ' %s' $$p; done; }; \
	base=$$(missing $(APT_PACKAGES)); containers=$$(missing $(APT_CONTAINER_PACKAGES)); \
	if [ -n "$$base$$containers" ]; then \
		echo "installing Debian packages:$$base$$containers"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		export DEBIAN_FRONTEND=noninteractive; \
		$$SUDO apt-get -o Acquire::Languages=en update -qq \
		&& { [ -z "$$base" ] || $$SUDO apt-get install -y -qq $$base; } \
		&& { [ -z "$$containers" ] || $$SUDO apt-get install -y -qq --no-install-recommends $$containers; }; \
	fi

test: $(BIN)/encoder system-deps
	$(BIN)/ruff check .
	$(BIN)/pytest -q

# Docker cannot build on the development machine: the deployment files are kept correct by their linters.
lint: $(BIN)/encoder system-deps
	$(BIN)/ruff check .
	$(BIN)/hadolint Dockerfile deploy/model.Dockerfile tests/podman/prometheus.Containerfile
	for profile in gpu cpu scale; do docker-compose --profile $$profile config --quiet || exit 1; done
	promtool check config deploy/prometheus.yml

# The default bundle, end to end from the WordNet demo data (BENCHMARKS.md, "The default model"):
# data -> tokenizer -> MLM pretraining -> contrastive fine-tune (the encoder /embed serves, plus the
# embedding's lexical channel, its table trained on the same pairs, weighted on held-out pairs) -> the
# classification heads on that frozen
# encoder, fitted on every training row as one class-weighted logistic regression (L-BFGS): a linear
# head on its embedding plus a lexical head on the text's TF-IDF of tokens and bigrams -> export fp32 +
# int8 (parity-gated, int8 also by accuracy on the held-out split). Budgets are steps and iterations,
# so the result does not depend on how busy the machine is (on 2 idle cores: 27-29 min on 1 Dec 2026,
# seeds 1 and 2, the lexical table's 1,740 steps and the heads' 300 L-BFGS iterations included; the
# host's speed varies: 18 min 47 s with 113 iterations on 30 Nov). The bundle's manifest
# holds each step's training summary and the held-out classification and retrieval figures.
MODEL_RUNS ?= runs/default
PRETRAIN_STEPS ?= 600
EMBED_STEPS ?= 400
SEED ?= 0
# DATA=debian runs the same recipe on Debian's package descriptions (the robustness check).
DATA ?= wordnet
# TEACHER=BUNDLE (any bundle, e.g. from `encoder import-hf`) also distils it into the contrastive
# fine-tune: its in-batch similarities become soft targets (README, "Distilling a bigger model").
TEACHER ?=
model: $(BIN)/encoder system-deps
	$(BIN)/encoder data $(DATA) --out $(MODEL_RUNS)/data
	$(BIN)/encoder tokenizer train --corpus $(MODEL_RUNS)/data/pretrain.txt --vocab-size 8192 --max-seq-len 128 \
		--out $(MODEL_RUNS)/tokenizer.json
	$(BIN)/encoder pretrain --tokenizer $(MODEL_RUNS)/tokenizer.json --corpus $(MODEL_RUNS)/data/pretrain.txt \
		--preset mini --max-steps $(PRETRAIN_STEPS) --seed $(SEED) --out $(MODEL_RUNS)/pretrain
	$(BIN)/encoder finetune embed --init $(MODEL_RUNS)/pretrain --train $(MODEL_RUNS)/data/pairs_train.jsonl \
		--max-steps $(EMBED_STEPS) --seed $(SEED) --out $(MODEL_RUNS)/embed \
		$(if $(TEACHER),--teacher $(TEACHER))
	$(BIN)/encoder finetune classify --init $(MODEL_RUNS)/embed --freeze-encoder --seed $(SEED) \
		--train $(MODEL_RUNS)/data/classify_train.jsonl --eval $(MODEL_RUNS)/data/classify_test.jsonl \
		--out $(MODEL_RUNS)/classify
	$(BIN)/encoder eval retrieval --model $(MODEL_RUNS)/classify --queries $(MODEL_RUNS)/data/retrieval_queries.jsonl \
		--corpus $(MODEL_RUNS)/data/retrieval_corpus.jsonl --record
	$(BIN)/encoder export --model $(MODEL_RUNS)/classify --name default --variants fp32,int8 --fuse \
		--eval $(MODEL_RUNS)/data/classify_test.jsonl --out $(BUNDLE) --force

# A reranker (cross-encoder) of the default model's bi-encoder: `make model` first (it leaves the data
# and the embed run in $(MODEL_RUNS)), then RERANK_STEPS fine-tuning steps of 16 queries, each against
# its positive, 3 negatives from the bi-encoder's own top 50 and 3 of the batch's other positives,
# exported to $(RERANKER) (the int8 gate: MRR@10 among each query's own and the next rows' positives).
# Serve it next to the default model: `encoder serve --bundle default=bundles/default --bundle reranker=bundles/reranker`.
RERANKER ?= bundles/reranker
RERANK_STEPS ?= 1200
reranker: $(BIN)/encoder
	@test -f $(MODEL_RUNS)/embed/run.json || $(MAKE) model
	$(BIN)/encoder finetune rerank --init $(MODEL_RUNS)/embed --train $(MODEL_RUNS)/data/pairs_train.jsonl \
		--max-steps $(RERANK_STEPS) --batch-size 16 --seed $(SEED) --out $(MODEL_RUNS)/rerank
	$(BIN)/encoder export --model $(MODEL_RUNS)/rerank --name reranker --variants fp32,int8 --fuse \
		--eval $(MODEL_RUNS)/data/pairs_train.jsonl --out $(RERANKER) --force

# Serve the default bundle (committed; `make model` rebuilds it) on $(HOST):$(PORT).
serve: $(BIN)/encoder
	@test -f $(BUNDLE)/manifest.json || $(MAKE) model
	$(BIN)/encoder serve --bundle $(BUNDLE) --host $(HOST) --port $(PORT)

# Service vs. raw ONNX Runtime, and batching on vs. off, side by side (BENCHMARKS.md). About 3 minutes.
bench: $(BIN)/encoder system-deps
	@test -f $(BUNDLE)/manifest.json || $(MAKE) model
	$(BIN)/python bench/side_by_side.py --bundle $(BUNDLE)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
