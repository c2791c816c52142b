"""``onnxfbp inspect``: every node's op, its inverse rule (or why it has none),
its weights, and which layers a refine run would change.

:func:`inspect_model` returns a JSON-able dict (``onnxfbp inspect --json``):

- ``model``, ``producer``, ``opset``, ``input`` {name, shape} (the first data
  input), ``inputs`` (every data input, {name, shape}), ``output`` {name, kind,
  logits, classes}, ``batch`` (``dynamic`` or ``fixed N``);
- ``reverse_pass``: with ``--schedule minibatch``, how residuals would be carried
  back, from the plan alone (nothing is compiled): ``onnxruntime`` if every node
  on the reverse path has an ONNX adjoint (onnxruntime may still decline a form
  at run time; the report's ``environment.reverse_pass`` says what ran), or
  ``numpy (no onnx adjoint for OP)``; null otherwise;
- ``kept_branch``: with ``--schedule minibatch``, the deepest layer whose
  residual would be computed at its kept positions only
  (:mod:`onnxfbp.reverse.kept_branch`, found from the tensor shapes of one forward pass
  on a random batch), or null;
- ``refined_layers``: the node names a refine run with the same ``--schedule``
  and ``--deep`` would change, in the order it visits them (from the output back);
- ``layers``: every Conv/Gemm/MatMul on the reverse path, with ``kind``,
  ``quantized`` (a QDQ weight: {initializer, type, bits, granularity}, else null),
  ``weight`` {initializer, store, shape, via}, ``bias`` {initializer, store,
  shape, add_node} or null, ``refined`` and ``why_not``; ``store`` is where the
  value lives: ``initializer``, or ``constant`` (a Constant node's value, the
  ``initializer`` field then naming that node's output);
- ``boundaries``: nodes where targets stop, with the reason;
- ``nodes``: every node in graph order, with ``name``, ``op``, ``rule`` (the
  planner's status: ``rule`` = on the reverse path with an inverse rule,
  ``constant`` = computes a constant, ``not on the reverse path``, or the
  reason the node stops the targets), ``status`` (the same as one word:
  ``inverse``, ``constant``, ``off-path`` or ``boundary``), ``weights``
  (inputs stored as initializers or Constant nodes, and their shapes),
  ``tensors`` (those of them that are floating point, i.e. not shapes or axes),
  ``refined``, ``why_not``,
  ``weight_of`` (the layer whose weight this node reshapes/transposes, if any)
  and ``note`` (e.g. for a Softmax after the logits);
- ``summary``: node counts per status.

Unnamed nodes are named as everywhere else (:func:`onnxfbp.graph.plan.node_names`):
``<op>#<k>``, the ``k``-th (from 0) node of that op type in graph order, e.g.
``Conv#3``.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Any

import onnx

from .plan import node_names
from .weights import constant_values

if TYPE_CHECKING:
    from ..schedules.state import ModelState

__all__ = ["inspect_model", "render_table"]

STATUS_INVERSE, STATUS_CONSTANT, STATUS_OFF_PATH, STATUS_BOUNDARY = (
    "inverse", "constant", "off-path", "boundary")


def _status(rule: str) -> str:
    if rule == "rule":
        return STATUS_INVERSE
    if rule == "constant":
        return STATUS_CONSTANT
    if rule == "not on the reverse path" or not rule:
        return STATUS_OFF_PATH
    return STATUS_BOUNDARY


def _chain_nodes(tensor: str, producer: dict[str, Any], inits: set[str]) -> list[Any]:
    """Nodes between an initializer and ``tensor`` (Reshape/Transpose/... of a weight)."""
    out = []
    cursor = tensor
    while cursor and cursor not in inits and cursor in producer:
        node = producer[cursor]
        out.append(node)
        cursor = node.input[0] if node.input else ""
    return out


def _reverse_route(state: ModelState) -> tuple[str | None, str | None]:
    """The minibatch run's reverse pass, from the plan (nothing compiled), and the
    layer computed at its kept positions (shapes from one forward pass)."""
    from ..reverse.select import kept_route, plan_level_choice  # noqa: PLC0415

    if not state.layers:
        return None, None
    path, needed = state.reverse_plan(state.layers)
    route, kept = plan_level_choice(state.plan, path), None
    probe = state.runner.probe(2)
    if probe is None:
        return route, "decided at run time (the sample shape is symbolic)"
    try:
        acts = state.forward(probe, needed)
    except Exception as exc:  # a random batch the model rejects: say so, go on
        reason = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        return route, f"decided at run time (a random batch failed: {reason})"
    if kept_route(state.plan, state.layers, acts, path).branch is not None:
        kept = state.layers[-1].name
    return route, kept


def inspect_model(
    path: str | os.PathLike[str], deep: bool = False, schedule: str = "minibatch"
) -> dict[str, Any]:
    """A JSON-able description of the model as onnxfbp sees it (see the module doc)."""
    from ..config import RefineConfig  # noqa: PLC0415
    from ..schedules.state import ModelState  # noqa: PLC0415

    state = ModelState(path, RefineConfig.of(device="cpu", deep=deep, schedule=schedule))
    model, plan = state.model, state.plan
    refined = [layer.name for layer in state.layers]
    inits = {t.name: [int(d) for d in t.dims] for t in model.graph.initializer}
    float_inits = {t.name for t in model.graph.initializer
                   if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE,
                                      onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)}
    for name, value in constant_values(model).items():  # weights held by Constant nodes
        inits.setdefault(name, [int(d) for d in value.shape])
        if value.dtype.kind == "f":
            float_inits.add(name)
    producer = {out: node for node in model.graph.node for out in node.output}
    rule_of = {name: status for name, _, status in plan.all_nodes}

    layers: list[dict[str, Any]] = []
    weight_of: dict[str, str] = {}
    names = node_names(model)
    name_of = {id(node): name for node, name in zip(model.graph.node, names, strict=True)}
    for layer in plan.layers:
        via = _chain_nodes(layer.weight_tensor, producer, set(inits))
        for node in via:
            weight_of[name_of[id(node)]] = layer.name
        bias = None
        if layer.bias is not None:
            bias = {"initializer": layer.bias.initializer, "store": layer.bias.store,
                    "shape": inits.get(layer.bias.initializer),
                    "add_node": layer.bias_add_node}
        why_not = None
        if layer.name not in refined:
            why_not = layer.reason or state.skipped.get(layer.name) or "not refined"
        layers.append({
            "name": layer.name, "op": layer.op, "kind": layer.kind,
            "weight": {"initializer": layer.weight.initializer, "store": layer.weight.store,
                       "shape": inits.get(layer.weight.initializer),
                       "via": [node.op_type for node in reversed(via)]},
            "bias": bias, "refined": layer.name in refined, "why_not": why_not,
            "quantized": _quantized(state, layer.weight.initializer),
        })
    by_layer = {entry["name"]: entry for entry in layers}

    nodes: list[dict[str, Any]] = []
    summary = {s: 0 for s in (STATUS_INVERSE, STATUS_CONSTANT, STATUS_OFF_PATH,
                                         STATUS_BOUNDARY)}
    for name, node in zip(names, model.graph.node, strict=True):
        rule = rule_of.get(name, "")
        status = _status(rule)
        summary[status] += 1
        entry = by_layer.get(name)
        note = None
        if plan.logits != plan.output_name and plan.logits in node.input:
            note = "after the logits: the label target is set on its input"
        nodes.append({
            "name": name, "op": node.op_type, "rule": rule, "status": status,
            "weights": {i: inits[i] for i in node.input if i in inits},
            "tensors": [i for i in node.input if i in float_inits],
            "refined": name in refined,
            "why_not": None if entry is None else entry["why_not"],
            "weight_of": weight_of.get(name),
            "note": note,
        })
    reverse_pass, kept_branch = _reverse_route(state) if schedule == "minibatch" else (None, None)
    return {
        "model": str(path),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "opset": plan.opset,
        "input": {"name": plan.input_name, "shape": plan.input_shape},
        "inputs": [{"name": n, "shape": plan.input_shapes.get(n, plan.input_shape)}
                   for n in plan.input_names],
        "output": {"name": plan.output_name, "kind": plan.output_kind, "logits": plan.logits,
                   "classes": plan.n_classes},
        "batch": "dynamic" if state.runner.chunk is None else f"fixed {state.runner.chunk}",
        "deep": deep,
        "schedule": schedule,
        "reverse_pass": reverse_pass,
        "kept_branch": kept_branch,
        "boundaries": plan.boundaries,
        "refined_layers": refined,
        "layers": layers,
        "nodes": nodes,
        "summary": summary,
    }


def _quantized(state: ModelState, tensor: str) -> dict[str, Any] | None:
    """A QDQ weight's integer initializer, type, bit width and granularity."""
    qw = state.quant.weights.get(tensor)
    if qw is None:
        return None
    return {"initializer": qw.initializer, "type": qw.type_name, "bits": qw.bits,
            "granularity": qw.granularity}


