"""BENCHMARKS.md is generated from the result files in benchmarks/ and is up to date."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent


def test_benchmarks_md_is_generated_from_the_result_files() -> None:
    proc = subprocess.run(
        [sys.executable, str(PROJECT / "tools" / "benchmarks_md.py"), "--check"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    text = (PROJECT / "BENCHMARKS.md").read_text()
    assert list((PROJECT / "benchmarks").glob("matrix-*.json")), "no result files"
    assert "Summary against the tuned peer" in text
