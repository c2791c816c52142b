"""``onnxfbp inspect``: every node's op, its inverse rule (or why it has none),
its weights, and which layers a refine run would change."""

from __future__ import annotations

import os
from typing import Any

from .graph import load_model, plan_model

__all__ = ["inspect_model", "render_table"]


def inspect_model(path: str | os.PathLike[str], deep: bool = False) -> dict[str, Any]:
    """A JSON-able description of the model as onnxfbp sees it."""
    from .refine import RefineConfig, Refiner  # noqa: PLC0415

    model = load_model(path)
    plan = plan_model(model)
    refiner = Refiner(path, RefineConfig(device="cpu", invert_convs=deep))
    refined = {layer.name for layer in refiner.layers}
    layers = {layer.name: layer for layer in plan.layers}
    inits = {t.name: list(t.dims) for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        name = node.name
        status = next((s for n, op, s in plan.all_nodes if n == name), "")
        weights = {i: inits[i] for i in node.input if i in inits}
        layer = layers.get(name)
        nodes.append({
            "name": name, "op": node.op_type, "rule": status,
            "weights": weights,
            "refined": name in refined,
            "why_not": None if layer is None or name in refined
            else (layer.reason or refiner.skipped.get(name)),
        })
    return {
        "model": str(path),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opset": plan.opset,
        "input": {"name": plan.input_name, "shape": plan.input_shape},
        "output": {"name": plan.output_name, "kind": plan.output_kind, "logits": plan.logits,
                   "classes": plan.n_classes},
        "batch": "dynamic" if refiner.runner.chunk is None else f"fixed {refiner.runner.chunk}",
        "boundaries": plan.boundaries,
        "refined_layers": [layer.name for layer in refiner.layers],
        "nodes": nodes,
    }


def render_table(info: dict[str, Any]) -> None:
    """Print ``info`` as a table (rich)."""
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    console = Console()
    console.print(f"[bold]{info['model']}[/]  producer: {info['producer'] or '?'}  opset {info['opset']}")
    console.print(f"input {info['input']['name']} {info['input']['shape']}  "
                  f"output {info['output']['name']} ({info['output']['kind']}, "
                  f"{info['output']['classes']} classes)  batch: {info['batch']}")
    table = Table(show_lines=False)
    for col in ("node", "op", "rule", "weights", "refined"):
        table.add_column(col)
    for n in info["nodes"]:
        weights = ", ".join(f"{k}{v}" for k, v in n["weights"].items())
        refined = "yes" if n["refined"] else (n["why_not"] or "")
        table.add_row(n["name"], n["op"], n["rule"], weights, refined)
    console.print(table)
    if info["boundaries"]:
        console.print("[yellow]transitional boundaries (targets stop here; layers before them are "
                      "left alone):[/]")
        for b in info["boundaries"]:
            console.print(f"  {b}")
    console.print(f"would refine: {', '.join(info['refined_layers']) or 'nothing'}")
