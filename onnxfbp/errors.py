"""Errors a user can act on, and the CLI exit codes they map to.

Every error raised for bad input is an :class:`OnnxfbpError`: its message is one
line that says what is wrong and what to do. The CLI prints it without a
traceback and exits with the error's ``exit_code``.
"""

from __future__ import annotations

__all__ = [
    "EXIT_GATE",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_USER_ERROR",
    "DataError",
    "GateError",
    "ModelError",
    "OnnxfbpError",
    "OutputError",
    "UnsupportedModelError",
]

EXIT_OK = 0
EXIT_INTERNAL = 1  # a bug in onnxfbp, not in its input (one line; --debug shows the traceback)
EXIT_USER_ERROR = 2
EXIT_GATE = 3
EXIT_INTERRUPTED = 130


class OnnxfbpError(Exception):
    """A user error: bad model, bad data, bad output path. One-line message."""

    exit_code: int = EXIT_USER_ERROR


class ModelError(OnnxfbpError):
    """The model file cannot be read, checked or run."""


class UnsupportedModelError(ModelError):
    """The graph has nothing onnxfbp can refine, or no class-score output."""


class DataError(OnnxfbpError):
    """The data file is missing, malformed or inconsistent with the model."""


class OutputError(OnnxfbpError):
    """The output path cannot be written as asked."""


class ConfigError(OnnxfbpError):
    """A setting is out of range (e.g. a negative number of epochs)."""


class GateError(OnnxfbpError):
    """The refined model did not clear the held-out accuracy gate; nothing written."""

    exit_code = EXIT_GATE
