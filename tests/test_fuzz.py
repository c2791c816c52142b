"""Fuzzing the command line with damaged models (issue 17): seeded byte mutations of
the demo model, each refined in-process on 60 labelled samples.

Every case must end with exit 0 (a model written: every weight finite) or 2 (one
``onnxfbp: error:`` line on stderr), never a traceback, an internal error or a
hang, and leave nothing behind but the output. Mutations are drawn with a fixed
seed: three in four hit the protobuf structure (names, shapes, attributes, opsets:
outside the raw weight bytes), one in four the weights themselves (bit flips that
make NaN, Inf or merely different values).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxfbp.cli import commands as cli

PROJECT = Path(__file__).resolve().parent.parent
DEMO = PROJECT / "models" / "demo_mnist_cnn.onnx"
ADAPT = PROJECT / "models" / "demo_adapt.npz"
CASES = 200
SEED = 17


def _weight_ranges(raw: bytes) -> list[tuple[int, int]]:
    model = onnx.load_model_from_string(raw)
    ranges = []
    for tensor in model.graph.initializer:
        start = raw.find(tensor.raw_data) if tensor.raw_data else -1
        if start >= 0:
            ranges.append((start, start + len(tensor.raw_data)))
    return ranges


def _mutants(raw: bytes, rng: np.random.Generator, n: int) -> list[bytes]:
    ranges = _weight_ranges(raw)
    in_weights = np.zeros(len(raw), bool)
    for a, b in ranges:
        in_weights[a:b] = True
    structure = np.flatnonzero(~in_weights)
    weights = np.flatnonzero(in_weights)
    out = []
    for k in range(n):
        data = bytearray(raw)
        pool = weights if k % 4 == 3 else structure
        for _ in range(int(rng.integers(1, 5))):
            at = int(rng.choice(pool))
            if k % 4 == 3:
                data[at] ^= 1 << int(rng.integers(0, 8))  # a bit flip in a weight
            else:
                data[at] = int(rng.integers(0, 256))  # any byte in the structure
        if k % 16 == 5:  # now and then a truncated file
            data = data[: int(rng.integers(1, len(data)))]
        out.append(bytes(data))
    return out


def _finite_weights(path: Path) -> bool:
    model = onnx.load(str(path))
    for tensor in model.graph.initializer:
        value = numpy_helper.to_array(tensor)
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return False
    return True


def test_fuzzed_models_exit_0_or_2_with_one_line_and_leave_nothing(tmp_path: Path) -> None:
    with np.load(ADAPT) as z:
        np.savez(tmp_path / "adapt.npz", input=z["input"][:60], y=z["y"][:60])
    rng = np.random.default_rng(SEED)
    counts = {0: 0, 2: 0}
    for k, mutant in enumerate(_mutants(DEMO.read_bytes(), rng, CASES)):
        case = tmp_path / f"case{k}"
        case.mkdir()
        model, out = case / "model.onnx", case / "out.onnx"
        model.write_bytes(mutant)
        err, stdout = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
            code = cli.main(["refine", str(model), str(out), "--data", str(tmp_path / "adapt.npz"),
                             "--quiet", "--allow-worse", "--max-layers", "1"])
        lines = err.getvalue().strip().splitlines()
        where = f"case {k}: exit {code}, stderr {err.getvalue()!r}"
        assert code in (0, 2), where
        assert "Traceback" not in err.getvalue(), where
        assert model.read_bytes() == mutant, where  # the input is only read
        left = sorted(p.name for p in case.iterdir())
        if code == 0:
            assert all(line.startswith("onnxfbp: warning: ") for line in lines), where
            assert left == ["model.onnx", "out.onnx"], where
            assert _finite_weights(out), where
        else:
            assert len(lines) == 1 and lines[0].startswith("onnxfbp: error: "), where
            assert left == ["model.onnx"], where
        counts[code] += 1
        for path in case.iterdir():
            path.unlink()
        os.rmdir(case)
    # both outcomes are exercised: the fuzzing reaches past the loader
    assert counts[0] >= 10 and counts[2] >= 10, counts


def _no_constant(name: str) -> None:
    pytest.fail(f"bare {name} in JSON output")


@pytest.mark.parametrize("seed", [1, 2])
def test_fuzzed_models_never_crash_eval_or_inspect(tmp_path: Path, seed: int) -> None:
    """A smaller sample through ``eval --json`` and ``inspect --json``: exit 0 or 2, and
    the JSON printed on success parses (no bare NaN)."""
    import json

    with np.load(ADAPT) as z:
        np.savez(tmp_path / "adapt.npz", input=z["input"][:60], y=z["y"][:60])
    rng = np.random.default_rng(seed)
    for k, mutant in enumerate(_mutants(DEMO.read_bytes(), rng, 20)):
        model = tmp_path / f"m{k}.onnx"
        model.write_bytes(mutant)
        for argv in (["eval", str(model), "--data", str(tmp_path / "adapt.npz"), "--json"],
                     ["inspect", str(model), "--json"]):
            err, stdout = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(stdout):
                code = cli.main([*argv, "--quiet"])
            where = f"{argv[0]} case {k}: exit {code}, stderr {err.getvalue()!r}"
            assert code in (0, 2), where
            if code == 0:
                json.loads(stdout.getvalue(), parse_constant=_no_constant)
            else:
                assert len(err.getvalue().strip().splitlines()) == 1, where
