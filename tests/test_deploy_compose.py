"""docker-compose.yml up for real: the `cpu` profile's encoder and Prometheus as containers, Prometheus
scraping the encoder through the compose network (the `encoder-metrics` alias), then a stop that
drains the encoder.

docker-compose (Debian's 1.29) drives podman through podman's Docker-compatible API on a unix socket
that the test starts. The encoder image is built from the Dockerfile; Prometheus is the upstream image
where podman has it, else a stand-in from Debian's package (tests/podman/prometheus.Containerfile).
Grafana is not started: its image cannot be pulled here and no package registry that can be reached
ships it.
"""

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml
from containers import (
    DEFAULT_BUNDLE,
    PODMAN,
    ROOT,
    SKIP_REASON,
    build_prometheus_standin,
    build_service_image,
    podman,
    podman_environment,
)

from service.process import free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(PODMAN is None, reason=SKIP_REASON),
    pytest.mark.timeout(1800),
]

SERVICES = ("encoder-cpu", "prometheus")
T = TypeVar("T")


def wait_for(condition: Callable[[], T], what: str, timeout_s: float = 120.0) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            value = condition()
            if value:
                return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def docker_api_ping(socket_path: Path) -> bool:
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(str(socket_path))
        client.sendall(b"GET /_ping HTTP/1.0\r\nHost: podman\r\n\r\n")
        return b"200 OK" in client.recv(4096)
    return False


@contextlib.contextmanager
def podman_api() -> Iterator[str]:
    """`podman system service` on a private unix socket; yields its DOCKER_HOST."""
    assert PODMAN
    with tempfile.TemporaryDirectory(prefix="encoder-podman-api-") as workdir:
        socket_path = Path(workdir) / "podman.sock"
        service = subprocess.Popen(
            [PODMAN, "system", "service", "--time=0", f"unix://{socket_path}"],
            env=podman_environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while not docker_api_ping(socket_path):
                assert service.poll() is None, f"podman system service exited with {service.returncode}"
                assert time.monotonic() < deadline, "podman's API did not answer within 30 s"
                time.sleep(0.1)
            yield f"unix://{socket_path}"
        finally:
            service.terminate()
            service.wait(timeout=30)


class Compose:
    def __init__(self, docker_host: str, project: str, environment: dict[str, str]) -> None:
        self.project = project
        self.environment = dict(os.environ) | environment | {"DOCKER_HOST": docker_host}

    def __call__(self, *args: str, timeout: float = 300.0) -> subprocess.CompletedProcess[str]:
        docker_compose = shutil.which("docker-compose")
        assert docker_compose, "docker-compose not found: `make system-deps` installs it"
        command = [docker_compose, "--project-name", self.project, "--profile", "cpu", *args]
        result = subprocess.run(
            command, cwd=ROOT, env=self.environment, capture_output=True, text=True, timeout=timeout
        )
        assert result.returncode == 0, f"docker-compose {' '.join(args)} failed:\n{result.stderr[-4000:]}"
        return result

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"  # docker-compose 1.x names


def prometheus_image() -> str:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return compose["services"]["prometheus"]["image"]


def prometheus_query(url: str, query: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{url}/api/v1/query", params={"query": query}, timeout=10)
    response.raise_for_status()
    return response.json()["data"]["result"]


def container_address(name: str, project: str) -> str:
    networks = podman("inspect", "--format", "{{json .NetworkSettings.Networks}}", name).stdout
    network = yaml.safe_load(networks)[f"{project}_default"]
    return network["IPAddress"]


def test_compose_cpu_profile_serves_and_prometheus_scrapes_it_through_the_network() -> None:
    build_service_image("cpu")  # the image that docker-compose.yml names, encoder-service:cpu
    build_prometheus_standin(prometheus_image())
    encoder_port, prometheus_port = free_port(), free_port()
    encoder_url, prometheus_url = f"http://127.0.0.1:{encoder_port}", f"http://127.0.0.1:{prometheus_port}"
    environment = {
        "ENCODER_BUNDLE_DIR": str(DEFAULT_BUNDLE),
        "ENCODER_PUBLISH": f"127.0.0.1:{encoder_port}",
        "PROMETHEUS_PUBLISH": f"127.0.0.1:{prometheus_port}",
    }
    with podman_api() as docker_host:
        compose = Compose(docker_host, f"encodertest{os.getpid()}", environment)
        try:
            compose("up", "--detach", "--no-build", *SERVICES)
            wait_for(lambda: httpx.get(f"{encoder_url}/ready", timeout=2).status_code == 200, "/ready")
            with httpx.Client(base_url=encoder_url, timeout=30) as http:
                for _ in range(3):
                    assert http.post("/embed", json={"inputs": "a cat"}).status_code == 200
                assert http.post("/classify", json={"inputs": "a cat"}).status_code == 200

            # Prometheus found the encoder by DNS on the compose network, not through a published port.
            address = container_address(compose.container("encoder-cpu"), compose.project)
            scraped = wait_for(
                lambda: prometheus_query(
                    prometheus_url, 'encoder_requests_total{route="/embed",status="200"}'
                ),
                "Prometheus to scrape the /embed requests",
            )
            assert [sample["metric"]["instance"] for sample in scraped] == [f"{address}:8000"]
            assert float(scraped[0]["value"][1]) >= 3
            up = prometheus_query(prometheus_url, 'up{job="encoder"}')
            assert [sample["value"][1] for sample in up] == ["1"]

            # `docker compose stop`: SIGTERM through the init process; the service drains and exits 0.
            compose("stop", "encoder-cpu", timeout=120)
            exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", compose.container("encoder-cpu"))
            assert exit_code.stdout.strip() == "0"
            logs = podman("logs", compose.container("encoder-cpu"))
            assert "SIGTERM: draining" in logs.stdout + logs.stderr
        finally:
            compose("down", "--volumes", "--timeout", "5")
