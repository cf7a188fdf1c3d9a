"""The local three-node RabbitMQ cluster of scripts/rabbitmq-cluster.sh, as the tests drive it.

One cluster serves the whole test session (starting it takes ~20 s): its nodes listen on ports
of their own (BRIDGE_TEST_CLUSTER_PORT_BASE, default 5740: AMQP 5741-5743, TLS 5751-5753), with
TLS certificates that `trustme` makes for "localhost". Tests that stop a node start it again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import trustme

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "rabbitmq-cluster.sh"
PORT_BASE = int(os.environ.get("BRIDGE_TEST_CLUSTER_PORT_BASE", "5740"))
NODES = (1, 2, 3)
# The host name the servers' certificate names; 127.0.0.1 is deliberately not in it.
TLS_HOST = "localhost"
# up takes ~20 s here, a node start ~5 s; these bounds leave room for a loaded machine.
UP_TIMEOUT_S = 240
NODE_TIMEOUT_S = 120
NOT_INSTALLED = 3  # the script's exit status when rabbitmq-server is missing


class ClusterUnavailable(Exception):
    """The cluster cannot run on this machine (the message says why)."""


@dataclass
class Cluster:
    """A running three-node cluster and the CA its TLS listeners chain to."""

    base: int
    folder: Path  # the script's RABBITMQ_CLUSTER_DIR
    tls_dir: Path  # ca.pem (trusted CA), server.pem, server.key, and client.pem
    ca: trustme.CA

    def _env(self) -> dict[str, str]:
        return {
            **os.environ,
            "RABBITMQ_CLUSTER_PORT_BASE": str(self.base),
            "RABBITMQ_CLUSTER_DIR": str(self.folder),
            "RABBITMQ_CLUSTER_TLS_DIR": str(self.tls_dir),
            "RABBITMQ_CLUSTER_MANAGEMENT": "0",
        }

    def script(self, *args: str, timeout_s: float = NODE_TIMEOUT_S) -> str:
        """Run scripts/rabbitmq-cluster.sh with this cluster's settings; its output."""
        done = subprocess.run(
            [str(SCRIPT), *args],
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode == NOT_INSTALLED:
            raise ClusterUnavailable(done.stderr.strip())
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmq-cluster.sh {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def up(self) -> None:
        self.script("up", timeout_s=UP_TIMEOUT_S)

    def down(self) -> None:
        self.script("down", timeout_s=UP_TIMEOUT_S)

    def stop_node(self, n: int) -> None:
        self.script("stop-node", str(n))

    def start_node(self, n: int) -> None:
        self.script("start-node", str(n))

    def running(self) -> list[str]:
        """The `status` lines of the nodes that run."""
        return [line for line in self.script("status").splitlines() if line.endswith("running")]

    def start_all(self) -> None:
        """Every node up again (after a test stopped some)."""
        for n in NODES:
            self.start_node(n)

    def node_name(self, n: int) -> str:
        return f"vb-{self.base}-{n}@localhost"

    def amqp_port(self, n: int) -> int:
        return self.base + n

    def tls_port(self, n: int) -> int:
        return self.base + 10 + n

    def url(self, n: int) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port(n)}/"

    def tls_url(self, n: int, host: str = TLS_HOST) -> str:
        return f"amqps://guest:guest@{host}:{self.tls_port(n)}/"

    def urls(self, *order: int) -> str:
        """BRIDGE_AMQP_URL for the nodes in this order (default 1, 2, 3)."""
        return ",".join(self.url(n) for n in order or NODES)

    def ctl(self, n: int, *args: str) -> str:
        """rabbitmqctl against node n, as the cluster's nodes run it."""
        done = subprocess.run(
            [
                "runuser",
                "-u",
                "rabbitmq",
                "--",
                "env",
                f"HOME={self.folder}/home",
                f"RABBITMQ_CONF_ENV_FILE={self.folder}/rabbitmq-env.conf",
                "/usr/lib/rabbitmq/bin/rabbitmqctl",
                "-n",
                self.node_name(n),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=NODE_TIMEOUT_S,
            check=True,
        )
        return done.stdout

    def queues(self, n: int, namespace: str) -> dict[str, dict[str, object]]:
        """The namespace's quorum queues as node n sees them: leader and members of each."""
        out = self.ctl(n, "list_queues", "name", "leader", "members", "--formatter", "json", "-q")
        rows = json.loads(out)
        return {str(r["name"]): r for r in rows if str(r["name"]).startswith(f"{namespace}.")}

    def node_of(self, name: object) -> int:
        """Which node number an Erlang node name is."""
        for n in NODES:
            if name == self.node_name(n):
                return n
        raise AssertionError(f"{name!r} is not a node of this cluster")


@contextlib.contextmanager
def running_cluster(tls_dir: Path) -> Iterator[Cluster]:
    """Certificates by trustme, `up`, and `down` at the end; ClusterUnavailable if it cannot run.

    The nodes run as the rabbitmq user, so their folder is outside pytest's private tmp_path;
    a lock keeps two test runs from sharing (and tearing down) one cluster.
    """
    if not SCRIPT.exists():
        raise ClusterUnavailable(f"{SCRIPT} is missing")
    if os.geteuid() != 0:
        raise ClusterUnavailable("the cluster's nodes run as the rabbitmq user: needs root")
    folder = Path(f"/tmp/voucher-bridge-rabbitmq-test-{PORT_BASE}")
    with open(f"{folder}.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ClusterUnavailable(
                f"another test run holds the cluster on port base {PORT_BASE}; "
                "set BRIDGE_TEST_CLUSTER_PORT_BASE to run beside it"
            ) from None
        cluster = _make(folder, tls_dir)
        try:
            yield cluster
        finally:
            cluster.down()


def _make(folder: Path, tls_dir: Path) -> Cluster:
    tls_dir.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tls_dir / "ca.pem"))
    server = ca.issue_cert(TLS_HOST)
    server.private_key_pem.write_to_path(str(tls_dir / "server.key"))
    server.cert_chain_pems[0].write_to_path(str(tls_dir / "server.pem"))
    client = ca.issue_cert("voucher-bridge-client")
    client.private_key_and_cert_chain_pem.write_to_path(str(tls_dir / "client.pem"))
    for path in tls_dir.iterdir():
        path.chmod(0o644)
    cluster = Cluster(PORT_BASE, folder, tls_dir, ca)
    cluster.down()  # what a crashed earlier run may have left
    cluster.up()
    return cluster
