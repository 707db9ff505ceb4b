"""Static checks of the deployment files: Docker cannot build on the development machine, so the
Dockerfile, compose file, Prometheus, Grafana and nginx configs are kept correct by their own linters
and by checking them against the service they deploy (metric names, routes, settings)."""

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "encoder.json"
PROFILES = ("gpu", "cpu", "scale")
BUNDLE_MOUNT = "/models/default"


def system_tool(name: str) -> str:
    """A linter installed by `make system-deps` or the dev extra; missing means a broken setup, not a skip."""
    beside_python = Path(sys.executable).parent / name
    path = str(beside_python) if beside_python.exists() else shutil.which(name)
    assert path, f"{name} not found: run `make system-deps` and install the dev extra"
    return path


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def compose_config() -> dict[str, Any]:
    """The resolved compose file with every profile enabled, so that every service is in it."""
    profiles = [arg for profile in PROFILES for arg in ("--profile", profile)]
    result = run_tool(system_tool("docker-compose"), *profiles, "config")
    return yaml.safe_load(result.stdout)


def dockerfile_stages() -> dict[str, str]:
    """Stage name -> the instructions of that stage."""
    text = (ROOT / "Dockerfile").read_text()
    stages: dict[str, str] = {}
    for block in re.split(r"^(?=FROM )", text, flags=re.MULTILINE)[1:]:
        name = re.match(r"FROM \S+ AS (\S+)", block)
        assert name, f"every stage is named: {block.splitlines()[0]}"
        stages[name.group(1)] = block
    return stages


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def exposed_metric_names() -> set[str]:
    """Every series name that the service's metrics module exposes, with histogram/counter suffixes."""
    from service.metrics import Metrics

    metrics = Metrics()
    metrics.add_model("tiny")  # as the service does on load
    metrics.model_loaded("tiny", name="tiny", version="1", variant="fp32", provider="cpu", resident=1)
    names = set()
    for line in metrics.exposition().decode().splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_hadolint_passes() -> None:
    run_tool(
        system_tool("hadolint"),
        "Dockerfile",
        "deploy/model.Dockerfile",
        "tests/podman/prometheus.Containerfile",
    )


@pytest.mark.parametrize("profile", PROFILES)
def test_compose_config_is_valid_for_each_profile(profile: str) -> None:
    run_tool(system_tool("docker-compose"), "--profile", profile, "config", "--quiet")


def test_promtool_accepts_prometheus_config() -> None:
    run_tool(system_tool("promtool"), "check", "config", str(DEPLOY / "prometheus.yml"))


def test_dockerfile_gpu_and_cpu_targets_install_no_torch() -> None:
    stages = dockerfile_stages()
    assert re.search(r"FROM nvidia/cuda:12\.\S+-cudnn-runtime-\S+ AS gpu", stages["gpu"])
    assert re.search(r"FROM python:3\.11-slim\S* AS cpu", stages["cpu"])
    for target in ("gpu", "cpu"):
        stage = stages[target]
        installs = re.findall(r"pip install [^\n]*", stage)
        # The dependencies from the target's lock file, hashes checked; the project's wheel adds nothing.
        assert installs == [
            "pip install --no-cache-dir --no-deps --require-hashes -r /tmp/requirements.txt \\",
            "pip install --no-cache-dir --no-deps /wheels/encoder_service-*.whl \\",
        ], installs
        assert f"COPY requirements/{target}.txt /tmp/requirements.txt" in stage
        assert "pip check" in stage, "the build must fail if the lock file misses a dependency"
        assert "find_spec('torch') is not None" in stage, "the build must fail if torch sneaks in"
        user = re.findall(r"^USER (\S+)", stage, flags=re.MULTILINE)
        assert user and user[-1] not in ("root", "0"), f"{target} runs as root"
        assert f"ENCODER_BUNDLE={BUNDLE_MOUNT}" in stage
        assert "ENCODER_HOST=0.0.0.0" in stage
        assert 'ENTRYPOINT ["encoder", "serve"]' in stage


