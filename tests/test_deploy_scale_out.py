"""The scale-out shape of docker-compose.yml without Docker: two `encoder serve` replicas on loopback
behind a real nginx running the project's deploy/nginx/nginx.conf, and a real Prometheus running
deploy/prometheus.yml, each with only its addresses swapped for loopback ones.

One replica is SIGKILLed in the middle of a load that spans both; nginx must retry every request it
had sent there, so the clients see no failure. The Grafana dashboard's queries then run against that
Prometheus, which checks their PromQL and their metric names on live data.
"""

import json
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.process import ServiceProcess, free_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
STARTUP_TIMEOUT_S = 60.0
SCRAPE_INTERVAL = "1s"


def dashboard_all_value(dashboard: dict[str, Any], variable: str) -> str:
    """The value Grafana substitutes for a template variable when "All" is selected."""
    (template,) = [entry for entry in dashboard["templating"]["list"] if entry["name"] == variable]
    return template["allValue"]


# Grafana's $__rate_interval is at least four scrape intervals; with 1 s scrapes a 10 s window is safe.
RATE_INTERVAL = "10s"
CLIENTS = 6
REQUESTS_AFTER_KILL = 150
TEXTS = ["the dog sees the garden.", "a small fern grows near the river bank.", "the hammer breaks a nail."]


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll `condition` (which may raise httpx errors while a process starts) until it holds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def answers_200(url: str) -> bool:
    return httpx.get(url, timeout=2.0).status_code == 200


@contextmanager
def process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """nginx or Prometheus in the foreground, stopped (SIGTERM, then SIGKILL) when the block ends."""
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class Stack:
    replicas: list[ServiceProcess]
    proxy_url: str
    prometheus_url: str
    nginx_log: Path

    def prometheus_query(self, expr: str) -> list[dict]:
        response = httpx.get(f"{self.prometheus_url}/api/v1/query", params={"query": expr}, timeout=10.0)
        body = response.json()
        assert response.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def embeds_scraped(self) -> dict[str, float]:
        """Successful /embed requests per replica, as Prometheus last scraped them."""
        series = self.prometheus_query('encoder_requests_total{route="/embed",status="200"}')
        return {sample["metric"]["instance"]: float(sample["value"][1]) for sample in series}


def address(replica: ServiceProcess) -> str:
    return f"127.0.0.1:{replica.port}"


