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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from importlib import resources
from pathlib import Path
from types import FrameType
from typing import Any

from ..errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_USER_ERROR, OnnxfbpError
from ..output.outcome import outcome_lines
from .outputs import eval_line, eval_payload, heldout_line, target_settings, task_options
from .values import finite_float, seed_value

__all__ = ["main"]

# The bundled demo (models/ in a clone, package data in a wheel).
DEMO_DIR = Path(str(resources.files("onnxfbp") / "demo_data"))
MIN_SPLIT = 50  # --holdout must leave at least this many samples on each side


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress(quiet: bool) -> Any:
    """The refine progress callback: a live display when stderr is a terminal, plain
    lines otherwise, silent with ``--quiet`` (see :mod:`onnxfbp.cli.progress`)."""
    from .progress import ProgressDisplay  # noqa: PLC0415

    return ProgressDisplay(quiet=quiet)


def _config(args: argparse.Namespace) -> Any:
    from ..config import RefineConfig  # noqa: PLC0415

    settings = {key: getattr(args, key, None) for key in (
        "max_layers", "sweeps", "holdout", "min_gain", "batch_size", "schedule", "epochs",
        "max_retain_drop", "task", "loss", "requantize_scales")}
    return RefineConfig.of(
        device=args.device, seed=args.seed,
        **{key: value for key, value in settings.items() if value is not None},
        allow_worse=bool(getattr(args, "allow_worse", False)),
        deep=bool(getattr(args, "deep", False)),
        **target_settings(args),
    )




def _print_result(result: Any, stream: Any = None) -> None:
    stream = sys.stdout if stream is None else stream
    hb, ha = result.heldout_before, result.heldout_after
    print(heldout_line(hb, ha), file=stream)
    if result.eval_before is not None and result.eval_after is not None:
        eb, ea = result.eval_before, result.eval_after
        print(heldout_line(eb, ea, "eval"), file=stream)
    _print_retain(result, stream)
    for line in outcome_lines(result.plan, getattr(result, "data", None),
                              getattr(result, "warnings", None)):
        print(line, file=stream)
    print(f"time: {result.timings.get('total', 0.0):.1f}s", file=stream)


def _print_retain(result: Any, stream: Any) -> None:
    """The retain (original-domain) held-out accuracy (another task: its metrics)
    line, when there is one."""
    rb, ra = getattr(result, "retain_before", None), getattr(result, "retain_after", None)
    if rb is None or ra is None:
        return
    kept = (result.data or {}).get("retain") or {}
    what = "labelled" if kept.get("labelled", True) else "model outputs"
    if getattr(rb, "task", None) is not None:  # the task's metrics
        from ..fit.tasks import metric_line  # noqa: PLC0415

        print(f"retain {metric_line(rb, ra)[:-1]}, {what})", file=stream)
        return
    print(f"retain accuracy: {rb.accuracy:.4f} -> {ra.accuracy:.4f} (n={rb.n}, {what})",
          file=stream)


def _dumps(payload: Any, **kwargs: Any) -> str:
    """Strict JSON: non-finite numbers become null."""
    from ..output.results import finite_json  # noqa: PLC0415

    return json.dumps(finite_json(payload), allow_nan=False, **kwargs)


def _emit(write: Callable[[], object]) -> None:
    """Run ``write`` (prints to stdout) and flush; a closed or full stdout is a user
    error (exit 2; a refine then places nothing), and stdout is pointed at /dev/null
    so that nothing is flushed again at exit."""
    from ..errors import OutputError  # noqa: PLC0415

    try:
        write()
        sys.stdout.flush()
    except (OSError, ValueError) as exc:
        with suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise OutputError(f"cannot write to standard output ({reason}); nothing was written; "
                          "send it to a file or a reader that stays open") from None


def _run_paths(model: Path, output: Path | None, report: Path | None, force: bool,
               data: Sequence[tuple[str | None, str]] = (), report_force: bool | None = None
               ) -> None:
    """The path rules of :mod:`onnxfbp.paths` for one run, before any work: inputs are
    regular files (data: or folders), destinations are new (or ``force``) regular
    files in writable folders, and no destination is an input or another destination."""
    from ..errors import DataError, ModelError  # noqa: PLC0415
    from ..output.patch import check_output_path  # noqa: PLC0415
    from ..paths import (  # noqa: PLC0415
        check_destination,
        check_distinct,
        check_input_file,
        data_files,
        model_files,
    )

    if os.path.isdir(model):
        raise ModelError(f"model {model} is a folder; pass the .onnx file inside it")
    check_input_file(model, "model file", ModelError)
    for path, what in data:
        if path is not None:
            check_input_file(path, f"{what} file", DataError, folder_ok=True)
    if output is not None:
        check_output_path(model, output, force)
    dests: list[tuple[Path, str]] = []
    if output is not None:
        dests += [(output, "output"), (output.with_name(output.name + ".data"),
                                       "the output's data file")]
    if report is not None:
        dests.append((report, "--report"))
    sources: list[tuple[Path, str]] = [(model, f"the input model {model}")]
    if any(os.path.lexists(d) for d, _ in dests):
        sources = model_files(model)
    for path, what in data:
        if path is not None:
            sources += data_files(Path(path), what)
    check_distinct(dests, sources)
    if report is not None:
        check_destination(report, "--report", force if report_force is None else report_force,
                          "give the report its own file name, such as report.json")


