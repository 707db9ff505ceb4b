"""The runtime images, built from the Dockerfile with podman and run as a user would run them.

The CPU image serves the default bundle (mounted read-only) with the restrictions that the Kubernetes
manifests put on it (read-only root file system, no capabilities, no privilege escalation), and must
answer exactly as the service run from source does. The GPU image is built on a stand-in base to catch
Dockerfile errors; its CUDA runtime cannot be checked without a GPU. See tests/containers.py for how
base images are provided where no registry but PyPI and Debian's can be reached.
"""

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

import httpx
import numpy as np
import pytest
from containers import (
    DEFAULT_BUNDLE,
    PODMAN,
    ROOT,
    SKIP_REASON,
    build,
    build_service_image,
    image_inspect,
    image_size_mb,
    podman,
    running_container,
    stage_base_image,
)
from locks import read_lock
from packaging.utils import canonicalize_name

from service.process import ServiceProcess, free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(PODMAN is None, reason=SKIP_REASON),
    # The first run on a machine builds the stand-in base image and the images: minutes, not seconds.
    pytest.mark.timeout(1800),
]

IMAGE_USER = "10001"
TEXTS = [
    "the dog sees the garden.",
    "a small fern grows near the river bank.",
    "the hammer breaks a nail.",
    "an old oak covers the barn " * 40,  # longer than max_seq_len: truncated the same way
    "Ünïcödé, punctuation… and digits 0123",
]
# What the Kubernetes manifests (deploy/k8s/base/deployment.yaml) enforce, applied here too.
RESTRICTED = ("--read-only", "--tmpfs=/tmp", "--cap-drop=ALL", "--security-opt=no-new-privileges")
# The service's own layers (the venv), above the base image. A CPU-only runtime: torch or a CUDA
# library would add hundreds of MB.
MAX_SERVICE_LAYERS_MB = 400


def container_name(purpose: str) -> str:
    return f"encoder-test-{purpose}-{os.getpid()}"


@pytest.fixture(scope="module")
def cpu_image() -> str:
    return build_service_image("cpu")


@pytest.fixture
def served_image(cpu_image: str) -> Iterator[tuple[str, str]]:
    """The CPU image serving the default bundle on a loopback port: (container name, base URL)."""
    port = free_port()
    bundle_mount = f"--volume={DEFAULT_BUNDLE}:/models/default:ro"
    publish = f"--publish=127.0.0.1:{port}:8000"
    with running_container(cpu_image, *RESTRICTED, bundle_mount, publish, name=container_name("cpu")) as ctr:
        url = f"http://127.0.0.1:{port}"
        ctr.wait_ready(url)
        yield ctr.name, url


def run_python(image: str, code: str) -> str:
    """Runs `code` with the image's Python (the venv), as the image's user, and returns its stdout."""
    return podman("run", "--rm", "--entrypoint=python", image, "-c", code).stdout


def installed_distributions(image: str) -> dict[str, str]:
    code = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({d.metadata['Name']: d.version for d in m.distributions()}))"
    )
    return {canonicalize_name(name): version for name, version in json.loads(run_python(image, code)).items()}


def assert_installed_as_locked(installed: dict[str, str], lock: str) -> None:
    """The image holds what requirements/<lock>.txt pins, at those versions, and nothing else but the
    project and the venv's own pip and setuptools."""
    pins = {name: pin.version for name, pin in read_lock(lock).items() if pin.applies()}
    extra = set(installed) - set(pins) - {"encoder-service", "pip", "setuptools"}
    assert not extra, f"installed but not in requirements/{lock}.txt: {extra}"
    differing = {
        name: (installed.get(name), version)
        for name, version in pins.items()
        if installed.get(name) != version
    }
    assert not differing, f"installed vs requirements/{lock}.txt: {differing}"


def test_cpu_image_serves_like_the_source(served_image: tuple[str, str]) -> None:
    _, image_url = served_image
    with ServiceProcess(DEFAULT_BUNDLE, provider="cpu") as source, httpx.Client(timeout=60) as http:
        image_info, source_info = (
            http.get(f"{image_url}/info").json(),
            http.get(f"{source.base_url}/info").json(),
        )
        for key in ("model_name", "model_version", "embedding_dim", "labels", "variant", "provider"):
            assert image_info[key] == source_info[key], key
        embeddings = [
            http.post(f"{url}/embed", json={"inputs": TEXTS}) for url in (image_url, source.base_url)
        ]
        assert [response.status_code for response in embeddings] == [200, 200]
        image_vectors, source_vectors = (np.array(response.json()) for response in embeddings)
        assert image_vectors.shape == (len(TEXTS), source_info["embedding_dim"])
        np.testing.assert_allclose(image_vectors, source_vectors, atol=1e-5)
        classified = [
            http.post(f"{url}/classify", json={"inputs": TEXTS}) for url in (image_url, source.base_url)
        ]
        assert [response.status_code for response in classified] == [200, 200]
        image_scores, source_scores = (response.json() for response in classified)
        for image_row, source_row in zip(image_scores, source_scores, strict=True):
            assert [item["label"] for item in image_row] == [item["label"] for item in source_row]
            np.testing.assert_allclose(
                [item["score"] for item in image_row], [item["score"] for item in source_row], atol=1e-5
            )


def test_cpu_image_runs_as_its_user_and_its_healthcheck_passes(served_image: tuple[str, str]) -> None:
    name, _ = served_image
    status = podman("exec", name, "cat", "/proc/1/status").stdout
    uids = re.search(r"^Uid:\s+(.*)$", status, re.M)
    assert uids and set(uids.group(1).split()) == {IMAGE_USER}, status
    # podman runs HEALTHCHECK from systemd timers, which this machine lacks: run it by hand instead.
    assert podman("healthcheck", "run", name, check=False).returncode == 0
    state = json.loads(podman("inspect", name).stdout)[0]["State"]
    assert state["Health"]["Status"] == "healthy"
    # Kubernetes' preStop hook runs `sleep` in the container (deploy/k8s/base/deployment.yaml).
    assert podman("exec", name, "sleep", "0", check=False).returncode == 0


