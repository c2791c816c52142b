"""Signals before the command line is ready: installed by ``onnxfbp/__init__`` before
its heavy imports (NumPy, onnx, onnxruntime take most of a second), only when the
process is the ``onnxfbp`` console script (or ``python -m onnxfbp.cli``).

A SIGINT, SIGTERM or SIGHUP then ends the process at once with exit 130 and the
usual one line, instead of dying by the signal (-15) or printing an import-time
traceback; nothing has been read or written yet. :func:`onnxfbp.cli.main` replaces
these handlers with its own.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType

__all__ = ["install"]


def _early_exit(signum: int, frame: FrameType | None) -> None:
    os.write(2, b"onnxfbp: interrupted; nothing was written\n")
    os._exit(130)


def _is_console_script() -> bool:
    argv0 = sys.argv[0] if sys.argv else ""
    # `python -m onnxfbp.cli`: argv[0] is "-m" while the package is imported
    return os.path.basename(argv0) in ("onnxfbp", "onnxfbp.exe") or argv0 == "-m"


def install() -> None:
    """Install the early handlers (console script, main thread, default handlers only)."""
    if not _is_console_script():
        return
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):
        sig = getattr(signal, name, None)
        if sig is None:
            continue
        try:
            current = signal.getsignal(sig)
            if current in (signal.SIG_DFL, signal.default_int_handler):
                signal.signal(sig, _early_exit)
        except (ValueError, OSError):  # not the main thread
            return
