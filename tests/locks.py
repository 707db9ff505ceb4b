"""Read the lock files in requirements/ (written by `make lock`: uv's requirements format with hashes)."""

import re
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements"


@dataclass(frozen=True)
class Pin:
    requirement: Requirement
    hashes: tuple[str, ...]

    @property
    def version(self) -> str:
        (specifier,) = self.requirement.specifier
        assert specifier.operator == "==", self.requirement
        return specifier.version

    def applies(self, python_version: str = "3.11") -> bool:
        marker = self.requirement.marker
        environment = default_environment() | {"python_version": python_version}
        return marker is None or marker.evaluate(environment)


def read_lock(name: str) -> dict[str, Pin]:
    text = (REQUIREMENTS / f"{name}.txt").read_text()
    pins: dict[str, Pin] = {}
    for entry in re.sub(r"\\\n", " ", text).splitlines():
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        requirement_text, *hash_parts = entry.split("--hash=")
        requirement = Requirement(requirement_text.strip())
        pins[canonicalize_name(requirement.name)] = Pin(requirement, tuple(h.strip() for h in hash_parts))
    return pins
