"""Write requirements.lock: every dependency of voucher-bridge pinned, with hashes, in one file.

The file has two sections. The first holds what the image ships (pyproject's `dependencies`,
resolved); the second, after the line `# --- test extra ---`, what `make install` adds for the
tests and linters (the `test` extra), resolved with the first section's pins as constraints so
both environments run the same versions of what they share. The image installs the first
section, `make install` both, each with `--no-deps --require-hashes`, and then the project
itself with `--no-deps`: nothing outside this file gets installed.

Run by `make lock` with uv (`uv pip compile`), for Python 3.11 on every platform.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
TEST_SECTION = "# --- test extra ---"
PYTHON_VERSION = "3.11"
_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==")

HEADER = f"""\
# Every dependency of voucher-bridge, pinned with hashes. Made by `make lock` (scripts/lock.py)
# from pyproject.toml; edit pyproject.toml, then regenerate, never by hand.
# The image installs the lines above "{TEST_SECTION}"; `make install` installs all of them.
"""


def compile_requirements(uv: str, *extra_args: str) -> str:
    """`uv pip compile pyproject.toml` with hashes, for Python 3.11 on every platform."""
    command = [
        uv,
        "pip",
        "compile",
        str(ROOT / "pyproject.toml"),
        "--universal",
        "--python-version",
        PYTHON_VERSION,
        "--generate-hashes",
        "--no-header",
        "--no-annotate",
        "--quiet",
        *extra_args,
    ]
    return subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout


def blocks(text: str) -> dict[str, str]:
    """Each requirement (its line and its hash lines) by normalised distribution name."""
    found: dict[str, str] = {}
    current: list[str] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" ") and current:
            _add(found, current)
            current = []
        current.append(line)
    if current:
        _add(found, current)
    return found


def _add(found: dict[str, str], lines: list[str]) -> None:
    match = _NAME.match(lines[0])
    if match is None:
        raise SystemExit(f"lock: cannot read the requirement {lines[0]!r}")
    found[re.sub(r"[-_.]+", "-", match[1]).lower()] = "\n".join(lines)


def main(argv: list[str]) -> int:
    """Write requirements.lock; argv[1] is the uv executable."""
    uv = argv[1] if len(argv) > 1 else "uv"
    runtime = blocks(compile_requirements(uv))
    with tempfile.NamedTemporaryFile("w", suffix=".txt") as constraints:
        constraints.write("\n".join(runtime.values()) + "\n")
        constraints.flush()
        everything = blocks(compile_requirements(uv, "--extra", "test", "-c", constraints.name))
    missing = set(runtime) - set(everything)
    if missing:
        raise SystemExit(f"lock: the test resolution dropped {sorted(missing)}")
    test_only = {name: block for name, block in everything.items() if name not in runtime}
    parts = [HEADER, *runtime.values(), TEST_SECTION, *test_only.values()]
    LOCK.write_text("\n".join(parts) + "\n")
    print(f"{LOCK.name}: {len(runtime)} runtime + {len(test_only)} test packages")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