def _check_holdout(args: argparse.Namespace) -> None:
    """``--holdout`` must leave at least MIN_SPLIT samples on each side (else exit 2):
    with fewer the gate would judge on a handful of samples, or on the training data."""
    from ..data import count_samples  # noqa: PLC0415
    from ..errors import ConfigError  # noqa: PLC0415

    if args.holdout is None or not 0 <= args.holdout < 1:
        return  # out of [0, 1): the settings check names it
    n = count_samples(args.data)
    held = round(n * args.holdout)
    if held < MIN_SPLIT or n - held < MIN_SPLIT:
        raise ConfigError(
            f"--holdout {args.holdout:g} of {n} samples would hold out about {held} and train on "
            f"about {n - held}; each side needs at least {MIN_SPLIT}: choose a fraction between "
            f"{MIN_SPLIT / n:.3g} and {1 - MIN_SPLIT / n:.3g}, or leave --holdout out"
            if n >= 2 * MIN_SPLIT else
            f"--holdout needs at least {2 * MIN_SPLIT} samples ({MIN_SPLIT} on each side) but the "
            f"data has {n}; leave --holdout out (small data is cross-validated)"
        )


@contextmanager
def _noted_warnings(notes: list[str]) -> Iterator[None]:
    """Collect :class:`NonFiniteRefinedWarning` messages into ``notes`` (and stderr)."""
    from ..output.patch import NonFiniteRefinedWarning  # noqa: PLC0415

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NonFiniteRefinedWarning)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, NonFiniteRefinedWarning):
                    notes.append(str(w.message))
                    _stderr(f"onnxfbp: warning: {w.message}")
                elif not issubclass(w.category, RuntimeWarning):
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _report_payload(result: Any, notes: list[str]) -> dict[str, Any]:
    payload = dict(result.to_dict())
    if notes:
        payload["notes"] = list(notes)
    return payload


def _stage_report(commit: Any, path: Path, payload: dict[str, Any]) -> None:
    from ..errors import OutputError  # noqa: PLC0415

    staged = commit.stage(path)
    try:
        staged.write_text(_dumps(payload, indent=2), encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write report {path}: {exc.strerror or exc}; "
                          "nothing was written") from None


def _write_report_only(path: Path, payload: dict[str, Any], force: bool) -> None:
    from ..paths import Commit  # noqa: PLC0415

    with Commit(force) as commit:
        _stage_report(commit, path, payload)
        commit.commit()


