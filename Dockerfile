# syntax=docker/dockerfile:1
#
# Runtime images of the encoder service. Neither contains torch: they install the project's base
# dependencies plus the `gpu` or `cpu` extra (pyproject.toml) and nothing from `train`, at the exact
# versions and hashes of the lock files requirements/gpu.txt and cpu.txt (`make lock` refreshes them).
#
#   docker build --target gpu -t encoder-service:gpu .   # CUDA 12 + cuDNN 9 + onnxruntime-gpu
#   docker build --target cpu -t encoder-service:cpu .   # python:3.11-slim + onnxruntime
#
# The model bundle is not baked in: mount it read-only at /models/default (ENCODER_BUNDLE), e.g.
#   docker run --rm -p 8000:8000 -v "$PWD/bundles/default:/models/default:ro" encoder-service:cpu
# Every ENCODER_* setting (service/settings.py) can be passed with -e; extra flags go after the image name.

# ---- wheel: the project as one pure-Python wheel, so the runtime stages never see the sources.
FROM python:3.11-slim-bookworm AS wheel
WORKDIR /src
COPY pyproject.toml README.md encoder_cli.py ./
COPY bundle/ bundle/
COPY model/ model/
COPY export/ export/
COPY service/ service/
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- gpu: NVIDIA's runtime base already carries the CUDA 12 and cuDNN 9 libraries that the
# PyPI onnxruntime-gpu wheel (built for CUDA 12.x / cuDNN 9.x) loads at session creation.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS gpu
# Ubuntu's python3 packages are version-pinned by the base image tag; pinning each one again
# would break the build at every Ubuntu security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Dependencies first, in a layer of their own: a change to the code alone does not reinstall them.
COPY requirements/gpu.txt /tmp/requirements.txt
RUN python3 -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir --no-deps --require-hashes -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY --from=wheel /wheels /wheels
# pip check fails the build if the lock file misses a dependency of the project; the find_spec check
# fails it if any dependency ever drags torch in.
RUN pip install --no-cache-dir --no-deps /wheels/encoder_service-*.whl \
    && rm -rf /wheels \
    && pip check \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && encoder serve --help > /dev/null
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin encoder \
    && mkdir -p /models \
    && chown encoder /models
USER 10001
ENV ENCODER_BUNDLE=/models/default \
    ENCODER_HOST=0.0.0.0 \
    ENCODER_PORT=8000 \
    ENCODER_PROVIDER=cuda
EXPOSE 8000
# /ready (not /health) so that the orchestrator only routes to a replica whose model is loaded and
# warmed up, and stops routing to it while it drains on shutdown.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('ENCODER_PORT', '8000')}/ready\", timeout=2)"]
ENTRYPOINT ["encoder", "serve"]

# ---- cpu: a slim Python base and the CPU build of ONNX Runtime.
FROM python:3.11-slim-bookworm AS cpu
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY requirements/cpu.txt /tmp/requirements.txt
RUN python -m venv "$VIRTUAL_ENV" \
    && pip install --no-cache-dir --no-deps --require-hashes -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt
COPY --from=wheel /wheels /wheels
RUN pip install --no-cache-dir --no-deps /wheels/encoder_service-*.whl \
    && rm -rf /wheels \
    && pip check \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && encoder serve --help > /dev/null
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin encoder \
    && mkdir -p /models \
    && chown encoder /models
USER 10001
ENV ENCODER_BUNDLE=/models/default \
    ENCODER_HOST=0.0.0.0 \
    ENCODER_PORT=8000 \
    ENCODER_PROVIDER=cpu
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(f\"http://127.0.0.1:{os.environ.get('ENCODER_PORT', '8000')}/ready\", timeout=2)"]
ENTRYPOINT ["encoder", "serve"]
