"""CPU time of a process from /proc/PID/stat, and finding the broker's (`beam.smp`) processes."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
US_PER_S = 1_000_000
BROKER_COMM = "beam.smp"
PROC = Path("/proc")

# 1-based field numbers in proc(5): utime, stime, cutime, cstime.
_FIRST_CPU_FIELD = 14
_LAST_CPU_FIELD = 17
# Fields after "(comm)" start at field 3 (state); comm may hold spaces and parentheses.
_FIRST_FIELD_AFTER_COMM = 3


def parse_cpu_ticks(stat_line: str, *, with_children: bool = True) -> int:
    """utime + stime (+ cutime + cstime), in clock ticks, from one /proc stat line.

    Leave the children out for /proc/PID/task/TID/stat: there they are the whole process's.
    """
    _, close, rest = stat_line.rpartition(")")
    if not close:
        raise ValueError(f"not a /proc/PID/stat line: {stat_line!r}")
    fields = rest.split()
    first = _FIRST_CPU_FIELD - _FIRST_FIELD_AFTER_COMM
    last = (_LAST_CPU_FIELD if with_children else _FIRST_CPU_FIELD + 1) - _FIRST_FIELD_AFTER_COMM
    if len(fields) <= last:
        raise ValueError(f"/proc/PID/stat line too short: {stat_line!r}")
    return sum(int(field) for field in fields[first : last + 1])


def cpu_ticks(pid: int) -> int:
    """CPU time the process and its waited-for children have used, in clock ticks."""
    return parse_cpu_ticks((PROC / str(pid) / "stat").read_text())


def pids_named(comm: str, proc: Path = PROC) -> list[int]:
    """Every process whose /proc/PID/comm is exactly `comm`."""
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() == comm:
                pids.append(int(entry.name))
        except OSError:  # the process ended while we looked
            continue
    return sorted(pids)


def total_cpu_ticks(pids: list[int]) -> int:
    """Summed CPU ticks of `pids`; a process that has gone counts as zero."""
    total = 0
    for pid in pids:
        try:
            total += cpu_ticks(pid)
        except OSError:
            continue
    return total


def ticks_to_us(ticks: int) -> float:
    """Clock ticks to microseconds."""
    return ticks * US_PER_S / CLOCK_TICKS_PER_S


# /proc/net/tcp: "sl local_address rem_address st ... inode"; LISTEN is state 0A. Addresses are
# hex, IPv4 in host (little-endian) byte order: 127.0.0.1 is 0100007F.
_LISTEN_STATE = "0A"
_LOCAL_FIELD, _STATE_FIELD, _INODE_FIELD = 1, 3, 9
_ANY_OR_LOOPBACK = frozenset({"00000000", "0100007F", "0" * 32})


def listening_inodes(proc_net_tcp: str, port: int) -> set[int]:
    """Socket inodes listening on `port` on 127.0.0.1 or every address, from /proc/net/tcp(6).

    Other loopback addresses (127.0.0.2:5672, say) are other brokers, not the one we use.
    """
    inodes = set()
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) <= _INODE_FIELD or fields[_STATE_FIELD] != _LISTEN_STATE:
            continue
        address, _, port_hex = fields[_LOCAL_FIELD].partition(":")
        if address in _ANY_OR_LOOPBACK and int(port_hex, 16) == port:
            inodes.add(int(fields[_INODE_FIELD]))
    return inodes


def broker_pids(port: int, proc: Path = PROC) -> list[int]:
    """The `beam.smp` serving 127.0.0.1:`port`; every `beam.smp` if that cannot be told.

    A machine may run several RabbitMQ nodes (tests start their own on other ports or
    addresses); only the one the benchmark talks to is its broker.
    """
    inodes: set[int] = set()
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            inodes |= listening_inodes((proc / "net" / table).read_text(), port)
    sockets = {f"socket:[{inode}]" for inode in inodes}
    found = []
    for pid in pids_named(BROKER_COMM, proc):
        with contextlib.suppress(OSError):
            if any(os.readlink(fd) in sockets for fd in (proc / str(pid) / "fd").iterdir()):
                found.append(pid)
    return found or pids_named(BROKER_COMM, proc)
