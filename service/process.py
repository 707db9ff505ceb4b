"""Run the real service (`encoder serve`) as a child process on 127.0.0.1 with a free port, for the
end-to-end tests and the benchmarks:

    with running_service(bundle, max_batch_size=1, api_key="secret") as base_url:
        httpx.post(f"{base_url}/embed", json={"inputs": "hello"})

Keyword arguments are settings (docs/architecture.md, "Settings"), passed as ENCODER_<NAME>
variables. The process is started, waited for until /ready answers 200, and always stopped (SIGTERM,
then SIGKILL). Standard library only, so that it runs wherever the service is installed.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A safety net against a start that hangs, not a speed requirement: on a loaded shared machine the
# imports alone have taken a minute.
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.1


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


# The service is on loopback: never through an HTTP proxy that the environment may name.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def answers_ready(url: str) -> bool:
    try:
        with _DIRECT.open(f"{url}/ready", timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):  # HTTPError (503) is a URLError
        return False


class ServiceProcess:
    """One service process; `running_service` is the usual way in. Callers that need the process
    itself (signals, exit code, log) use this class directly."""

    def __init__(self, bundle: Path, **settings: object) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        log_fd, log_path = tempfile.mkstemp(prefix="encoder-serve-", suffix=".log")
        self.log_path = Path(log_path)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "encoder_cli", "serve"],
            env=encoder_environment(Path(bundle).resolve(), self.port, settings),
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
            if answers_ready(self.base_url):
                return
            time.sleep(POLL_INTERVAL_S)
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
