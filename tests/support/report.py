"""Tables that tests fill in and the test run prints at its end (hostile input, chaos ledger)."""

from __future__ import annotations

from collections.abc import Sequence

TABLES: dict[str, tuple[Sequence[str], list[Sequence[object]]]] = {}


def add_row(table: str, columns: Sequence[str], row: Sequence[object]) -> None:
    TABLES.setdefault(table, (columns, []))[1].append(row)


def render(title: str, columns: Sequence[str], rows: list[Sequence[object]]) -> str:
    cells = [[str(c) for c in columns], *[[str(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [f"{title}", "  ".join(c.ljust(w) for c, w in zip(cells[0], widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(lines)