def cmd_refine(args: argparse.Namespace) -> int:
    from ..cluster.client import optional_client  # noqa: PLC0415
    from ..errors import GateError  # noqa: PLC0415
    from ..output.patch import stage_refined  # noqa: PLC0415
    from ..paths import Commit, remove_stale_staging  # noqa: PLC0415
    from ..refine import refine  # noqa: PLC0415

    # Everything that can be checked without the model, before anything is computed;
    # refine() then validates the model and the data against each other, also first.
    model, output = Path(args.model), Path(args.output)
    report = Path(args.report) if args.report else None
    _run_paths(model, output, report, args.force,
               data=[(args.teacher, "teacher model")] if args.dask else [
                   (args.data, "data"), (args.eval_data, "eval data"),
                   (args.retain_data, "retain data"), (args.teacher, "teacher model")])
    _check_holdout(args)
    remove_stale_staging([output, *([report] if report else [])])
    notes: list[str] = []
    try:
        with _noted_warnings(notes), optional_client(args.dask) as client:
            result = refine(
                args.model, None, args.data, config=_config(args), eval_data=args.eval_data,
                retain_data=args.retain_data, force=args.force, progress=_progress(args.quiet),
                teacher=args.teacher,
                client=client,
            )
    except GateError as exc:  # no model is written, but the report says why (written: null)
        failed = getattr(exc, "result", None)
        if report is not None and failed is not None:
            _write_report_only(report, _report_payload(failed, notes), args.force)
        raise
    # The model and the report are staged, then placed together (or neither).
    with Commit(args.force) as commit:
        start = time.perf_counter()
        with _noted_warnings(notes):
            stage_refined(result.model, output, commit, model)
        result.timings["write"] = time.perf_counter() - start
        result.written = str(output)
        if report is not None:
            _stage_report(commit, report, _report_payload(result, notes))

        def summary() -> None:
            _print_result(result)
            print(f"wrote {args.output}")

        _emit(summary)
        commit.commit()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from ..refine import evaluate  # noqa: PLC0415

    _run_paths(Path(args.model), None, None, False, data=[(args.data, "data")])
    targets = target_settings(args)
    result = evaluate(args.model, args.data, device=args.device,
                      output=targets["output_name"], task_override=args.task, loss=args.loss,
                      targets=targets.get("targets", ()))
    name = (result.metrics or {}).pop("output", None) or targets["output_name"] or "output"
    line = _dumps(eval_payload(result, name)) if args.json else eval_line(result, name)
    _emit(lambda: print(line))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..errors import ModelError  # noqa: PLC0415
    from ..graph.inspect import inspect_model, render_table  # noqa: PLC0415
    from ..paths import check_input_file  # noqa: PLC0415

    check_input_file(args.model, "model file", ModelError)
    info = inspect_model(args.model, deep=args.deep, schedule=args.schedule)
    try:
        if args.json:
            print(_dumps(info, indent=2), flush=True)
        else:
            render_table(info)
            sys.stdout.flush()
    except BrokenPipeError:  # `onnxfbp inspect ... | head`: the reader has enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ..config import RefineConfig  # noqa: PLC0415
    from ..output.patch import stage_refined  # noqa: PLC0415
    from ..paths import Commit, remove_stale_staging  # noqa: PLC0415
    from ..refine import evaluate, refine  # noqa: PLC0415

    model = DEMO_DIR / "demo_mnist_cnn.onnx"
    if not model.is_file():
        raise OnnxfbpError(
            f"bundled demo model {model} is missing; rebuild it: python tools/make_demo.py"
        )
    out = Path(args.output)
    report = Path(args.report) if args.report else None
    bundled = [(str(DEMO_DIR / f"demo_{k}.npz"), "bundled demo data") for k in
               ("adapt", "eval", "clean")]
    _run_paths(model, out, report, True, data=bundled)  # the demo overwrites its own files
    remove_stale_staging([out, *([report] if report else [])])
    print("onnxfbp demo: a small MNIST CNN (models/demo_mnist_cnn.onnx) meets digits rotated "
          "by up to 45 degrees;\nrefining it on 2,000 labelled rotated digits "
          "(models/demo_adapt.npz)...")
    start = time.perf_counter()
    notes: list[str] = []
    with _noted_warnings(notes):
        result = refine(
            model, None, DEMO_DIR / "demo_adapt.npz", config=RefineConfig.of(device=args.device),
            eval_data=DEMO_DIR / "demo_eval.npz", force=True, progress=_progress(args.quiet),
        )
    with Commit(True) as commit:
        started = time.perf_counter()
        with _noted_warnings(notes):
            staged = stage_refined(result.model, out, commit, model)
        result.timings["write"] = time.perf_counter() - started
        result.written = str(out)
        clean_before = evaluate(model, DEMO_DIR / "demo_clean.npz", device=args.device)
        clean_after = evaluate(staged, DEMO_DIR / "demo_clean.npz", device=args.device)
        if report is not None:
            _stage_report(commit, report, _report_payload(result, notes))

        def summary() -> None:
            _print_result(result)
            print(f"clean accuracy:    {clean_before.accuracy:.4f} -> "
                  f"{clean_after.accuracy:.4f} (upright digits, n={clean_before.n})")
            print(f"wrote {out} in {time.perf_counter() - start:.1f}s")

        _emit(summary)
        commit.commit()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from ..output.html import render_html  # noqa: PLC0415

    render_html(Path(args.report), Path(args.output), force=args.force)
    _emit(lambda: print(f"wrote {args.output}"))
    return 0


