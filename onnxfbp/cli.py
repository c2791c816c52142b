"""The ``onnxfbp`` command line: refine, eval, inspect, demo, report.

Exit codes: 0 success; 1 internal error (a bug: one line, the traceback with
``--debug``); 2 user error (bad model, data or output path: one line on stderr,
no traceback unless ``--debug``); 3 the held-out gate was not met (nothing
written); 130 interrupted (Ctrl-C or SIGTERM; nothing written).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any

from .errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USER_ERROR, OnnxfbpError

__all__ = ["main"]

# The bundled demo (models/ in a clone, package data in a wheel).
DEMO_DIR = Path(str(resources.files("onnxfbp") / "demo_data"))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress(quiet: bool) -> Any:
    """The refine progress callback: a live display when stderr is a terminal, plain
    lines otherwise, silent with ``--quiet`` (see :mod:`onnxfbp.progress`)."""
    from .progress import ProgressDisplay  # noqa: PLC0415

    return ProgressDisplay(quiet=quiet)


def _config(args: argparse.Namespace) -> Any:
    from .config import RefineConfig  # noqa: PLC0415

    settings = {key: getattr(args, key, None) for key in (
        "max_layers", "sweeps", "holdout", "min_gain", "batch_size", "schedule", "epochs")}
    return RefineConfig.of(
        device=args.device, seed=args.seed,
        **{key: value for key, value in settings.items() if value is not None},
        allow_worse=bool(getattr(args, "allow_worse", False)),
        deep=bool(getattr(args, "deep", False)),
        output_name=getattr(args, "output_name", None),
    )


def _print_result(result: Any, stream: Any = sys.stdout) -> None:
    hb, ha = result.heldout_before, result.heldout_after
    print(f"held-out accuracy: {hb.accuracy:.4f} -> {ha.accuracy:.4f} (n={hb.n})", file=stream)
    if result.eval_before is not None and result.eval_after is not None:
        eb, ea = result.eval_before, result.eval_after
        print(f"eval accuracy:     {eb.accuracy:.4f} -> {ea.accuracy:.4f} (n={eb.n})", file=stream)
    kept = sorted({r.name for r in result.layers if r.accepted})
    print(f"refined layers: {', '.join(kept) if kept else 'none'}; "
          f"{result.timings.get('total', 0.0):.1f}s", file=stream)


def _check_inputs_exist(*paths: str | None) -> None:
    """Name a mistyped model or data path at once, before the model is even read."""
    from .errors import DataError, ModelError  # noqa: PLC0415

    for k, path in enumerate(paths):
        if path is not None and not Path(path).exists():
            kind = ModelError if k == 0 else DataError
            what = "model file" if k == 0 else "data file"
            raise kind(f"{what} {path} does not exist; check the path")


def _same_path(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and a.samefile(b)
    except OSError:
        return False


def _check_not_data(output: Path, *data: str | None) -> None:
    """Refuse an output (or the ``OUT.data`` file it may write) that is a data file."""
    from .errors import OutputError  # noqa: PLC0415

    for path in data:
        if path is None:
            continue
        for candidate in (output, output.with_name(output.name + ".data")):
            if _same_path(candidate, Path(path)):
                raise OutputError(
                    f"writing {candidate} would overwrite the data file {path}; "
                    "choose another output path"
                )


def _check_report_path(report: str | None, *inputs: str | Path | None) -> None:
    """Refuse, before any work, a report path that would clobber an input or the
    output, or that cannot be written."""
    from .errors import OutputError  # noqa: PLC0415

    if report is None:
        return
    path = Path(report)
    for other in inputs:
        if other is not None and _same_path(path, Path(other)):
            raise OutputError(
                f"--report {report} is also the model, data or output path; "
                "give the report its own file name, such as report.json"
            )
    if path.name in ("", ".", "..") or path.is_dir():
        raise OutputError(f"--report {report} is a folder; give a file name such as report.json")
    from .patch import check_writable_folder  # noqa: PLC0415

    check_writable_folder(path.parent, f"report {report}", "choose another folder")


def cmd_refine(args: argparse.Namespace) -> int:
    from .errors import GateError  # noqa: PLC0415
    from .patch import check_output_path  # noqa: PLC0415
    from .refine import refine  # noqa: PLC0415

    # Everything that can be checked without the model, before anything is computed;
    # refine() then validates the model and the data against each other, also first.
    _check_inputs_exist(args.model, args.data, args.eval_data)
    check_output_path(Path(args.model), Path(args.output), args.force)
    _check_not_data(Path(args.output), args.data, args.eval_data)
    _check_report_path(args.report, args.model, args.output, args.data, args.eval_data)
    try:
        result = refine(
            args.model, args.output, args.data, config=_config(args), eval_data=args.eval_data,
            force=args.force, progress=_progress(args.quiet),
        )
    except GateError as exc:  # no model is written, but the report says why (written: null)
        failed = getattr(exc, "result", None)
        if args.report and failed is not None:
            _write_json(Path(args.report), failed.to_dict())
        raise
    if args.report:
        _write_json(Path(args.report), result.to_dict())
    _print_result(result)
    print(f"wrote {args.output}")
    return 0


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` whole or not at all (a temporary file, then a rename)."""
    from .errors import OutputError  # noqa: PLC0415
    from .patch import signals_deferred  # noqa: PLC0415

    tmp = path.with_name(f".{path.name}.onnxfbp-tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2, default=float))
        with signals_deferred():
            tmp.replace(path)
    except OSError as exc:
        raise OutputError(f"cannot write report {path}: {exc.strerror or exc}") from exc
    finally:
        with signals_deferred():
            tmp.unlink(missing_ok=True)


def cmd_eval(args: argparse.Namespace) -> int:
    from .refine import evaluate  # noqa: PLC0415

    result = evaluate(args.model, args.data, device=args.device)
    if args.json:
        print(json.dumps({"accuracy": result.accuracy, "n": result.n, "loss": result.loss,
                          "per_class": result.per_class}))
    else:
        print(f"accuracy {result.accuracy:.4f} on {result.n} samples")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .inspect import inspect_model, render_table  # noqa: PLC0415

    info = inspect_model(args.model, deep=args.deep, schedule=args.schedule)
    try:
        if args.json:
            print(json.dumps(info, indent=2), flush=True)
        else:
            render_table(info)
            sys.stdout.flush()
    except BrokenPipeError:  # `onnxfbp inspect ... | head`: the reader has enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .config import RefineConfig  # noqa: PLC0415
    from .refine import evaluate, refine  # noqa: PLC0415

    model = DEMO_DIR / "demo_mnist_cnn.onnx"
    if not model.is_file():
        raise OnnxfbpError(
            f"bundled demo model {model} is missing; rebuild it: python tools/make_demo.py"
        )
    out = Path(args.output)
    _check_report_path(args.report, model, out)
    print("onnxfbp demo: a small MNIST CNN (models/demo_mnist_cnn.onnx) meets digits rotated "
          "by up to 45 degrees;\nrefining it on 2,000 labelled rotated digits "
          "(models/demo_adapt.npz)...")
    start = time.perf_counter()
    result = refine(
        model, out, DEMO_DIR / "demo_adapt.npz", config=RefineConfig.of(device=args.device),
        eval_data=DEMO_DIR / "demo_eval.npz", force=True, progress=_progress(args.quiet),
    )
    clean_before = evaluate(model, DEMO_DIR / "demo_clean.npz", device=args.device)
    clean_after = evaluate(out, DEMO_DIR / "demo_clean.npz", device=args.device)
    _print_result(result)
    print(f"clean accuracy:    {clean_before.accuracy:.4f} -> {clean_after.accuracy:.4f} "
          f"(upright digits, n={clean_before.n})")
    print(f"wrote {out} in {time.perf_counter() - start:.1f}s")
    if args.report:
        _write_json(Path(args.report), result.to_dict())
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import render_html  # noqa: PLC0415

    render_html(Path(args.report), Path(args.output))
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxfbp",
        description="Refine an exported ONNX classifier with new labelled data, "
        "without its training code (feature-level reverse propagation).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        p.add_argument("--quiet", action="store_true", help="no progress on stderr")
        p.add_argument("--debug", action="store_true", help="show tracebacks")

    p = sub.add_parser("refine", help="refine MODEL on labelled data, write OUT")
    p.add_argument("model")
    p.add_argument("output")
    p.add_argument("--data", required=True,
                   help=".npz (input + y), .npy dir, or dir of .npz shards")
    p.add_argument("--eval-data", help="held-out labelled data to report (and gate) on")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--min-gain", type=float,
                   help="exit 3, writing nothing, unless accuracy gains this much")
    p.add_argument("--allow-worse", action="store_true",
                   help="write even if held-out accuracy drops")
    p.add_argument("--max-layers", type=int, help="refine at most this many layers from the output")
    p.add_argument("--schedule", choices=("minibatch", "jacobi", "sequential"),
                   help="minibatch (default): preconditioned least-squares steps on "
                        "mini-batches; jacobi / sequential: full-pass sweeps")
    p.add_argument("--epochs", type=float,
                   help="minibatch: passes over the training split at most (default 1.25; "
                        "3 measured +0.2-0.35 points on MNIST shifts in about twice the time)")
    p.add_argument("--sweeps", type=int, help="jacobi / sequential: sweeps at most")
    p.add_argument("--holdout", type=float, help="fraction held out for choices (default 0.2)")
    p.add_argument("--batch-size", type=int, help="samples per forward batch")
    p.add_argument("--deep", action="store_true",
                   help="jacobi / sequential: also refine layers behind convolutions")
    p.add_argument("--output-name", help="class-score output of the graph (default: found)")
    p.add_argument("--seed", type=int, default=0)
    common(p)
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("eval", help="accuracy of MODEL on labelled data")
    p.add_argument("model")
    p.add_argument("--data", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="each node's rule and which layers would be refined")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.add_argument("--deep", action="store_true", help="as refine --deep")
    p.add_argument("--schedule", choices=("minibatch", "jacobi", "sequential"),
                   default="minibatch", help="as refine --schedule")
    common(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("demo", help="refine the bundled MNIST model on bundled rotated digits")
    p.add_argument("--output", default="demo_refined.onnx")
    p.add_argument("--report", help="write the JSON report here")
    common(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="render a JSON report as one self-contained HTML file")
    p.add_argument("report")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_report)
    return parser


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread like KeyboardInterrupt is for SIGINT."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _stamp(path: str | None) -> tuple[int, int, int] | None:
    """Identity of the file at ``path`` (None if absent): tells whether a run wrote it."""
    try:
        st = os.stat(path) if path else None
    except OSError:
        return None
    return None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. Exit codes: 0 ok, 1 internal error (a bug; ``--debug``
    shows the traceback), 2 user error, 3 held-out gate not met, 130 interrupted.

    Called in-process (tests, notebooks), it restores the SIGTERM handler and the
    warning filters it changed."""
    try:
        previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: SIGTERM keeps its handler
        previous_sigterm = None
    try:
        args = build_parser().parse_args(argv)
        with warnings.catch_warnings():
            if not getattr(args, "debug", False):  # overflow noise: non-finite solves are skipped
                warnings.simplefilter("ignore", RuntimeWarning)
            return _run(args)
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)


def _run(args: argparse.Namespace) -> int:
    debug = bool(getattr(args, "debug", False))
    output = getattr(args, "output", None) if args.command in ("refine", "demo") else None
    before = _stamp(output)
    try:
        return int(args.func(args))
    except OnnxfbpError as exc:
        if debug:
            traceback.print_exc()
        _stderr(f"onnxfbp: error: {_one_line(exc)}")
        return exc.exit_code
    except (KeyboardInterrupt, _Terminated):
        if debug:
            traceback.print_exc()
        # The output is replaced in one step, so it is either the old file or the new one.
        after = _stamp(output)
        if output is not None and after is not None and after != before:
            _stderr(f"onnxfbp: interrupted after {output} was written")
        else:
            _stderr("onnxfbp: interrupted; nothing was written")
        return EXIT_INTERRUPTED
    except MemoryError:
        if debug:
            traceback.print_exc()
        _stderr("onnxfbp: error: out of memory; lower --batch-size (or use smaller data shards)")
        return EXIT_USER_ERROR
    except Exception as exc:  # a bug, not a user error: one line, traceback with --debug
        if debug:
            traceback.print_exc()
        _stderr(f"onnxfbp: internal error: {type(exc).__name__}: {_one_line(exc)}; "
                "rerun with --debug for the traceback and report it")
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
