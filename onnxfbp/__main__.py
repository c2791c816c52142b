"""``python -m onnxfbp``: the console script."""

from .cli.commands import main

raise SystemExit(main())
