"""Packages a benchmark needs beyond the project's own: checked, and installed into this venv."""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Requirement:
    """A distribution a benchmark's subprocesses import, with the oldest version that will do."""

    distribution: str
    minimum: tuple[int, ...]
    pip_spec: str

    def satisfied(self) -> bool:
        """Whether an installed version at least `minimum` is there."""
        try:
            installed = importlib.metadata.version(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            return False
        return version_tuple(installed) >= self.minimum


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numeric release parts of a version string: "0.7.8rc1" -> (0, 7, 8)."""
    parts = []
    for piece in version.split("."):
        digits = re.match(r"\d+", piece)
        if digits is None:
            break
        parts.append(int(digits[0]))
        if digits[0] != piece:
            break
    return tuple(parts)


def ensure(requirements: Iterable[Requirement]) -> None:
    """Install every unsatisfied requirement with this interpreter's pip; raise if pip fails."""
    missing = [r for r in requirements if not r.satisfied()]
    if not missing:
        return
    specs = [r.pip_spec for r in missing]
    print(
        f"bench: installing {' '.join(specs)} into {sys.prefix} "
        "(needed by the benchmark's reference servers; also available as the `bench` extra)",
        file=sys.stderr,
        flush=True,
    )
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *specs], check=True)
    importlib.invalidate_caches()
    still_missing = [r.pip_spec for r in missing if not r.satisfied()]
    if still_missing:
        raise RuntimeError(f"pip ran, but these are still missing: {' '.join(still_missing)}")