def test_cpu_image_config_and_contents(cpu_image: str) -> None:
    inspected = image_inspect(cpu_image)
    config = inspected["Config"]
    assert config["User"] == IMAGE_USER
    assert config["Entrypoint"] == ["encoder", "serve"]
    assert "ENCODER_BUNDLE=/models/default" in config["Env"]
    assert inspected["Healthcheck"]["Test"][:3] == ["CMD", "python", "-c"], "HEALTHCHECK kept (docker format)"
    installed = installed_distributions(cpu_image)
    assert "onnxruntime" in installed and "encoder-service" in installed
    assert_installed_as_locked(installed, "cpu")
    unwanted = {
        name for name in installed if name == "torch" or name.startswith(("nvidia-", "onnxruntime-gpu"))
    }
    assert not unwanted, f"the CPU image must not contain {unwanted}"
    service_layers_mb = image_size_mb(cpu_image) - image_size_mb(stage_base_image("cpu"))
    assert service_layers_mb < MAX_SERVICE_LAYERS_MB, f"{service_layers_mb:.0f} MB above the base image"


def test_cpu_image_drains_on_sigterm_and_exits_0(cpu_image: str) -> None:
    # Batching off, so that the queued texts take a few seconds to drain on the default model.
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    run_args = (
        *RESTRICTED,
        f"--volume={DEFAULT_BUNDLE}:/models/default:ro",
        f"--publish=127.0.0.1:{port}:8000",
        "--env=ENCODER_MAX_BATCH_SIZE=1",
    )
    # About 2000 texts: seconds of work, so the drain is still going when /ready is asked.
    requests, texts_per_request = 16, 128
    payload = {"inputs": [f"{TEXTS[1]} {index}" for index in range(texts_per_request)]}
    with running_container(cpu_image, *run_args, name=container_name("drain")) as container:
        container.wait_ready(url)
        statuses: list[int] = []

        def client() -> None:
            response = httpx.post(f"{url}/embed", json=payload, timeout=120)
            statuses.append(response.status_code)

        clients = [threading.Thread(target=client) for _ in range(requests)]
        for thread in clients:
            thread.start()
        # Every request accepted (tokenised means past the readiness check) before the signal: one that
        # arrives after it is rightly refused with 503, which is not what this test is about.
        wait_for(lambda: metric(url, TOKENIZED) >= requests, "all accepted")
        queued = queue_items(url)
        podman("kill", "--signal=TERM", container.name)
        assert wait_for(lambda: httpx.get(f"{url}/ready", timeout=5).status_code == 503, "/ready to turn 503")
        for thread in clients:
            thread.join(timeout=120)
        assert statuses == [200] * requests, f"queued {queued} texts, then: {statuses}"
        assert container.wait_exit(timeout_s=60) == 0
        draining = re.search(r"SIGTERM: draining (\d+) requests in flight", container.logs())
        assert draining and int(draining.group(1)) > 0, "the signal must arrive with requests in flight"


TOKENIZED = 'encoder_tokenize_duration_seconds_count{model="default"}'


def metric(url: str, series: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    match = re.search(rf"^{re.escape(series)} (\S+)$", metrics, re.M)
    assert match, f"{series} not exposed"
    return float(match.group(1))


def queue_items(url: str) -> float:
    return metric(url, 'encoder_queue_items{model="default"}')


T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout_s: float = 60.0) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_model_image_serves_its_baked_in_bundle(cpu_image: str) -> None:
    """deploy/model.Dockerfile, as the Kubernetes manifests run it: no mount, read-only root."""
    tag = "localhost/encoder-model:test-cpu"
    build(
        tag,
        "--build-arg",
        f"SERVICE_IMAGE={cpu_image}",
        "-f",
        str(ROOT / "deploy" / "model.Dockerfile"),
        str(DEFAULT_BUNDLE),
    )
    port = free_port()
    publish = f"--publish=127.0.0.1:{port}:8000"
    with running_container(
        tag, *RESTRICTED, "--user=10001", publish, name=container_name("model")
    ) as container:
        url = f"http://127.0.0.1:{port}"
        container.wait_ready(url)
        manifest = json.loads((DEFAULT_BUNDLE / "manifest.json").read_text())
        info = httpx.get(f"{url}/info", timeout=10).json()
        assert (info["model_name"], info["model_version"]) == (manifest["name"], manifest["version"])
    podman("rmi", tag, check=False)


def test_gpu_image_builds_on_a_standin_base() -> None:
    """Catches Dockerfile errors in the gpu target. Its base is a Debian stand-in for NVIDIA's CUDA image
    here, so whether onnxruntime-gpu finds CUDA and cuDNN is not checked (it needs a GPU host)."""
    image = build_service_image("gpu")
    inspected = image_inspect(image)
    config = inspected["Config"]
    assert config["User"] == IMAGE_USER
    assert "ENCODER_PROVIDER=cuda" in config["Env"]
    assert inspected["Healthcheck"]["Test"][:3] == ["CMD", "python", "-c"]
    installed = installed_distributions(image)
    assert "onnxruntime-gpu" in installed and "onnxruntime" not in installed
    assert_installed_as_locked(installed, "gpu")
    assert "torch" not in installed
    providers = run_python(image, "import onnxruntime; print(onnxruntime.get_available_providers())")
    assert "CUDAExecutionProvider" in providers
    assert podman("run", "--rm", image, "--help").returncode == 0  # the entry point starts
