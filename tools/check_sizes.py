"""Report modules over 600 lines and functions over 100 lines in ``onnxfbp/``.

    python tools/check_sizes.py [--modules 600] [--functions 100] [--top 5]

Exit status 1 if any is over (the package's size budget), 0 otherwise.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "onnxfbp"


def sizes(root: Path) -> tuple[dict[str, int], dict[str, int]]:
    """Lines per module and per function (``module:qualified.name``)."""
    modules, functions = {}, {}
    for path in sorted(root.rglob("*.py")):
        rel = str(path.relative_to(root.parent))
        text = path.read_text()
        modules[rel] = len(text.splitlines())

        def visit(node: ast.AST, prefix: str, rel: str = rel) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        start = min([d.lineno for d in child.decorator_list] + [child.lineno])
                        functions[f"{rel}:{name}"] = (child.end_lineno or start) - start + 1
                    visit(child, name + ".")

        visit(ast.parse(text), "")
    return modules, functions


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=600)
    parser.add_argument("--functions", type=int, default=100)
    parser.add_argument("--top", type=int, default=5, help="also list the N largest of each")
    args = parser.parse_args()
    modules, functions = sizes(PACKAGE)
    over = [f"module {m}: {n} lines" for m, n in modules.items() if n > args.modules]
    over += [f"function {f}: {n} lines" for f, n in functions.items() if n > args.functions]
    for title, table in (("modules", modules), ("functions", functions)):
        print(f"largest {title}:")
        for name, n in sorted(table.items(), key=lambda kv: -kv[1])[: args.top]:
            print(f"  {n:5d}  {name}")
    for line in over:
        print(f"over budget: {line}")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