def test_dockerfile_healthcheck_probes_ready() -> None:
    for target, stage in dockerfile_stages().items():
        if target == "wheel":
            continue
        healthcheck = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])$", stage, flags=re.MULTILINE | re.DOTALL)
        assert healthcheck, f"{target} has no HEALTHCHECK"
        command = json.loads(healthcheck.group(1))
        assert command[:2] == ["python", "-c"] and "/ready" in command[2]
        compile(command[2], "HEALTHCHECK", "exec")


def test_dockerignore_lets_in_exactly_what_the_stages_copy() -> None:
    patterns = [
        line
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert patterns[0] == "*", "the context is an allow-list"
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    copied: set[str] = set()
    for line in re.findall(r"^COPY (?!--from)(.+)$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE):
        copied.update(source.rstrip("/") for source in line.split()[:-1])
    assert copied == allowed
    for source in copied:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which does not exist"


def test_compose_gpu_service_reserves_a_gpu_and_every_replica_mounts_the_bundle() -> None:
    services = compose_config()["services"]
    devices = services["encoder"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for name in ("encoder", "encoder-cpu", "encoder-replica"):
        service = services[name]
        assert service["build"]["target"] == ("gpu" if name == "encoder" else "cpu")
        assert any(volume.endswith(f":{BUNDLE_MOUNT}:ro") for volume in service["volumes"]), name
        assert service["environment"]["ENCODER_BUNDLE"] == BUNDLE_MOUNT
        assert service["environment"]["ENCODER_HOST"] == "0.0.0.0"


def test_prometheus_discovers_every_encoder_service() -> None:
    services = compose_config()["services"]
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    encoder_job = next(job for job in scrape if job["job_name"] == "encoder")
    (discovery,) = encoder_job["dns_sd_configs"]
    assert discovery["port"] == 8000
    for name in ("encoder", "encoder-cpu", "encoder-replica"):
        aliases = services[name]["networks"]["default"]["aliases"]
        assert set(discovery["names"]) <= set(aliases), f"Prometheus cannot find {name}"


def test_scale_profile_fronts_the_replicas_with_the_project_nginx_config() -> None:
    services = compose_config()["services"]
    nginx = services["nginx"]
    assert any(volume.startswith(f"{DEPLOY / 'nginx' / 'nginx.conf'}:") for volume in nginx["volumes"])
    assert nginx["depends_on"]["encoder-replica"]["condition"] == "service_healthy"
    assert "ports" not in services["encoder-replica"], "replicas are reached only through nginx"
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert re.search(r"server encoder-replica:8000 max_fails=\d+ fail_timeout=\d+s;", conf)
    next_upstream = re.search(r"proxy_next_upstream ([^;]+);", conf)
    assert next_upstream
    assert {"error", "timeout", "http_502", "http_503", "non_idempotent"} <= set(
        next_upstream.group(1).split()
    )


def test_nginx_config_passes_nginx_t(tmp_path: Path) -> None:
    # The compose host name does not resolve outside Docker, so the test swaps in a loopback address.
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text().replace("encoder-replica:8000", "127.0.0.1:9")
    (tmp_path / "nginx.conf").write_text(conf)
    run_tool(
        system_tool("nginx"),
        "-t",
        "-p",
        str(tmp_path),
        "-c",
        str(tmp_path / "nginx.conf"),
        "-g",
        f"pid {tmp_path / 'nginx.pid'}; error_log stderr;",
    )


def test_nginx_closes_a_connection_whose_headers_stall(tmp_path: Path) -> None:
    from service.process import free_port
    from service.settings import Settings

    shipped = (DEPLOY / "nginx" / "nginx.conf").read_text()
    header_timeout = re.search(r"client_header_timeout (\d+)s;", shipped)
    body_timeout = re.search(r"client_body_timeout (\d+)s;", shipped)
    assert header_timeout and body_timeout and "proxy_request_buffering on;" in shipped
    # No looser than the service's own deadlines, which hold when it is reached directly.
    assert int(header_timeout.group(1)) <= Settings().header_timeout_s
    assert int(body_timeout.group(1)) <= Settings().body_timeout_s
    # The shipped config on a free port with a 1 s header deadline (the shipped 10 s would only slow the
    # test down); every other directive as shipped.
    port = free_port()
    conf = shipped.replace("encoder-replica:8000", "127.0.0.1:9").replace(
        "listen 8080;", f"listen 127.0.0.1:{port};"
    )
    conf = conf.replace(header_timeout.group(0), "client_header_timeout 1s;")
    conf = conf.replace("access_log /dev/stdout", f"access_log {tmp_path / 'access.log'}")
    (tmp_path / "nginx.conf").write_text(conf)
    args = [system_tool("nginx"), "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    args += ["-g", f"daemon off; pid {tmp_path / 'nginx.pid'}; error_log stderr;"]
    nginx = subprocess.Popen(args, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:  # until nginx listens
            try:
                connection = socket.create_connection(("127.0.0.1", port), timeout=60)
                break
            except ConnectionRefusedError:
                assert nginx.poll() is None and time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.05)
        with connection:
            connection.sendall(b"POST /embed HTTP/1.1\r\nHost: x\r\nContent-Ty")  # and nothing more
            assert connection.recv(65536) == b""  # closed by nginx, not by the socket's 60 s timeout
    finally:
        nginx.terminate()
        nginx.wait(30)


def test_grafana_dashboard_is_importable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels), "panel ids must be unique"
    variable, model = dashboard["templating"]["list"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    # The model selector lists the loaded models and selects all of them by default.
    assert model["name"] == "model" and model["definition"] == "label_values(encoder_model_info, model)"
    assert model["includeAll"] and model["allValue"] == ".*"
    for panel in panels:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"][
            "w"
        ] <= 24
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"] and all(target["expr"].strip() for target in panel["targets"])
        assert len({target["refId"] for target in panel["targets"]}) == len(panel["targets"])
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    assert variable["current"]["value"] == provisioned["datasources"][0]["uid"]
    provider = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "dashboards" / "encoder.yml").read_text()
    )
    grafana_volumes = compose_config()["services"]["grafana"]["volumes"]
    assert f"{DASHBOARD.parent}:{provider['providers'][0]['options']['path']}:ro" in grafana_volumes


def test_dashboard_queries_use_only_metrics_the_service_exposes() -> None:
    exposed = exposed_metric_names()
    referenced = {name for expr in dashboard_exprs() for name in re.findall(r"\bencoder_\w+", expr)}
    assert referenced - exposed == set()
    # The panels: traffic by route and status, latency, batching, padding, queue, rejections.
    for required in (
        "encoder_requests_total",
        "encoder_request_duration_seconds_bucket",
        "encoder_batch_size_sum",
        "encoder_batch_tokens_sum",
        "encoder_batch_padding_ratio_sum",
        "encoder_queue_items",
        "encoder_rejected_total",
    ):
        assert required in referenced, f"no panel shows {required}"


def test_dashboard_follows_the_model_selector() -> None:
    # Every service metric has a `model` label: each panel shows the models chosen in the selector.
    for expr in dashboard_exprs():
        for selector in re.findall(r"\bencoder_\w+(\{[^}]*\})?", expr):
            assert selector.startswith('{model=~"$model"'), expr


def test_dashboard_traffic_panels_cover_every_inference_route() -> None:
    from service.metrics import INFERENCE_ROUTES

    selectors = {selector for expr in dashboard_exprs() for selector in re.findall(r'route=~"([^"]*)"', expr)}
    assert selectors == {"|".join(INFERENCE_ROUTES)}


def test_encoder_serve_starts_its_cli_without_torch(tmp_path: Path) -> None:
    # A sitecustomize that makes `import torch` fail stands in for the images, which have no torch.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is not installed in the runtime image')\n"
        "sys.meta_path.insert(0, _NoTorch())\n"
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"}
    blocked = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, env=env, timeout=60)
    assert blocked.returncode != 0, "the torch blocker does not work"
    encoder = str(Path(sys.executable).parent / "encoder")
    result = subprocess.run(
        [encoder, "serve", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr
    assert "--bundle" in result.stdout


def test_gpu_check_stops_with_a_clear_message_without_cuda(tiny_bundle: Path) -> None:
    result = subprocess.run(
        ["bash", "bench/gpu_check.sh", str(tiny_bundle)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert result.returncode != 0
    assert "CPUExecutionProvider" in result.stdout, "it reports the providers ONNX Runtime sees"
    assert "CUDAExecutionProvider is missing" in result.stderr
