"""`python -m bench [NAME ...]`: run the named benchmarks, or every registered one in order.

To add a benchmark, write a module with a `main() -> int` and append a `Benchmark` to
`BENCHMARKS`; `python -m bench NAME` then runs it alone, and plain `python -m bench` runs it
after the ones before it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench import deps, ingress, pipeline, till


@dataclass(frozen=True)
class Benchmark:
    """A named benchmark: its entry point (exit status) and what its subprocesses import."""

    name: str
    description: str
    main: Callable[[], int]
    requirements: tuple[deps.Requirement, ...] = ()


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark(
        name="ingress",
        description="the ingress against three reference servers under wrk",
        main=ingress.main,
        requirements=ingress.REQUIREMENTS,
    ),
    Benchmark(
        name="pipeline",
        description="vouchers end to end, voucher-bridge and the FastStream peer in turns",
        main=pipeline.main,
        requirements=pipeline.REQUIREMENTS,
    ),
    Benchmark(
        name="till",
        description="cards sold at the till, each followed to an activated card, ledger on",
        main=till.main,
    ),
)


def _known() -> str:
    return ", ".join(b.name for b in BENCHMARKS)


def _parser() -> argparse.ArgumentParser:
    listing = "\n".join(f"  {b.name:<12} {b.description}" for b in BENCHMARKS)
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=f"Run benchmarks (all of them, in this order, when none is named):\n{listing}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="benchmarks to run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the selected benchmarks in registration order; the worst exit status wins."""
    parser = _parser()
    names: list[str] = parser.parse_args(argv).names
    unknown = sorted(set(names) - {b.name for b in BENCHMARKS})
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; known: {_known()}")
    selected = [b for b in BENCHMARKS if not names or b.name in names]
    deps.ensure(r for b in selected for r in b.requirements)
    status = 0
    for benchmark in selected:
        print(f"== bench {benchmark.name}: {benchmark.description}", flush=True)
        status = max(status, benchmark.main())
    return status


if __name__ == "__main__":
    sys.exit(main())
