"""The benchmark's cluster: scripts/rabbitmq-cluster.sh on ports of its own, up for one run.

BENCH_CLUSTER=0 skips it; without rabbitmq-server the cluster rows are skipped with the reason.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "rabbitmq-cluster.sh"
DEFAULT_PORT_BASE = 5780  # AMQP 5781-5783, TLS 5791-5793: clear of the tests' 5740s
UP_TIMEOUT_S = 300
NOT_INSTALLED = 3
NODES = (1, 2, 3)


@dataclass(frozen=True)
class BenchCluster:
    """A three-node cluster the benchmark started; `down()` removes it."""

    base: int
    folder: Path

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_CLUSTER_PORT_BASE": str(self.base),
            "RABBITMQ_CLUSTER_DIR": str(self.folder),
            "RABBITMQ_CLUSTER_MANAGEMENT": "0",
        }

    def url(self, n: int) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.base + n}/"

    @property
    def urls(self) -> str:
        """BRIDGE_AMQP_URL for every node."""
        return ",".join(self.url(n) for n in NODES)

    @property
    def tls_urls(self) -> str:
        """BRIDGE_AMQP_URL over TLS (the script's certificate names localhost)."""
        return ",".join(f"amqps://guest:guest@localhost:{self.base + 10 + n}/" for n in NODES)

    @property
    def ca_file(self) -> Path:
        return self.folder / "tls" / "ca.pem"

    def down(self) -> None:
        subprocess.run(
            [str(SCRIPT), "down"], env=self.env, check=False, timeout=UP_TIMEOUT_S, text=True
        )


def start(env: Mapping[str, str] = os.environ) -> tuple[BenchCluster | None, str]:
    """Bring the cluster up; (None, why) when it is turned off or cannot run here."""
    if env.get("BENCH_CLUSTER", "1") == "0":
        return None, "BENCH_CLUSTER=0"
    base = int(env.get("BENCH_CLUSTER_PORT_BASE", str(DEFAULT_PORT_BASE)))
    cluster = BenchCluster(base, Path(f"/tmp/voucher-bridge-rabbitmq-bench-{base}"))
    done = subprocess.run(
        [str(SCRIPT), "up"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=UP_TIMEOUT_S,
        check=False,
    )
    if done.returncode == NOT_INSTALLED:
        return None, done.stderr.strip()
    if done.returncode != 0:
        cluster.down()
        return None, f"rabbitmq-cluster.sh up failed: {done.stderr.strip()[-500:]}"
    return cluster, done.stdout.strip()
