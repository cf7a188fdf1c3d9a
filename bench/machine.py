"""What the results were measured on: CPUs, interpreter, RabbitMQ, and how busy the machine was."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

RABBITMQCTL_TIMEOUT_S = 5.0
CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Machine:
    """A description of the machine, for the results file."""

    cpus: int
    cpu_model: str
    python: str
    rabbitmq: str
    load_average: tuple[float, float, float]

    def lines(self) -> list[str]:
        """One line per fact, for stdout and the results file."""
        one, five, fifteen = self.load_average
        return [
            f"CPUs: {self.cpus} ({self.cpu_model})",
            f"Python: {self.python}",
            f"RabbitMQ: {self.rabbitmq}",
            f"load average at start (1/5/15 min): {one:.2f} / {five:.2f} / {fifteen:.2f}",
        ]


def _cpu_model() -> str:
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def rabbitmq_version() -> str:
    """`rabbitmqctl version` if it answers within a few seconds, else "unknown"."""
    rabbitmqctl = shutil.which("rabbitmqctl")
    if rabbitmqctl is None:
        return "unknown (no rabbitmqctl)"
    try:
        done = subprocess.run(
            [rabbitmqctl, "version"],
            capture_output=True,
            text=True,
            timeout=RABBITMQCTL_TIMEOUT_S,
            check=True,
        )
    except (subprocess.SubprocessError, OSError):
        return "unknown (rabbitmqctl version failed)"
    return done.stdout.strip() or "unknown"


def describe() -> Machine:
    """Describe this machine now."""
    return Machine(
        cpus=os.cpu_count() or 0,
        cpu_model=_cpu_model(),
        python=platform.python_version(),
        rabbitmq=rabbitmq_version(),
        load_average=os.getloadavg(),
    )
