"""The weights ``refine()`` writes are those of the recorded fingerprints.

``tests/data/weights_fingerprint.json`` holds, per case of
``tools/weights_fingerprint.py`` (the demo with the default settings, short runs
of the jacobi, sequential, cross-validated output-layer and minibatch paths on
it, and the pinned shared-model cases of ``tests/test_models.py``), the
fingerprint of every initializer that refining changed. Recomputing them with
the current code must give the same weights (rtol 1e-5): a refactor of the
pipeline changes no result. Only on a machine like the one that recorded them
(``machine`` in the file): elsewhere the tests skip and say why. The demo
cases run in seconds; the shared-model cases are ``slow``.

Regenerate (only when a change of the results is intended):
``python tools/weights_fingerprint.py --out tests/data/weights_fingerprint.json``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT / "tools"))

import weights_fingerprint as fp  # noqa: E402

FILE: dict[str, Any] = json.loads(
    (PROJECT / "tests" / "data" / "weights_fingerprint.json").read_text()
)
RECORDED: dict[str, Any] = FILE["cases"]
DEMO = sorted(fp.demo_cases())
SHARED = sorted(name for name in RECORDED if name not in DEMO)


def other_machine() -> str:
    """Why this machine cannot give the recorded weights ("" if it can): what
    differs from the one that recorded them (SIMD features, NumPy and
    onnxruntime versions) and how to record them here."""
    here, there = fp.machine(), FILE["machine"]
    if here == there:
        return ""
    diff = {k: v for k, v in here.items() if there.get(k) != v}
    return (f"fingerprints were recorded on another machine (here {diff}); regenerate "
            "them here to compare: python tools/weights_fingerprint.py "
            "--out tests/data/weights_fingerprint.json")


@pytest.fixture(autouse=True)
def same_machine(request: pytest.FixtureRequest) -> None:
    """Compare only where the weights can be the same (:func:`other_machine`)."""
    if request.node.name.startswith(("test_compare", "test_another")):
        return
    why = other_machine()
    if why:
        pytest.skip(why)


@pytest.mark.parametrize("case", DEMO)
def test_demo_weights_unchanged(case: str) -> None:
    got = fp.demo_cases()[case]()
    assert got, "refining changed no weight"
    assert fp.compare(RECORDED[case], got) == []


@pytest.mark.slow
@pytest.mark.parametrize("case", SHARED)
def test_shared_model_weights_unchanged(case: str, shared_models: Path,
                                        mnist: Any, cifar: Any) -> None:
    cases = fp.shared_cases()
    if case not in cases:
        pytest.skip(f"{case} is not in the shared corpus")
    got = cases[case]()
    assert got, "refining changed no weight"
    assert fp.compare(RECORDED[case], got) == []


def test_compare_notices_a_change() -> None:
    """The comparison is not vacuous: a changed weight, shape or name shows."""
    import numpy as np  # noqa: PLC0415

    w = np.linspace(-1.0, 1.0, 60).reshape(6, 10)
    base = {"w": fp.fingerprint(w)}
    assert fp.compare(base, {"w": fp.fingerprint(w.copy())}) == []
    nudged = w.copy()
    nudged[2, 3] += 1e-3
    assert fp.compare(base, {"w": fp.fingerprint(nudged)})
    assert fp.compare(base, {"w": fp.fingerprint(w.reshape(10, 6))})
    assert fp.compare(base, {"v": fp.fingerprint(w)})


def test_another_machine_skips_and_says_how_to_regenerate(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fingerprints recorded elsewhere are not compared: the reason names what
    differs and the command that records them here."""
    monkeypatch.setattr(fp, "machine", lambda: dict(FILE["machine"]))
    assert other_machine() == ""  # the recording machine: compared
    monkeypatch.setattr(fp, "machine", lambda: {**FILE["machine"], "numpy": "0.0-other"})
    assert re.search(r"numpy.*0\.0-other.*weights_fingerprint\.py", other_machine())
