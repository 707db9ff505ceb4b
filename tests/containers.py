"""Build and run the project's images with podman, for the container tests (test_deploy_image.py,
test_deploy_compose.py).

Podman runs with tests/podman/containers.conf (CONTAINERS_CONF), so nothing on the machine needs
configuring. Images are never pulled: a base image that the Dockerfile names and podman's storage
lacks is replaced by a stand-in, Debian bookworm (`debootstrap --variant=minbase`) with Debian's
Python 3.11, pip and venv, imported under the base image's name. Its CA bundle is the machine's, so
that pip and apt inside a build trust what the machine trusts. Stand-ins stay in podman's storage: the
first run on a machine builds them (a few minutes), later runs reuse them and podman's layer cache.
"""

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PODMAN = shutil.which("podman")
SKIP_REASON = "podman is not installed (Debian package podman; `make system-deps` installs it)"
CONTAINERS_CONF = ROOT / "tests" / "podman" / "containers.conf"
PROMETHEUS_CONTAINERFILE = ROOT / "tests" / "podman" / "prometheus.Containerfile"
DEFAULT_BUNDLE = ROOT / "bundles" / "default"

DEBIAN_MIRROR = "http://deb.debian.org/debian"
STANDIN_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates")
STANDIN_LABEL = "encoder-service.test.standin"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# One stand-in build at a time on a machine, whichever checkout's tests ask for it.
BUILD_LOCK = Path(tempfile.gettempdir()) / "encoder-service-podman-standin.lock"
BUILD_TIMEOUT_S = 1200.0
READY_TIMEOUT_S = 300.0  # generous: model load and warm-up on 2 cores shared with other jobs


