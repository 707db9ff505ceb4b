"""Run the real service (`encoder serve`) as a subprocess on
127.0.0.1 with a free port, for end-to-end tests:

    with running_service(bundle, max_batch_size=1, api_key="secret") as base_url:
        httpx.post(f"{base_url}/embed", json={"inputs": "hello"})

Keyword arguments are settings (DESIGN.md §7), passed as ENCODER_<NAME> variables. The process is
started, waited for until /ready answers 200, and always stopped (SIGTERM, then SIGKILL).
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def encoder_environment(bundle: Path, port: int, settings: dict[str, object]) -> dict[str, str]:
    environment = dict(os.environ)
    environment.update(
        {"ENCODER_BUNDLE": str(bundle), "ENCODER_HOST": "127.0.0.1", "ENCODER_PORT": str(port)}
    )
    for name, value in settings.items():
        key = name.upper()
        environment[key if key.startswith("ENCODER_") else f"ENCODER_{key}"] = str(value)
    return environment


class ServiceProcess:
    """One service process; `running_service` is the usual way in. Tests that need the process itself
    (signals, exit code, log) use this class directly."""

    def __init__(self, bundle: Path, **settings: object) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        log_fd, log_path = tempfile.mkstemp(prefix="encoder-serve-", suffix=".log")
        self.log_path = Path(log_path)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "encoder_cli", "serve"],
            cwd=REPO_ROOT,
            env=encoder_environment(Path(bundle), self.port, settings),
            stdout=log_fd,
            stderr=subprocess.STDOUT,
        )
        os.close(log_fd)  # the child holds its own copy

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"service exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{self.base_url}/ready", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"service not ready after {timeout_s} s:\n{self.log()[-3000:]}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM (the service drains), SIGKILL if it does not exit in time; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> "ServiceProcess":
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self.log_path.unlink(missing_ok=True)


@contextmanager
def running_service(bundle: Path, **settings: object) -> Iterator[str]:
    """Start the service on `bundle` with the given settings; yields its base URL."""
    with ServiceProcess(bundle, **settings) as service:
        yield service.base_url
