"""Progress on stderr for long runs: a live rich display on a terminal, plain
lines otherwise, nothing when quiet.

:class:`ProgressDisplay` is a ``Callable[[Event], None]`` (:mod:`onnxfbp.events`),
so it plugs into ``refine(..., progress=...)`` as it is, and renders each event
as one line (:func:`render`); a layer visit reads::

    sweep 1 Gemm /fc2/Gemm: kept, held-out acc 0.8816, lam 0.01, 2.37s

- stderr is a terminal: each line is printed (kept in green, reverted in
  yellow) above a spinner that shows the sweep, the number of layer visits, the
  current held-out accuracy and the elapsed time, so a long first forward pass
  does not look like a hang. The spinner is transient: it disappears when the
  display is closed (``close()``, ``with``, garbage collection or exit).
- stderr is not a terminal (a log file, CI): the line is printed as it is,
  indented by two spaces, and flushed.
- ``quiet=True``: nothing at all.

A plain string is shown as it is (a :class:`Message`).

Finer-grained progress: :meth:`ProgressDisplay.task` opens a bar for a phase
with a known amount of work (samples of a forward pass, ridge values of a
solve)::

    with progress.task("sweep 1 Gemm /fc2/Gemm: forward", total=n_samples) as bar:
        for x, y in batches:
            ...
            bar.advance(len(y))

On a terminal the bar is shown under the spinner and removed when the ``with``
block ends; otherwise ``task`` prints nothing (the per-layer line says enough
in a log). Callers that may receive a plain function use
``getattr(progress, "task", None)``.
"""

from __future__ import annotations

import math
import sys
import weakref
from types import TracebackType
from typing import IO

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from ..events import Event, LayerVisited, Message, ShardsDone, StepBackedOff, StepChecked
from ..output.results import LayerReport

__all__ = ["ProgressDisplay", "ProgressTask", "render"]


def _layer_outcome(report: LayerReport) -> str:
    """What follows ``name: `` on a layer line, from ``kept``/``reverted`` on."""
    acc = "n/a" if report.heldout_accuracy is None else f"{report.heldout_accuracy:.4f}"
    word = report.outcome or ("kept" if report.accepted else "reverted")
    return (f"{word}, held-out acc {acc}, "
            f"lam {report.lam}, {report.seconds:.2f}s")


def _loss(value: float) -> str:
    """A mean loss: 4 decimals, or 4 significant digits once it has blown up."""
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.4g}"


_QUIET_PHASES = ("labels", "take", "list")  # cluster book-keeping, not passes


def render(event: Event | str) -> str:
    """One line of text for ``event``."""
    if isinstance(event, str):
        return event
    if isinstance(event, Message):
        return event.text
    if isinstance(event, LayerVisited):
        r = event.report
        return f"sweep {r.sweep + 1} {r.op} {r.name}: {_layer_outcome(r)}"
    if isinstance(event, StepChecked):  # no accuracy (nan) for a regression: the loss alone
        acc = "" if math.isnan(event.accuracy) else f"acc {event.accuracy:.4f}, "
        return (f"minibatch step {event.step}/{event.total}: held-out {acc}"
                f"loss {_loss(event.loss)}")
    if isinstance(event, StepBackedOff):
        return f"minibatch step {event.step}: {event.why}, step halved to {event.lr:g}"
    if isinstance(event, ShardsDone):
        return (f"cluster {event.phase}: {event.done}/{event.total} shards done, "
                f"{event.busy} worker{'s' if event.busy != 1 else ''} busy")
    raise TypeError(f"not a progress event: {event!r}")


class _BarColumn(BarColumn):
    """A bar only for tasks with a known total (the main spinner line has none)."""

    def render(self, task: Task) -> RenderableType:  # type: ignore[override]
        return Text("") if task.total is None else super().render(task)


class _CountColumn(MofNCompleteColumn):
    def render(self, task: Task) -> Text:
        return Text("") if task.total is None else super().render(task)


class ProgressTask:
    """A bar for one phase (see :meth:`ProgressDisplay.task`); ``advance(n)`` moves it."""

    def __init__(self, progress: Progress | None, task_id: TaskID | None) -> None:
        self._progress = progress
        self._task_id = task_id

    def advance(self, amount: float = 1) -> None:
        if self._progress is not None and self._task_id is not None:
            self._progress.advance(self._task_id, amount)

    def __enter__(self) -> ProgressTask:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None and self._task_id is not None:
            self._progress.remove_task(self._task_id)
            self._task_id = None


