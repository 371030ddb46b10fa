"""What the benchmarks that measure each variant in a fresh subprocess share: run one, read its result line."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

RESULT_PREFIX = "RESULT "  # a worker prints one line starting with this, then its results as JSON


def report(result: dict[str, Any]) -> None:
    """In a worker: hand ``result`` to the parent."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_worker(script: str, argv: list[str], what: str) -> dict[str, Any]:
    """Run ``script`` with ``argv`` in a fresh interpreter (its own allocator and peak RSS) and return what it
    reported; a failing worker stops the benchmark with its output shown."""
    completed = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True)
    if completed.returncode != 0:
        sys.stderr.write(completed.stdout + completed.stderr)
        raise SystemExit(f"the {what} worker failed (exit status {completed.returncode})")
    lines = [line for line in completed.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def mebibytes(count: float) -> str:
    return f"{count / 2**20:,.0f}"
