"""The ``onnxfbp`` command line (:mod:`onnxfbp.cli.commands`) and its progress
display (:mod:`onnxfbp.cli.progress`)."""

from .commands import main

__all__ = ["main"]