def _shape(shape: list[int] | None) -> str:
    return "?" if shape is None else "×".join(str(d) for d in shape) or "scalar"


_STATUS_STYLE = {
    STATUS_INVERSE: ("inverse", "green"),
    STATUS_CONSTANT: ("constant", "dim"),
    STATUS_OFF_PATH: ("off path", "dim"),
    STATUS_BOUNDARY: ("stops here", "red"),
}


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def visible(value: Any) -> Any:
    """``value`` with every terminal control character in its strings (escape
    sequences, carriage returns, ...) written out as ``\\xNN``: names come from the
    model file and must not drive the terminal."""
    if isinstance(value, str):
        return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 256
                            else f"\\u{ord(m.group()):04x}", value)
    if isinstance(value, dict):
        return {visible(k): visible(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(visible(v) for v in value)
    return value


def render_table(info: dict[str, Any], console: Any = None) -> None:
    """Print ``info`` (from :func:`inspect_model`) as a table with rich; control
    characters in names are shown escaped (see :func:`visible`)."""
    info = visible(info)
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415
    from rich.text import Text  # noqa: PLC0415

    class _Console(Console):
        def on_broken_pipe(self) -> None:  # rich would exit 1; let the caller decide
            raise BrokenPipeError

    if console is None:
        console = _Console(highlight=False)
        if not console.is_terminal:  # a pipe or a file: do not squeeze into 80 columns
            console = _Console(highlight=False, width=max(console.width, 140))
    out = info["output"]
    console.print(Text.assemble((info["model"], "bold"),
                                f"  producer: {info['producer'] or '?'}  opset {info['opset']}"))
    ins = ", ".join(f"{i['name']} {i['shape']}" for i in info["inputs"])
    console.print(f"input {ins}  ->  output "
                  f"{out['name']} ({out['kind']}, {out['classes'] or '?'} classes)  "
                  f"batch: {info['batch']}", markup=False)
    layers = {entry["name"]: entry for entry in info.get("layers", [])}
    table = Table(show_lines=False, header_style="bold", pad_edge=False)
    table.add_column("#", justify="right", style="dim")
    table.add_column("node", overflow="fold")
    table.add_column("op")
    table.add_column("reverse rule", overflow="fold")
    table.add_column("weights", overflow="fold")
    table.add_column("refine", overflow="fold")
    for i, n in enumerate(info["nodes"]):
        status = n.get("status") or _status(n["rule"])
        label, style = _STATUS_STYLE[status]
        if status == STATUS_BOUNDARY:
            label = f"{label}: {n['rule']}"
        elif n.get("note"):
            label = f"{label} ({n['note'].split(':')[0]})"
        rule = Text(label, style=style)
        layer = layers.get(n["name"])
        if layer is not None:
            w = layer["weight"]
            weights = f"W {_shape(w['shape'])}"
            if w["via"]:
                weights += f" via {'+'.join(w['via'])}"
            if layer.get("quantized"):
                weights += f" [{layer['quantized']['type']} {layer['quantized']['granularity']}]"
            if layer["bias"] is not None:
                b = layer["bias"]
                weights += f", b {_shape(b['shape'])}"
                if b["add_node"]:
                    weights += " (Add)"
        else:  # float initializers only: integer inputs are shapes and axes
            weights = ", ".join(_shape(n["weights"][t]) for t in n.get("tensors", n["weights"]))
            if n.get("weight_of"):
                weights = f"{weights} → weight of {n['weight_of']}"
        if n["refined"]:
            refine = Text("yes", style="bold green")
        elif layer is not None:
            refine = Text(f"no: {n['why_not']}", style="yellow")
        else:
            refine = Text("")
        table.add_row(str(i), Text(n["name"] or "(unnamed)"), n["op"], rule, Text(weights), refine)
    console.print(table)
    summary = info.get("summary")
    if summary:
        console.print(f"{len(info['nodes'])} nodes: {summary[STATUS_INVERSE]} with an inverse "
                      f"rule on the reverse path, {summary[STATUS_CONSTANT]} constant, "
                      f"{summary[STATUS_OFF_PATH]} off the path, {summary[STATUS_BOUNDARY]} "
                      "stopping the targets", markup=False)
    if info["boundaries"]:
        console.print("[yellow]transitional boundaries (targets stop here; layers before them "
                      "are left alone):[/]")
        for b in info["boundaries"]:
            console.print(f"  {b}", markup=False)
    refined = info["refined_layers"]
    console.print(Text.assemble("would refine: ", (", ".join(refined) or "nothing", "bold")))
    if info.get("reverse_pass"):
        console.print(f"reverse pass: {info['reverse_pass']}", markup=False)
    if info.get("kept_branch"):
        console.print(f"at its kept positions only: {info['kept_branch']}", markup=False)
    if not info.get("deep") and any(
            (entry["why_not"] or "").endswith("(enable: --deep)") for entry in layers.values()):
        console.print("(more with --deep: layers whose targets pass a Conv inverse)", style="dim")
