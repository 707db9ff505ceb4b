"""The lock files (requirements/*.txt, written by `make lock`): they cover every dependency that
pyproject.toml declares, agree with each other, pin with hashes, keep torch and CUDA out, and the venv
that `make` built holds exactly what requirements/dev.txt pins."""

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from locks import read_lock
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
# Which extras each lock file resolves (Makefile, target `lock`); torch is installed apart (TORCH_CPU).
LOCKS = {"dev": ("train", "cpu", "hf", "dev"), "cpu": ("cpu",), "gpu": ("gpu",)}
UNLOCKED = {"torch"}


def declared(extras: tuple[str, ...]) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = project["dependencies"] + [
        dep for extra in extras for dep in project["optional-dependencies"][extra]
    ]
    return [Requirement(name) for name in names]


@pytest.mark.parametrize("lock", LOCKS)
def test_lock_pins_every_declared_dependency_with_hashes(lock: str) -> None:
    pins = read_lock(lock)
    assert pins, f"requirements/{lock}.txt is empty"
    for requirement in declared(LOCKS[lock]):
        name = canonicalize_name(requirement.name)
        if name in UNLOCKED:
            continue
        assert name in pins, f"{name} is declared in pyproject.toml but not locked: run `make lock`"
        assert requirement.specifier.contains(pins[name].version), (
            f"{name}=={pins[name].version} no longer satisfies {requirement}: run `make lock`"
        )
    for name, pin in pins.items():
        assert pin.hashes and all(h.startswith("sha256:") for h in pin.hashes), name


@pytest.mark.parametrize("lock", LOCKS)
def test_lock_keeps_torch_and_cuda_libraries_out(lock: str) -> None:
    for name in read_lock(lock):
        assert name != "torch" and not name.startswith(("nvidia-", "triton")), f"{name} in {lock}.txt"


def test_image_locks_use_the_versions_the_tests_run_with() -> None:
    dev = read_lock("dev")
    for image in ("cpu", "gpu"):
        for name, pin in read_lock(image).items():
            if name in dev:
                assert pin.version == dev[name].version, (
                    f"{name}: {image}.txt {pin.version}, dev.txt {dev[name].version}"
                )
    # The gpu image gets onnxruntime-gpu instead of onnxruntime, never both.
    assert "onnxruntime" in read_lock("cpu") and "onnxruntime-gpu" not in read_lock("cpu")
    assert "onnxruntime-gpu" in read_lock("gpu") and "onnxruntime" not in read_lock("gpu")


def test_venv_holds_what_the_dev_lock_pins() -> None:
    """`make` installs the venv from requirements/dev.txt: a venv that drifted from it fails here."""
    mismatched = {}
    for name, pin in read_lock("dev").items():
        if not pin.applies():
            continue
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = "missing"
        if installed != pin.version:
            mismatched[name] = (installed, pin.version)
    assert not mismatched, (
        f"installed vs locked: {mismatched}; rebuild the venv with `make .venv/bin/encoder`"
    )