def nginx_conf(upstreams: list[str], listen_port: int, temp_dir: Path) -> str:
    """deploy/nginx/nginx.conf with loopback upstream addresses; every other directive as shipped."""
    conf = (DEPLOY / "nginx" / "nginx.conf").read_text()
    server_line = re.search(r"^(\s*)server encoder-replica:8000( [^;]*);$", conf, flags=re.MULTILINE)
    assert server_line, "deploy/nginx/nginx.conf must have one `server encoder-replica:8000 ...;` line"
    indent, parameters = server_line.groups()
    servers = "\n".join(f"{indent}server {upstream}{parameters};" for upstream in upstreams)
    conf = conf.replace(server_line.group(0), servers)
    assert "listen 8080;" in conf
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{listen_port};")
    # Debian's nginx keeps its temporary files under /var/lib/nginx; a test keeps them in its own folder.
    temp_paths = "".join(
        f"\n    {kind}_temp_path {temp_dir / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return conf.replace("http {", "http {" + temp_paths, 1)


def start_nginx(stack: ExitStack, upstreams: list[str], root: Path) -> tuple[str, Path]:
    """nginx in the foreground on a free loopback port; its URL (once /ready passes) and access log."""
    root.mkdir()
    port = free_port()
    (root / "nginx.conf").write_text(nginx_conf(upstreams, port, root))
    args = ["nginx", "-e", "stderr", "-p", str(root), "-c", str(root / "nginx.conf")]
    args += ["-g", f"daemon off; pid {root / 'nginx.pid'};"]
    log = root / "access.log"
    stack.enter_context(process(args, log))
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: answers_200(f"{url}/ready"), "nginx to proxy /ready")
    return url, log


def prometheus_conf(replicas: list[ServiceProcess]) -> str:
    """deploy/prometheus.yml with static loopback targets in place of the Docker DNS discovery."""
    conf = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    conf["global"]["scrape_interval"] = SCRAPE_INTERVAL
    jobs = [job for job in conf["scrape_configs"] if job["job_name"] == "encoder"]
    assert len(jobs) == 1 and "dns_sd_configs" in jobs[0]
    encoder_job = jobs[0]
    del encoder_job["dns_sd_configs"]
    encoder_job["static_configs"] = [{"targets": [address(replica) for replica in replicas]}]
    return yaml.safe_dump({"global": conf["global"], "scrape_configs": [encoder_job]})


@pytest.fixture(scope="module")
def scale_out(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    for tool in ("nginx", "prometheus"):
        assert shutil.which(tool), f"{tool} not found: run `make system-deps`"
    root = tmp_path_factory.mktemp("scale_out")
    with ExitStack() as stack:
        # One ONNX Runtime thread each: the two replicas share the CI machine's cores.
        replicas = [
            stack.enter_context(ServiceProcess(tiny_bundle, provider="cpu", intra_op_threads=1))
            for _ in range(2)
        ]

        proxy_url, nginx_log = start_nginx(stack, [address(replica) for replica in replicas], root / "nginx")

        prometheus_port = free_port()
        (root / "prometheus.yml").write_text(prometheus_conf(replicas))
        prometheus_args = [
            "prometheus",
            f"--config.file={root / 'prometheus.yml'}",
            f"--storage.tsdb.path={root / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prometheus_port}",
        ]
        stack.enter_context(process(prometheus_args, root / "prometheus.log"))

        result = Stack(
            replicas=replicas,
            proxy_url=proxy_url,
            prometheus_url=f"http://127.0.0.1:{prometheus_port}",
            nginx_log=nginx_log,
        )
        wait_until(lambda: answers_200(f"{result.prometheus_url}/-/ready"), "Prometheus /-/ready")
        yield result


@dataclass
class Load:
    """Clients that POST /embed through nginx until stopped, recording every outcome."""

    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    outcomes: list[str] = field(default_factory=list)  # "ok", or what went wrong
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, seed: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30.0) as http:
            sent = seed
            while not self.stop.is_set():
                texts = [TEXTS[(sent + offset) % len(TEXTS)] for offset in range(1 + sent % 3)]
                sent += 1
                try:
                    response = http.post("/embed", json={"inputs": texts})
                    body = response.json()
                    good = response.status_code == 200 and len(body) == len(texts) and len(body[0]) == 32
                    outcome = "ok" if good else f"{response.status_code} {response.text[:200]}"
                except httpx.HTTPError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                with self.lock:
                    self.outcomes.append(outcome)

    def count(self) -> int:
        with self.lock:
            return len(self.outcomes)


@contextmanager
def running_load(url: str) -> Iterator[Load]:
    load = Load(url)
    clients = [threading.Thread(target=load.client, args=(seed,), daemon=True) for seed in range(CLIENTS)]
    for client in clients:
        client.start()
    try:
        yield load
    finally:
        load.stop.set()
        for client in clients:
            client.join(timeout=60)


def test_killing_a_replica_mid_load_fails_no_request(scale_out: Stack) -> None:
    survivor, victim = scale_out.replicas
    with running_load(scale_out.proxy_url) as load:
        # Round robin must have reached both replicas, and Prometheus must have scraped both, before the kill.
        wait_until(
            lambda: (
                set(scale_out.embeds_scraped()) == {address(survivor), address(victim)}
                and min(scale_out.embeds_scraped().values()) > 0
            ),
            "Prometheus to see /embed traffic on both replicas",
        )
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait(timeout=10)
        sent_before_kill = load.count()
        wait_until(lambda: load.count() >= sent_before_kill + REQUESTS_AFTER_KILL, "the load to go on")

    failures = Counter(outcome for outcome in load.outcomes if outcome != "ok")
    assert not failures, f"{sum(failures.values())} of {len(load.outcomes)} requests failed: {failures}"
    # The kill was absorbed by nginx's retries, not dodged: some requests went to the dead replica first.
    log = scale_out.nginx_log.read_text()
    retried = re.findall(rf"upstream={re.escape(address(victim))}, {re.escape(address(survivor))} ", log)
    assert retried, "no request was retried from the killed replica to the survivor"
    wait_until(
        lambda: (
            {s["metric"]["instance"]: s["value"][1] for s in scale_out.prometheus_query('up{job="encoder"}')}
            == {address(survivor): "1", address(victim): "0"}
        ),
        "Prometheus to see the killed replica down",
    )


def test_dashboard_queries_run_on_prometheus(scale_out: Stack, tmp_path: Path) -> None:
    with httpx.Client(base_url=scale_out.proxy_url, timeout=30.0) as http:
        for index in range(20):
            assert http.post("/embed", json={"inputs": TEXTS[: 1 + index % 3]}).status_code == 200
            assert http.post("/classify", json={"inputs": TEXTS[index % 3]}).status_code == 200
            assert http.post("/embed", json={"inputs": []}).status_code == 422  # rejections to plot
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "encoder.json").read_text())
    exprs = {
        # The model selector as Grafana sends it with "All" chosen (the dashboard's allValue).
        f"{panel['title']} / {target['legendFormat']}": target["expr"]
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("$model", dashboard_all_value(dashboard, "model"))
        for panel in dashboard["panels"]
        for target in panel["targets"]
        # Reloads are events this traffic does not cause (tests/test_service_multimodel.py reloads).
        if panel["title"] != "Model reloads by outcome"
    }
    # A query that Prometheus refuses fails at once; one without data yet is retried until the scrapes
    # that follow the traffic above have landed.
    without_data = list(exprs)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while without_data and time.monotonic() < deadline:
        without_data = [name for name, expr in exprs.items() if not scale_out.prometheus_query(expr)]
        time.sleep(0.5)
    assert not without_data, f"panels without data: {without_data}"
    # The same queries drawn as the picture in the docs.
    picture = tmp_path / "dashboard.png"
    renderer = [sys.executable, str(DEPLOY / "grafana" / "render_dashboard.py"), "--minutes", "1"]
    renderer += [
        "--prometheus",
        scale_out.prometheus_url,
        "--rate-interval",
        RATE_INTERVAL,
        "--out",
        str(picture),
    ]
    subprocess.run(renderer, check=True, capture_output=True, timeout=120)
    assert picture.read_bytes().startswith(b"\x89PNG")


