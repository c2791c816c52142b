"""Reports, progress and inspect: the JSON report of a real demo run against its
schema, the HTML renderer, the headless-browser check (skipped without
Chromium), the progress display, and ``inspect --json`` on real models."""

from __future__ import annotations

import base64
import copy
import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rich.console import Console

from onnxfbp.cli.commands import _progress, main
from onnxfbp.cli.progress import ProgressDisplay, render
from onnxfbp.events import LayerVisited, Message, StepBackedOff, StepChecked
from onnxfbp.output.html import build_html, render_html
from onnxfbp.output.report import (
    EVAL_SCHEMA,
    LAYER_SCHEMA,
    SCHEMA,
    ReportError,
    load_report,
    validate_report,
)
from onnxfbp.output.results import LayerReport

PROJECT = Path(__file__).resolve().parent.parent
MODELS = PROJECT / "models"
DEMO_MODEL = MODELS / "demo_mnist_cnn.onnx"
CONV, GEMM1, GEMM3 = ("/features/features.3/Conv", "/classifier/classifier.1/Gemm",
                      "/classifier/classifier.3/Gemm")


def _tool() -> Any:
    spec = importlib.util.spec_from_file_location(
        "check_report_browser", PROJECT / "tools" / "check_report_browser.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    return subprocess.run([sys.executable, "-m", "onnxfbp.cli", *args], capture_output=True,
                          text=True, timeout=300, env=env, cwd=PROJECT, check=False)


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """The report of a real ``onnxfbp demo --report`` run."""
    tmp = tmp_path_factory.mktemp("demo")
    path = tmp / "demo_report.json"
    proc = run_cli("demo", "--output", str(tmp / "demo_refined.onnx"), "--report", str(path),
                   "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --quiet: no progress lines
    return path, json.loads(path.read_text())


def with_feature_maps(report: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """``report`` with feature maps in the agreed format (conv and dense)."""
    out = copy.deepcopy(report)
    actual = rng.standard_normal((2, 3, 14, 14))
    dense = rng.standard_normal((2, 10))
    out["feature_maps"] = {
        CONV: {"op": "Conv", "samples": [5, 9], "channels": [0, 4, 7], "labels": [3, 8],
               "actual": actual.tolist(), "target": (actual + 0.1).tolist()},
        GEMM3: {"op": "Gemm", "samples": [5, 9], "actual": dense.tolist(),
                "target": (dense * 1.5).tolist()},
    }
    return out


# ---------------------------------------------------------------------------- JSON report

def test_demo_report_has_every_documented_field(demo_report: tuple[Path, dict[str, Any]]) -> None:
    path, report = demo_report
    validate_report(report)
    assert load_report(path) == report
    assert report["schema"].startswith("onnxfbp.report/1")
    assert report["written"].endswith("demo_refined.onnx")

    visits = report["layers"]
    planned = {p["name"]: p for p in report["plan"]["layers"]}
    assert {v["name"] for v in visits} == {"/features/features.0/Conv", CONV, GEMM1, GEMM3}
    assert {v["name"] for v in visits if v["accepted"]}, "the demo refines something"
    for v in visits:
        assert planned[v["name"]]["refined"] is True
        assert v["op"] == planned[v["name"]]["op"]
        assert len(v["weight_shape"]) == (4 if v["op"] == "Conv" else 2)
        assert all(d > 0 for d in v["weight_shape"])
        assert v["seconds"] > 0 and v["relative_change"] >= 0
        if v["accepted"]:
            assert v["lam"] > 0 and v["relative_change"] > 0
        if v["residual_before"] is not None:  # full-pass solves (the output-layer polish)
            assert v["residual_before"] > 0 and v["residual_after"] > 0
    assert next(v for v in visits if v["name"] == GEMM3)["weight_shape"] == [10, 64]

    hb, ha = report["heldout"]["before"], report["heldout"]["after"]
    eb, ea = report["eval"]["before"], report["eval"]["after"]
    assert ha["accuracy"] > hb["accuracy"] and ea["accuracy"] > eb["accuracy"]
    assert eb["n"] == ea["n"] == 1000 and hb["n"] == ha["n"] > 0
    for res in (hb, ha, eb, ea):
        assert len(res["per_class"]) == 10 and len(res["confusion"]) == 10
        assert sum(map(sum, res["confusion"])) == res["n"]

    for phase in ("plan", "evaluate_before", "forward_and_targets", "solve", "evaluate_after",
                  "total", "write"):
        assert report["timings"][phase] >= 0, phase
    env = report["environment"]
    for key in ("onnxfbp", "onnx", "onnxruntime", "numpy", "python"):
        assert re.match(r"\d+\.\d+", env[key]), (key, env[key])
    assert env["device"] in ("cpu", "cuda")
    assert env["providers"] and all(p.endswith("ExecutionProvider") for p in env["providers"])


MUTATIONS = [
    (lambda r: r["layers"][0].pop("lam"), r"layers\[0\]\.lam: missing"),
    (lambda r: r["layers"][0].update(lam="0.1"), r"layers\[0\]\.lam: expected number or null"),
    (lambda r: r["layers"][1].update(accepted=1), r"layers\[1\]\.accepted: expected boolean"),
    (lambda r: r["layers"][0].update(weight_shape=[10, 6.4]), r"weight_shape\[1\]: expected int"),
    (lambda r: r["heldout"]["before"].update(accuracy=1.5),
     r"heldout\.before\.accuracy: .*maximum"),
    (lambda r: r["eval"].pop("after"), r"eval\.after: missing"),
    (lambda r: r.pop("timings"), r"^timings: missing"),
    (lambda r: r["timings"].update(solve="fast"), r"timings\.solve: expected number"),
    (lambda r: r["environment"].update(providers="CPU"), r"environment\.providers: expected array"),
    (lambda r: r["environment"].pop("device"), r"environment\.device: missing"),
    (lambda r: r.update(schema="someone.else/2"), r"schema: 'someone.else/2' is not"),
    (lambda r: r["eval"]["after"]["confusion"][0].append(1),
     r"eval\.after\.confusion: not a square"),
    (lambda r: r["heldout"]["after"].update(n=5), r"heldout\.after\.confusion: counts sum to"),
    (lambda r: r["feature_maps"].update(x={"op": "Conv", "actual": [[1, 2]], "target": [[1]]}),
     r"feature_maps\['x'\]"),
    (lambda r: r["feature_maps"].update(x={"op": "Conv", "actual": [[1.0]]}),
     r"feature_maps\.x\.target: missing"),
]


@pytest.mark.parametrize(("mutate", "message"), MUTATIONS, ids=[m for _, m in MUTATIONS])
def test_validate_report_names_the_bad_field(demo_report: tuple[Path, dict[str, Any]],
                                             mutate: Any, message: str) -> None:
    report = copy.deepcopy(demo_report[1])
    report.setdefault("feature_maps", {})
    mutate(report)
    with pytest.raises(ReportError, match=message):
        validate_report(report)


def test_report_without_optional_parts_is_valid(demo_report: tuple[Path, dict[str, Any]]) -> None:
    report = copy.deepcopy(demo_report[1])
    report.pop("feature_maps", None)
    report["eval"] = None
    report["extra_field_from_a_newer_writer"] = {"anything": [1, 2]}
    validate_report(report)
    page = build_html(report)
    assert "no feature maps" in page
    assert page.count("<img ") == 5  # accuracy, per-class, confusion (held-out), layers, time
    assert "eval (n=" not in page


def test_every_schema_field_is_documented() -> None:
    section = (PROJECT / "docs" / "reports.md").read_text()
    fields = set(SCHEMA["properties"]) | set(LAYER_SCHEMA["properties"]) \
        | set(EVAL_SCHEMA["properties"]) | set(SCHEMA["properties"]["environment"]["properties"])
    missing = sorted(f for f in fields if f"`{f}`" not in section)
    assert not missing, f"docs/reports.md does not mention {missing}"


# ---------------------------------------------------------------------------- HTML

@pytest.fixture(scope="module")
def rendered(demo_report: tuple[Path, dict[str, Any]],
             tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    """The demo report (with feature maps in the agreed format if refine gave none, and
    names that need escaping), rendered once by ``render_html``."""
    report = copy.deepcopy(demo_report[1])
    if not report.get("feature_maps"):
        report = with_feature_maps(report, np.random.default_rng(0))
    report["layers"][0]["name"] = "<script>alert(1)</script>"
    report["plan"]["layers"].append({"name": "<b>x</b>", "op": "Gemm", "refined": False,
                                     "reason": "a & b"})
    tmp = tmp_path_factory.mktemp("html")
    (tmp / "r.json").write_text(json.dumps(report))
    return report, render_html(tmp / "r.json", tmp / "r.html")


def test_html_is_self_contained_and_every_image_is_a_png(
        rendered: tuple[dict[str, Any], Path]) -> None:
    report, out = rendered
    page = out.read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "a &amp; b" in page
    for heading in ("Accuracy", "Confusion matrices", "Layers", "Feature maps", "Time",
                    "Environment"):
        assert f"<h2>{heading}</h2>" in page
    static = _tool().static_check(page)
    assert static["problems"] == []
    n_maps = min(len(report["feature_maps"]), 6)
    assert page.count('alt="feature maps of ') == n_maps
    # accuracy, per-class, confusion, layers, time, and one figure per feature-map layer
    assert static["images"] == 5 + n_maps == len(static["png_sizes"])
    assert all(w >= 200 and h >= 100 for w, h in static["png_sizes"])
    for src_attr in re.findall(r'<img [^>]*src="([^"]+)"', page):
        data = base64.b64decode(src_attr.split(",", 1)[1])
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert "http://" not in page and "https://" not in page


def test_feature_map_figures_for_the_agreed_format() -> None:
    from onnxfbp.output.figures import fig_feature_map  # noqa: PLC0415

    fms = with_feature_maps(
        {"feature_maps": {}}, np.random.default_rng(2))["feature_maps"]
    conv = fig_feature_map(CONV, fms[CONV], max_samples=3, max_channels=6)
    assert conv is not None and len(conv.axes) == 3 * 2 * 3  # (actual, target, diff) x 2 x 3
    dense = fig_feature_map(GEMM3, fms[GEMM3], max_samples=3, max_channels=6)
    assert dense is not None and len(dense.axes) == 2
    odd = {"op": "Conv", "actual": np.zeros((1, 1, 1, 2, 2)).tolist(),
           "target": np.zeros((1, 1, 1, 2, 2)).tolist()}
    assert fig_feature_map("odd", odd, 3, 6) is None
    page = build_html({**json.loads(json.dumps(_minimal_report())), "feature_maps": {"odd": odd}})
    assert "cannot draw a feature map of shape [1, 1, 1, 2, 2]" in page


def _minimal_report() -> dict[str, Any]:
    res = {"accuracy": 0.5, "n": 2, "loss": None, "per_class": [1.0, 0.0],
           "confusion": [[1, 0], [1, 0]]}
    return {"schema": "onnxfbp.report/1", "written": None, "heldout": {"before": res, "after": res},
            "eval": None, "layers": [], "timings": {}, "config": {},
            "environment": {"onnxfbp": "0", "onnx": "0", "onnxruntime": "0", "numpy": "0",
                            "python": "3", "device": "cpu", "providers": []},
            "plan": {"input": "x", "output": "y", "logits": "y", "output_kind": "logits",
                     "n_classes": 2, "boundaries": [], "layers": []}}


def test_minimal_report_renders() -> None:
    report = _minimal_report()
    validate_report(report)
    page = build_html(report)
    assert "No layer was visited" in page and page.count("<img ") == 3


def report_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["report", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("onnxfbp: error: "), err
    return err


def test_report_command_one_line_errors(demo_report: tuple[Path, dict[str, Any]], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "r.html")
    assert "not found" in report_error(capsys, str(tmp_path / "missing.json"), "-o", out)
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "onnxfbp.report/1",')
    assert "not valid JSON (line 1" in report_error(capsys, str(bad), "-o", out)
    bad.write_text("[1, 2]")
    assert "top level is array" in report_error(capsys, str(bad), "-o", out)
    bad.write_text(json.dumps({"schema": "onnxfbp.report/1"}))
    assert "not an onnxfbp report: written: missing" in report_error(capsys, str(bad), "-o", out)
    bad.write_bytes(b"\xff\xfe\x00binary")
    assert "not UTF-8" in report_error(capsys, str(bad), "-o", out)
    good = str(demo_report[0])
    assert "does not exist" in report_error(capsys, good, "-o", str(tmp_path / "no" / "r.html"))
    assert "is the report itself" in report_error(capsys, good, "-o", good)
    assert "is a directory" in report_error(capsys, good, "-o", str(tmp_path))
    assert not (tmp_path / "r.html").exists()
    assert main(["report", good, "-o", out]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert Path(out).read_text().startswith("<!DOCTYPE html>")


# ---------------------------------------------------------------------------- browser

def test_report_renders_in_headless_chromium(rendered: tuple[dict[str, Any], Path],
                                             tmp_path: Path) -> None:
    """Needs Chromium (Debian: apt-get install chromium); skipped where it is absent."""
    tool = _tool()
    if tool.find_chromium() is None:
        pytest.skip("no Chromium/Chrome on PATH (set CHROMIUM); the browser check is skipped")
    html_path = rendered[1]
    shot = tmp_path / "r.png"
    proc = subprocess.run(
        [sys.executable, str(PROJECT / "tools" / "check_report_browser.py"), str(html_path),
         "--screenshot", str(shot)],
        capture_output=True, text=True, timeout=240, check=False)
    summary = json.loads(proc.stdout)
    assert proc.returncode == 0 and summary["ok"], summary
    browser = summary["browser"]
    assert browser["ran"] and browser["total"] == browser["decoded"] == summary["static"]["images"]
    assert all(ink is None or ink > 0.01 for ink in browser["ink"])
    assert summary["screenshot"]["size"][0] == 1200
    assert summary["screenshot"]["size"][1] >= 2000  # the whole page, not one window
    assert shot.stat().st_size > 50_000

    # The check is not vacuous: a page whose image data is damaged fails it.
    page = html_path.read_text()
    head, rest = page.split("base64,", 1)
    damaged = tmp_path / "damaged.html"
    damaged.write_text(head + "base64," + rest[:40] + "AAAA" + rest[400:])
    proc = subprocess.run([sys.executable, str(PROJECT / "tools" / "check_report_browser.py"),
                           str(damaged)], capture_output=True, text=True, timeout=240, check=False)
    summary = json.loads(proc.stdout)
    assert proc.returncode == 1 and not summary["ok"]
    assert summary["browser"]["decoded"] == summary["browser"]["total"] - 1


# ---------------------------------------------------------------------------- progress

LINE = "sweep 1 Gemm /fc2/Gemm: kept, held-out acc 0.8816, lam 0.01, 2.37s"
KEPT = LayerVisited(LayerReport(0, "/fc2/Gemm", "Gemm", [10, 64], True, "", lam=0.01,
                                heldout_accuracy=0.8816, seconds=2.37))


def test_progress_events_render() -> None:
    assert render(KEPT) == LINE
    reverted = LayerReport(2, "a: b/Conv", "Conv", [4], False, "", seconds=0.1)
    assert render(LayerVisited(reverted)) == (
        "sweep 3 Conv a: b/Conv: reverted, held-out acc n/a, lam None, 0.10s")
    assert render(StepChecked(3, 40, 0.91234, 0.3)) == (
        "minibatch step 3/40: held-out acc 0.9123, loss 0.3000")
    assert render(StepChecked(3, 40, float("nan"), 0.3)) == (  # a regression: no accuracy
        "minibatch step 3/40: held-out loss 0.3000")
    assert render(StepBackedOff(2, "held-out loss rose", 0.15)) == (
        "minibatch step 2: held-out loss rose, step halved to 0.15")
    assert render(Message("loading model")) == "loading model"


def test_progress_plain_quiet_and_cli(capsys: pytest.CaptureFixture[str]) -> None:
    buf = io.StringIO()
    plain = ProgressDisplay(stream=buf)
    plain(KEPT)
    plain(Message("something else"))
    assert buf.getvalue() == f"  {LINE}\n  something else\n"
    assert not plain.live and plain.visits == 1

    quiet = ProgressDisplay(quiet=True, stream=buf)
    quiet(KEPT)
    with quiet.task("forward", total=3) as bar:
        bar.advance(3)
    assert buf.getvalue().count("\n") == 2 and quiet.lines == []

    _progress(True)(KEPT)
    _progress(False)(KEPT)  # stderr is captured, not a terminal: plain lines
    assert capsys.readouterr().err == f"  {LINE}\n"


def test_progress_live_on_a_terminal() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120, color_system="standard")
    with ProgressDisplay(console=console) as progress:
        assert progress.live
        progress(KEPT)
        progress(LayerVisited(replace(KEPT.report, sweep=1, accepted=False)))
        with progress.task("sweep 2 Conv c: forward", total=4) as bar:
            for _ in range(4):
                bar.advance()
    assert not progress.live
    progress.close()  # idempotent
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", buf.getvalue())
    assert "/fc2/Gemm: kept, held-out acc 0.8816" in text
    assert "/fc2/Gemm: reverted" in text
    assert "refining · sweep 2 · 2 layer visits · held-out acc 0.8816" in text
    assert "\x1b[32mkept" in buf.getvalue()  # coloured


def test_real_refine_progress_events(mnist_rot: dict[str, np.ndarray]) -> None:
    """refine() tells the display of every layer visit with a typed event."""
    from onnxfbp import RefineConfig, refine  # noqa: PLC0415

    buf = io.StringIO()
    progress = ProgressDisplay(stream=buf)
    refine(DEMO_MODEL, None, mnist_rot["x_adapt"][:600, None], mnist_rot["y_adapt"][:600],
           config=RefineConfig.of(device="cpu", sweeps=1, allow_worse=True), progress=progress)
    layer_lines = [line for line in progress.lines if line.startswith("sweep ")]
    assert layer_lines and progress.visits == len(layer_lines), progress.lines


@pytest.mark.skipif(not hasattr(os, "openpty") or sys.platform == "win32", reason="needs a pty")
def test_cli_shows_live_progress_on_a_tty(tmp_path: Path) -> None:
    """stderr a terminal: spinner and coloured lines; stdout still gets the results."""
    import pty  # noqa: PLC0415

    data = tmp_path / "d.npz"
    with np.load(MODELS / "demo_adapt.npz") as z:
        np.savez(data, x=z["input"][:400], y=z["y"][:400])
    pid, fd = pty.fork()
    if pid == 0:  # child: stdin/stdout/stderr are the pty
        os.environ["PYTHONPATH"] = str(PROJECT)
        os.environ["COLUMNS"] = "160"
        os.execv(sys.executable, [sys.executable, "-m", "onnxfbp.cli", "refine", str(DEMO_MODEL),
                                  str(tmp_path / "o.onnx"), "--data", str(data), "--sweeps", "1",
                                  "--max-layers", "2", "--allow-worse"])
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    raw = b"".join(chunks).decode("utf-8", "replace")
    assert os.waitstatus_to_exitcode(status) == 0, raw
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw)
    assert "refining" in text and "\x1b[?25l" in raw  # the live display hid the cursor...
    assert "\x1b[?25h" in raw  # ...and gave it back
    assert re.search(r"sweep 1 Gemm /classifier/classifier\.3/Gemm: (kept|reverted)", text)
    assert "held-out accuracy:" in text and f"wrote {tmp_path / 'o.onnx'}" in text


# ---------------------------------------------------------------------------- inspect

def inspect_json(model: Path, *extra: str) -> dict[str, Any]:
    proc = run_cli("inspect", str(model), "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_inspect_json_demo_model() -> None:
    default = inspect_json(DEMO_MODEL)
    assert default["refined_layers"] == [
        GEMM3, GEMM1, CONV, "/features/features.0/Conv"]  # minibatch: through conv adjoints
    assert default["reverse_pass"] == "onnxruntime"  # every path node has an ONNX adjoint
    assert default["kept_branch"] == "/features/features.0/Conv"  # Relu, MaxPool, Conv
    info = inspect_json(DEMO_MODEL, "--schedule", "jacobi")
    assert info["schedule"] == "jacobi" and info["reverse_pass"] is None
    assert info["kept_branch"] is None
    assert info["refined_layers"] == [GEMM3, GEMM1, CONV]
    assert info["input"] == {"name": "input", "shape": ["batch", 1, 28, 28]}
    assert info["output"]["kind"] == "logits" and info["output"]["classes"] == 10
    assert info["summary"] == {"inverse": 10, "constant": 0, "off-path": 0, "boundary": 0}
    nodes = {n["name"]: n for n in info["nodes"]}
    assert all(n["rule"] == "rule" and n["status"] == "inverse" for n in nodes.values())
    first = nodes["/features/features.0/Conv"]
    assert first["refined"] is False and "--deep" in first["why_not"]
    assert nodes[CONV]["refined"] and nodes[CONV]["why_not"] is None
    assert nodes["/features/features.1/Relu"]["weights"] == {}
    layers = {entry["name"]: entry for entry in info["layers"]}
    assert layers[GEMM3]["weight"] == {"initializer": "classifier.3.weight", "shape": [10, 64],
                                       "via": [], "store": "initializer"}
    assert layers[GEMM3]["bias"]["shape"] == [10] and layers[CONV]["kind"] == "conv"

    deep = inspect_json(DEMO_MODEL, "--deep", "--schedule", "jacobi")
    assert deep["refined_layers"] == [GEMM3, GEMM1, CONV, "/features/features.0/Conv"]


def test_inspect_json_cntk_mnist8(shared_models: Path) -> None:
    model = shared_models / "mnist_cntk_zoo_mnist8.onnx"
    assert inspect_json(model)["refined_layers"] == ["Times212", "Convolution110", "Convolution28"]
    info = inspect_json(model, "--schedule", "jacobi")
    assert info["refined_layers"] == ["Times212", "Convolution110"]
    assert info["opset"] == 8 and info["output"]["name"] == "Plus214_Output_0"
    nodes = {n["name"]: n for n in info["nodes"]}
    # The MatMul's weight is a Reshape of an initializer: constant, and marked as such.
    reshape = nodes["Times212_reshape1"]
    assert reshape["rule"] == "constant" and reshape["status"] == "constant"
    assert reshape["weight_of"] == "Times212"
    assert nodes["Times212_reshape0"]["status"] == "inverse"  # the activation's Reshape
    for name in ("Plus30", "ReLU32", "Pooling66", "Convolution110", "Plus112", "Times212",
                 "Plus214"):
        assert nodes[name]["status"] == "inverse", name
    assert nodes["Convolution28"]["refined"] is False
    assert "--deep" in nodes["Convolution28"]["why_not"]
    assert info["summary"] == {"inverse": 11, "constant": 1, "off-path": 0, "boundary": 0}
    layers = {entry["name"]: entry for entry in info["layers"]}
    assert layers["Times212"]["weight"] == {"initializer": "Parameter193",
                                            "shape": [16, 4, 4, 10], "via": ["Reshape"],
                                            "store": "initializer"}
    assert layers["Times212"]["bias"] == {"initializer": "Parameter194", "shape": [1, 10],
                                          "add_node": "Plus214", "store": "initializer"}
    assert layers["Convolution110"]["bias"]["add_node"] == "Plus112"
    assert info["boundaries"] == []

    table = run_cli("inspect", str(shared_models / "mnist_cntk_zoo_mnist8.onnx"))
    assert table.returncode == 0, table.stderr
    assert "would refine: Times212, Convolution110" in table.stdout
    assert "reverse pass: onnxruntime" in table.stdout
    assert "W 16×4×4×10 via Reshape" in table.stdout and "weight of Times212" in table.stdout