class UsageError(Exception):
    """A command-line usage error (argparse): one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one ``onnxfbp: error:`` line (exit 2), not a usage dump."""

    def error(self, message: str) -> Any:
        hint = f"run '{self.prog} --help' for usage"
        raise UsageError(f"{_one_line(Exception(message))}; {hint}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="onnxfbp",
        description="Refine an exported ONNX classifier with new labelled data, "
        "without its training code (feature-level reverse propagation).",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        p.add_argument("--quiet", action="store_true", help="no progress on stderr")
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        p.add_argument("--allow-nonfinite-input", action="store_true",
                       help="accept a model whose weights hold NaN or Inf (they are kept "
                            "as they are; refined weights are always finite)")

    p = sub.add_parser("refine", help="refine MODEL on labelled data, write OUT")
    p.add_argument("model")
    p.add_argument("output")
    p.add_argument("--data", required=True,
                   help=".npz (input + y), .npy dir, or dir of .npz shards")
    p.add_argument("--eval-data", help="held-out labelled data to report (and gate) on")
    p.add_argument("--retain-data",
                   help="original-domain data to keep (labels optional: without y the "
                        "model's own predictions are the targets)")
    p.add_argument("--teacher",
                   help="float model the (quantized) MODEL came from: its predictions are the "
                        "targets (--data needs no labels); see docs/quant.md")
    p.add_argument("--requantize-scales", action="store_true", help="with --teacher: refit "
                   "each quantized weight's scale before rounding; see docs/quant.md")
    p.add_argument("--max-retain-drop", type=finite_float,
                   help="exit 3 unless the retain held-out accuracy (mean IoU; MAE: its "
                        "rise over the targets' spread) drops at most this much (default "
                        "0.01; docs/tasks.md)")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--min-gain", type=finite_float,
                   help="exit 3, writing nothing, unless accuracy gains this much")
    p.add_argument("--allow-worse", action="store_true",
                   help="write even if held-out accuracy drops")
    p.add_argument("--max-layers", type=int, help="refine at most this many layers from the output")
    p.add_argument("--schedule", choices=("minibatch", "jacobi", "sequential"),
                   help="minibatch (default): preconditioned least-squares steps on "
                        "mini-batches; jacobi / sequential: full-pass sweeps")
    p.add_argument("--epochs", type=finite_float,
                   help="minibatch: passes over the training split at most (default 3; "
                        "the run ends sooner when held-out data stops improving)")
    p.add_argument("--sweeps", type=int, help="jacobi / sequential: sweeps at most")
    p.add_argument("--holdout", type=finite_float,
                   help="fraction held out for choices (default 0.2; it must leave at least "
                        f"{MIN_SPLIT} samples on each side)")
    p.add_argument("--batch-size", type=int, help="samples per forward batch")
    p.add_argument("--deep", action="store_true",
                   help="jacobi / sequential: also refine layers behind convolutions")
    p.add_argument("--output-name", help="class-score output of the graph (default: found)")
    p.add_argument("--seed", type=seed_value, default=0)
    p.add_argument("--dask", metavar="ADDRESS", default=None,
                   help="run the passes over the data on a Dask cluster: local:N (N worker "
                        "processes here) or a scheduler address tcp://host:8786; --data must "
                        "be a path every worker can read (docs/cluster.md)")
    task_options(p, weights=True)
    common(p)
    p.set_defaults(func=cmd_refine)

    p = sub.add_parser("eval", help="accuracy (or the task's metrics) of MODEL on labelled data")
    p.add_argument("model")
    p.add_argument("--data", required=True)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--output-name", help="the output to score (default: found)")
    task_options(p)
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
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.set_defaults(func=cmd_report)
    return parser


class _Terminated(BaseException):
    """SIGTERM or SIGHUP, raised in the main thread like KeyboardInterrupt is for SIGINT."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated()


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _stamp(path: str | None) -> tuple[int, int, int] | None:
    """Identity of the file at ``path`` (None if absent): tells whether a run wrote it."""
    try:
        st = os.stat(path) if path else None
    except (OSError, ValueError):
        return None
    return None if st is None else (st.st_ino, st.st_mtime_ns, st.st_size)


_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def main(argv: Sequence[str] | None = None) -> int:
    """The console script. Exit codes: 0 ok, 1 internal error (a bug; ``--debug``
    shows the traceback), 2 user error (usage errors included), 3 held-out gate not
    met, 130 interrupted (SIGINT, SIGTERM or SIGHUP).

    Called in-process (tests, notebooks), it restores the signal handlers and the
    warning filters it changed."""
    from .. import _early  # noqa: PLC0415

    if signal.getsignal(signal.SIGINT) is _early._early_exit:  # KeyboardInterrupt from here on
        signal.signal(signal.SIGINT, signal.default_int_handler)
    previous: dict[int, Any] = {}
    for sig in _SIGNALS:
        with suppress(ValueError, OSError):  # not the main thread: keeps its handler
            previous[sig] = signal.signal(sig, _on_sigterm)
    try:
        try:
            args = build_parser().parse_args(argv)
        except UsageError as exc:
            _stderr(f"onnxfbp: error: {exc}")
            return EXIT_USER_ERROR
        except (KeyboardInterrupt, _Terminated):
            _stderr("onnxfbp: interrupted; nothing was written")
            return EXIT_INTERRUPTED
        from ..graph.plan import allow_nonfinite_weights  # noqa: PLC0415

        token = allow_nonfinite_weights.set(bool(getattr(args, "allow_nonfinite_input", False)))
        try:
            with warnings.catch_warnings():
                if not getattr(args, "debug", False):  # overflow noise: non-finite solves skipped
                    warnings.simplefilter("ignore", RuntimeWarning)
                return _run(args)
        finally:
            allow_nonfinite_weights.reset(token)
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


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
        # The output is placed in one step, so it is either the old file or the new one.
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
