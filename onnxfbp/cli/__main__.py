"""``python -m onnxfbp.cli``: the console script."""

from .commands import main

raise SystemExit(main())