def podman_environment() -> dict[str, str]:
    return dict(os.environ) | {"CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(*args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert PODMAN, SKIP_REASON
    result = subprocess.run(
        [PODMAN, *args], env=podman_environment(), capture_output=True, text=True, timeout=timeout
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def image_exists(name: str) -> bool:
    return podman("image", "exists", name, check=False).returncode == 0


def qualified(name: str) -> str:
    """Docker's short names, spelt out as podman stores them (docker.io/library/python:3.11...)."""
    first = name.split("/", 1)[0]
    if "/" in name and ("." in first or ":" in first or first == "localhost"):
        return name
    return f"docker.io/{name}" if "/" in name else f"docker.io/library/{name}"


def dockerfile_base_images(dockerfile: Path = ROOT / "Dockerfile") -> list[str]:
    """The images that the Dockerfile's stages start FROM (not its own stages), fully qualified."""
    stages: set[str] = set()
    bases: list[str] = []
    for image, stage in re.findall(r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", dockerfile.read_text(), re.M | re.I):
        if image not in stages and qualified(image) not in bases:
            bases.append(qualified(image))
        if stage:
            stages.add(stage)
    return bases


def stage_base_image(target: str, dockerfile: Path = ROOT / "Dockerfile") -> str:
    """The image that the Dockerfile's stage `target` starts FROM, fully qualified."""
    match = re.search(rf"^FROM\s+(\S+)\s+AS\s+{re.escape(target)}\s*$", dockerfile.read_text(), re.M | re.I)
    assert match, f"the Dockerfile has no stage {target}"
    return qualified(match.group(1))


@contextlib.contextmanager
def build_lock() -> Iterator[None]:
    with BUILD_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def build_standin_rootfs(workdir: Path) -> Path:
    """Debian bookworm with Python, as a tar archive for `podman import`."""
    assert os.geteuid() == 0, "building a stand-in base image (debootstrap) needs root"
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    assert Path(debootstrap).exists(), "debootstrap not found: `make system-deps` installs it"
    rootfs = workdir / "rootfs"
    command = [debootstrap, "--variant=minbase", f"--include={','.join(STANDIN_PACKAGES)}", "bookworm"]
    result = subprocess.run(
        [*command, str(rootfs), DEBIAN_MIRROR], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
    )
    assert result.returncode == 0, f"debootstrap failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    shutil.copyfile(HOST_CA_BUNDLE, rootfs / "etc" / "ssl" / "certs" / "ca-certificates.crt")
    shutil.rmtree(rootfs / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    archive = workdir / "rootfs.tar"
    subprocess.run(["tar", "-C", str(rootfs), "-cf", str(archive), "."], check=True, timeout=600)
    shutil.rmtree(rootfs)
    return archive


def ensure_base_images(names: list[str]) -> None:
    """Every image in `names` present in podman's storage, stand-ins built for the missing ones."""
    with build_lock():
        missing = [name for name in names if not image_exists(name)]
        if not missing:
            return
        with tempfile.TemporaryDirectory(prefix="encoder-standin-", dir="/var/tmp") as workdir:
            archive = build_standin_rootfs(Path(workdir))
            changes = [
                f"LABEL {STANDIN_LABEL}=debian-bookworm-minbase",
                # pip inside a build uses its own CA list unless told otherwise.
                f"ENV PIP_CERT={HOST_CA_BUNDLE}",
                'CMD ["python3"]',
            ]
            podman(
                "import",
                *(arg for change in changes for arg in ("--change", change)),
                str(archive),
                missing[0],
                timeout=600,
            )
        for name in missing[1:]:
            podman("tag", missing[0], name)


def build(tag: str, *args: str) -> float:
    """`podman build` on the development machine's terms (host network for the package registries,
    no pulls, Docker's image format for HEALTHCHECK); returns the seconds it took."""
    started = time.monotonic()
    podman(
        "build",
        "--network=host",
        "--pull=never",
        "--format=docker",
        "--tag",
        tag,
        *args,
        timeout=BUILD_TIMEOUT_S,
    )
    return time.monotonic() - started


def build_service_image(target: str) -> str:
    """The Dockerfile's `target` stage (cpu or gpu), tagged as docker-compose.yml names it."""
    ensure_base_images(dockerfile_base_images())
    tag = f"localhost/encoder-service:{target}"
    build(tag, "--target", target, str(ROOT))
    return tag


def build_prometheus_standin(image: str) -> str:
    """`image` (compose's Prometheus image) if podman has it, else a stand-in from Debian's package
    (rebuilt every time, which podman's layer cache makes instant when nothing changed)."""
    if not image_exists(qualified(image)) or is_standin(qualified(image)):
        base = stage_base_image("cpu")  # Debian, whether the real python image or the stand-in
        ensure_base_images([base])
        containerfile = PROMETHEUS_CONTAINERFILE
        build(
            qualified(image),
            "--build-arg",
            f"BASE={base}",
            "-f",
            str(containerfile),
            str(containerfile.parent),
        )
    return qualified(image)


def image_inspect(image: str) -> dict:
    return json.loads(podman("image", "inspect", image).stdout)[0]


def is_standin(image: str) -> bool:
    return STANDIN_LABEL in (image_inspect(image)["Config"].get("Labels") or {})


def image_size_mb(image: str) -> float:
    return image_inspect(image)["Size"] / 1e6


class Container:
    """A detached container; `running_container` is the usual way in."""

    def __init__(self, name: str) -> None:
        self.name = name

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def state(self) -> dict:
        return json.loads(podman("inspect", self.name).stdout)[0]["State"]

    def wait_ready(self, url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.state()["Running"]:
                raise AssertionError(f"container {self.name} exited:\n{self.logs()[-3000:]}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/ready", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.2)
        raise AssertionError(f"container {self.name} not ready after {timeout_s} s:\n{self.logs()[-3000:]}")

    def wait_exit(self, timeout_s: float) -> int:
        return int(podman("wait", self.name, timeout=timeout_s).stdout.strip())


@contextlib.contextmanager
def running_container(image: str, *run_args: str, name: str) -> Iterator[Container]:
    """`podman run -d` with the given options; the container is removed afterwards."""
    podman("rm", "--force", "--time=0", name, check=False)
    podman("run", "--detach", "--name", name, *run_args, image)
    try:
        yield Container(name)
    finally:
        podman("rm", "--force", "--time=0", name, check=False)