class ProgressDisplay:
    """Progress callback for :func:`onnxfbp.refine`: live on a terminal, plain lines
    otherwise, silent when ``quiet``.

    ``stream`` defaults to ``sys.stderr``; ``console`` (a rich Console) overrides
    both the stream and the terminal detection (tests pass
    ``Console(force_terminal=True)``).
    """

    def __init__(self, quiet: bool = False, *, stream: IO[str] | None = None,
                 console: Console | None = None, title: str = "refining") -> None:
        self.quiet = quiet
        self.title = title
        self.visits = 0
        self.lines: list[str] = []  # every message received, in order
        self._stream = stream
        self._sweep: int | None = None
        self._accuracy: float | None = None
        self._progress: Progress | None = None
        self._main: TaskID | None = None
        if quiet:
            self.console = None
            return
        self.console = console or Console(file=stream or sys.stderr, highlight=False)
        if self.console.is_terminal and not self.console.is_dumb_terminal:
            stdout_tty = bool(getattr(sys.stdout, "isatty", lambda: False)())
            self._progress = Progress(
                SpinnerColumn(), TextColumn("{task.description}"), _BarColumn(bar_width=24),
                _CountColumn(), TimeElapsedColumn(),
                console=self.console, transient=True,
                # Route stdout through the display only when it shares the terminal;
                # `onnxfbp refine ... > out.txt` must still write to out.txt.
                redirect_stdout=stdout_tty, redirect_stderr=True,
            )
            self._main = self._progress.add_task(self._describe(), total=None)
            self._progress.start()
            # Stop the display (restoring stdout/stderr, erasing the spinner) when this
            # object is collected or at interpreter exit, whichever comes first.
            self._finalizer = weakref.finalize(self, self._progress.stop)

    @property
    def live(self) -> bool:
        """True while a live display is shown on the terminal."""
        return self._progress is not None and self._progress.live.is_started

    def _describe(self) -> str:
        parts = [self.title]
        if self._sweep is not None:
            parts.append(f"sweep {self._sweep}")
        if self.visits:
            parts.append(f"{self.visits} layer visit{'s' if self.visits != 1 else ''}")
        if self._accuracy is not None:
            parts.append(f"held-out acc {self._accuracy:.4f}")
        return " · ".join(parts)

    def __call__(self, event: Event | str) -> None:
        if self.quiet:
            return
        message = render(event)
        if isinstance(event, ShardsDone) and (event.done < event.total
                                              or event.phase in _QUIET_PHASES):
            # a pass under way: the live line only (a line per shard would flood)
            if self._progress is not None and self._main is not None:
                self._progress.update(self._main, description=f"{self._describe()} · {message}")
            return
        self.lines.append(message)
        report = event.report if isinstance(event, LayerVisited) else None
        if report is not None:
            self.visits += 1
            self._sweep = report.sweep + 1
            if report.accepted:
                self._accuracy = report.heldout_accuracy
        if self._progress is None:
            stream = self._stream or sys.stderr
            # One write: a signal between text and newline would leave the
            # "interrupted" message on the same line.
            stream.write(f"  {message}\n")
            stream.flush()
            return
        assert self.console is not None and self._main is not None
        self.console.print(self._styled(message, report))
        self._progress.update(self._main, description=self._describe())

    @staticmethod
    def _styled(message: str, report: LayerReport | None) -> Text:
        if report is None:
            return Text(f"  {message}")
        text = Text("  ")
        text.append(f"sweep {report.sweep + 1} ", style="dim")
        text.append(f"{report.op} ", style="cyan")
        text.append(f"{report.name}: ", style="bold")
        text.append(report.outcome or ("kept" if report.accepted else "reverted"),
                    style="green" if report.accepted else "yellow")
        text.append("," + _layer_outcome(report).split(",", 1)[1])
        return text

    def task(self, description: str, total: float | None = None) -> ProgressTask:
        """A bar for one phase; use as ``with progress.task(...) as bar: bar.advance(n)``."""
        if self._progress is None:
            return ProgressTask(None, None)
        return ProgressTask(self._progress, self._progress.add_task(description, total=total))

    def close(self) -> None:
        """Stop the live display (idempotent); plain and quiet modes have nothing to stop."""
        if self._progress is not None:
            self._finalizer()

    def __enter__(self) -> ProgressDisplay:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