class DrainingReplica(BaseHTTPRequestHandler):
    """Answers like a replica after SIGTERM (or before its model is loaded): 503 Unhealthy everywhere."""

    hits: list[str]  # request paths, set per server

    def answer(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.hits.append(self.path)
        body = b'{"error": "the service is shutting down", "error_type": "Unhealthy"}'
        self.send_response(503)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = answer

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def draining_replica() -> Iterator[tuple[str, list[str]]]:
    hits: list[str] = []
    handler = type("Handler", (DrainingReplica,), {"hits": hits})
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", hits
    finally:
        server.shutdown()
        server.server_close()


def docker_healthcheck_passes(port: int) -> bool:
    """Runs the Dockerfile's HEALTHCHECK command (the same in both targets) against a local port."""
    healthcheck = re.search(r"^HEALTHCHECK .*?CMD (\[.*?\])$", (ROOT / "Dockerfile").read_text(), re.M | re.S)
    assert healthcheck
    _image_python, flag, code = json.loads(healthcheck.group(1))  # the venv python inside the image
    env = {"ENCODER_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return (
        subprocess.run([sys.executable, flag, code], env=env, capture_output=True, timeout=30).returncode == 0
    )


def test_a_draining_replica_is_retried_around_and_benched(tiny_bundle: Path, tmp_path: Path) -> None:
    requests = 40
    with ExitStack() as stack:
        replica = stack.enter_context(ServiceProcess(tiny_bundle, provider="cpu", intra_op_threads=1))
        draining_address, hits = stack.enter_context(draining_replica())
        # Docker marks the draining container unhealthy from the same 503 that nginx retries around.
        assert docker_healthcheck_passes(replica.port)
        assert not docker_healthcheck_passes(int(draining_address.rsplit(":", 1)[1]))
        hits.clear()
        url, log = start_nginx(stack, [draining_address, address(replica)], tmp_path / "nginx")
        with httpx.Client(base_url=url, timeout=30.0) as http:
            statuses = [
                http.post("/embed", json={"inputs": TEXTS[i % 3]}).status_code for i in range(requests)
            ]
    assert statuses == [200] * requests
    retried = re.findall(
        rf"upstream={re.escape(draining_address)}, {re.escape(address(replica))} ", log.read_text()
    )
    assert hits and len(retried) == len(hits), "every 503 of the draining replica is retried on the ready one"
    # Round robin alone would send it every other request; after a 503, max_fails=1 benches it a while.
    assert len(hits) < requests / 4, f"the draining replica kept getting traffic: {len(hits)} of {requests}"
