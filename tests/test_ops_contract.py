"""The op table's contract, one walk over every entry (``onnxfbp.rules.RULES``):

1. each ``vjp`` is the transposed Jacobian of its ``forward``: the adjoint
   identity ``<J v, r> = <v, J^T r>`` on random float64 inputs, with ``J v`` a
   central difference of ``forward``, independent of the ``vjp`` under test;
2. each ONNX adjoint emitter, run by onnxruntime, equals its ``vjp``;
3. each sparse form (``sparse_vjp`` at a few positions) equals the dense ``vjp``
   at those positions;
4. a slot the table does not fill fails naming the slot, op, opset and node.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from test_adjoint import CPU, _check_emitter
from test_rules import SPECS, Spec, _inputs, _view

from onnxfbp.graph.plan import PlanNode
from onnxfbp.reverse.adjoint import AdjointGraph
from onnxfbp.reverse.arrays import reverse
from onnxfbp.rules import RULES, InverseRule, MissingSlot, NodeView, fills

# forms the emitter declines (the NumPy pass runs): strided slices
DECLINED = {"slice-steps"}


def test_every_entry_has_a_spec() -> None:
    assert set(RULES) <= {s.op for s in SPECS}


@pytest.mark.parametrize("spec", SPECS, ids=[s.id for s in SPECS])
def test_vjp_is_the_transposed_jacobian(spec: Spec) -> None:
    """``<J v, r> = <v, J^T r>`` in float64; ``J v = (f(x + h v) - f(x - h v)) / 2h``
    (error ``O(h^2)`` plus rounding ``O(eps / h)``: about 1e-10 relative here)."""
    rule, view = RULES[spec.op], _view(spec)
    g = np.random.default_rng(5)
    xs = [x.astype(np.float64) for x in _inputs(spec)]
    multi = rule.multi_output  # Split: one residual per output, the second one absent
    o0 = rule.forward(view, xs)
    outs = o0 if multi else [o0]
    rs: list[Any] = [g.standard_normal(o.shape) for o in outs]
    if multi:
        rs[1] = None
    pos = [view.dynamic.index(i) for i in rule.data_inputs(view)]
    got = rule.vjp(view, rs if multi else rs[0], [xs[p] for p in pos], o0)
    assert [d.shape for d in got] == [xs[p].shape for p in pos]
    v = [g.standard_normal(xs[p].shape) for p in pos]
    h = 1e-6

    def moved(sign: float) -> list[np.ndarray]:
        new = list(xs)
        for p, vp in zip(pos, v, strict=True):
            new[p] = xs[p] + sign * h * vp
        out = rule.forward(view, new)
        return [np.asarray(o, dtype=np.float64) for o in (out if multi else [out])]

    jv = [(a - b) / (2 * h) for a, b in zip(moved(1.0), moved(-1.0), strict=True)]
    pairs = [(r, j) for r, j in zip(rs, jv, strict=True) if r is not None]
    lhs = sum(float((r * j).sum()) for r, j in pairs)
    rhs = sum(float((np.asarray(d, np.float64) * vp).sum()) for d, vp in zip(got, v, strict=True))
    scale = sum(float(np.abs(r * j).sum()) for r, j in pairs)
    assert abs(lhs - rhs) <= 1e-7 * max(1.0, scale), (lhs, rhs)


EMITTED = [s for s in SPECS if fills(RULES[s.op], "emit_adjoint")
           and not RULES[s.op].multi_output]
MULTI = [s for s in SPECS if RULES[s.op].multi_output]


def test_every_entry_has_an_emitter() -> None:
    assert {s.op for s in EMITTED + MULTI} == set(RULES)
    assert all(fills(RULES[s.op], "emit_adjoint") for s in MULTI)


@pytest.mark.parametrize("reached", ["all", "first"])
@pytest.mark.parametrize("spec", MULTI, ids=[s.id for s in MULTI])
def test_multi_output_emitter_matches_vjp(spec: Spec, reached: str) -> None:
    """A node with several outputs (Split), followed by a Concat of its outputs in
    reverse order (every output gets a residual), or alone with only its first
    output reached (the others' residuals are zeros): the compiled pass equals the
    array pass, and both equal the residuals concatenated back."""
    rule, view = RULES[spec.op], _view(spec)
    xs = _inputs(spec)
    names = [f"in{i}" for i in range(spec.n_inputs)]
    parts = rule.forward(view, xs)
    onames = [f"out{k}" for k in range(len(parts))]
    axis = int(view.attr("axis")) % xs[0].ndim
    node = PlanNode(view.name, spec.op, names, onames, view, rule.data_inputs(view),
                    {i: names[i] for i in spec.consts})
    acts: dict[str, np.ndarray] = {names[0]: xs[0], **dict(zip(onames, parts, strict=True))}
    views: dict[str, NodeView] = {view.name: view}
    nodes, logits = [node], onames[0]
    if reached == "all":
        cat = NodeView("Concat", "cat", {"axis": axis}, {}, tuple(range(len(parts))),
                       len(parts), 13)
        nodes.append(PlanNode("cat", "Concat", onames[::-1], ["cat"], cat,
                              tuple(range(len(parts))), {}))
        views["cat"], logits = cat, "cat"
        acts["cat"] = np.concatenate(parts[::-1], axis=axis)
    plan: Any = SimpleNamespace(logits=logits, nodes=nodes)
    path = list(range(len(nodes)))
    r = np.random.default_rng(3).standard_normal(acts[logits].shape).astype(np.float32)
    built = AdjointGraph.build(plan, path, [names[0]], acts, views, CPU)
    got = built.run(acts, r, views)[names[0]]
    sums, _ = reverse(plan, acts, acts[logits] + r, path, views, 0.0, linearized=True)
    np.testing.assert_allclose(got, sums[names[0]], rtol=0, atol=1e-5)
    if reached == "all":  # the reversed halves, put back in order
        cuts = np.cumsum([p.shape[axis] for p in parts[::-1]])[:-1]
        want = np.concatenate(np.split(r, cuts, axis=axis)[::-1], axis=axis)
    else:
        want = np.zeros_like(xs[0])
        want[tuple(slice(0, s) for s in r.shape)] = r
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("spec", EMITTED, ids=[s.id for s in EMITTED])
def test_emitter_matches_vjp(spec: Spec) -> None:
    """The emitted graph, alone, run by onnxruntime: the rule's ``vjp`` up to float32
    rounding (or, for a form it does not cover, declined by name)."""
    built = _check_emitter(spec, frozenset())
    assert isinstance(built, str) == (spec.id in DECLINED)


_S = np.random.default_rng(11)


def _w(*shape: int) -> np.ndarray:
    return _S.standard_normal(shape).astype(np.float32)


SPARSE = [  # 4-D inputs (N, C, H, W): the sparse forms work on spatial positions
    Spec("Relu", [(2, 3, 5, 6)], id="relu"),
    Spec("LeakyRelu", [(2, 3, 5, 6)], attrs={"alpha": 0.2}, id="leakyrelu"),
    Spec("Identity", [(2, 3, 5, 6)], id="identity"),
    Spec("Dropout", [(2, 3, 5, 6)], id="dropout"),
    Spec("BatchNormalization", [(2, 3, 5, 6)],
         {1: _w(3), 2: _w(3), 3: _w(3), 4: np.abs(_w(3)) + 0.1}, id="batchnorm"),
    Spec("MaxPool", [(2, 3, 8, 8)], attrs={"kernel_shape": [2, 2], "strides": [2, 2]},
         id="maxpool"),
    Spec("MaxPool", [(2, 3, 7, 9)], attrs={"kernel_shape": [2, 3], "strides": [2, 3]},
         id="maxpool-2x3-leftover"),
    Spec("MaxPool", [(1, 2, 11, 11)], attrs={"kernel_shape": [2, 2], "strides": [3, 3]},
         id="maxpool-gaps"),
    Spec("Conv", [(2, 3, 7, 7)], {1: _w(4, 3, 3, 3), 2: _w(4)}, {"pads": [1, 1, 1, 1]},
         id="conv-pad"),
    Spec("Conv", [(2, 2, 9, 8)], {1: _w(5, 2, 3, 2)}, {"dilations": [2, 1], "pads": [2, 1, 1, 0]},
         id="conv-dilated-asymmetric"),
]


def test_every_sparse_form_has_a_spec() -> None:
    """Every op with a sparse form has a spec here; the others of its rule decline."""
    covered = {s.op for s in SPARSE}
    for op, rule in RULES.items():
        if fills(rule, "sparse_vjp") and op not in covered:
            assert rule.sparse_check(NodeView(op, "n"), (1, 1, 4, 4)) is not None, op


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "tied"])
@pytest.mark.parametrize("spec", SPARSE, ids=[s.id for s in SPARSE])
def test_sparse_form_matches_dense_vjp(spec: Spec, ties: bool) -> None:
    """At random positions (and all of them) of the input grid: ``sparse_vjp``, fed
    the output residual where the positions land (a convolution: all of it), equals
    the dense ``vjp`` there. ``tied``: values on a coarse grid with constant blocks,
    so that pooling windows hold tied maxima (routed to the first one)."""
    rule, view = RULES[spec.op], _view(spec)
    x = _inputs(spec)[0]
    if ties:
        x = np.round(x) / 2
        x[:, :, 1:5, 2:6] = 0.5
    assert rule.sparse_check(view, x.shape) is None
    o0 = rule.forward(view, [x])
    r = np.random.default_rng(3).standard_normal(o0.shape).astype(np.float32)
    (dense,) = rule.vjp(view, r, [x], o0)
    n, c, h, w = x.shape
    grid = (h, w)
    fwd: Any = {"input": x, "output": o0, "": None}[rule.sparse_reads]
    g = np.random.default_rng(4)
    for pos in (np.arange(h * w), np.sort(g.choice(h * w, size=7, replace=False))):
        landed, _ = rule.land(view, grid, pos)
        r_at = r if spec.op == "Conv" else r.reshape(n, r.shape[1], -1)[:, :, landed]
        got = rule.sparse_vjp(view, r_at, pos, grid, fwd)
        want = dense.reshape(n, c, -1)[:, :, pos]
        assert np.count_nonzero(want) > 0
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_sparse_form_declines_what_it_does_not_cover() -> None:
    view = _view(Spec("MaxPool", [(1, 1, 8, 8)],
                      attrs={"kernel_shape": [3, 3], "strides": [2, 2]}, id="overlap"))
    assert RULES["MaxPool"].sparse_check(view, (1, 1, 8, 8)) is not None
    conv = _view(Spec("Conv", [(1, 3, 8, 8)], {1: _w(2, 3, 3, 3)}, {"strides": [2, 2]},
                      id="strided"))
    assert RULES["Conv"].sparse_check(conv, (1, 3, 8, 8)) is not None
    assert not fills(RULES["Sigmoid"], "sparse_vjp")


def test_missing_slot_names_op_opset_and_node() -> None:
    view = NodeView("LeakyRelu", "act7", opset=16)
    assert view.attr("alpha") == 0.01  # the table's default
    with pytest.raises(MissingSlot, match=r"LeakyRelu \(opset 16\), node 'act7'.*'beta'"):
        view.attr("beta")

    class NoReverse(InverseRule):
        op_types = ("Made",)

        def forward(self, node: NodeView, xs: Any) -> Any:
            return xs[0]

    made = NodeView("Made", "m1", opset=9)
    x = np.ones(3)
    with pytest.raises(MissingSlot, match=r"Made \(opset 9\), node 'm1'.*vjp"):
        NoReverse().vjp(made, x, [x], x)
    with pytest.raises(MissingSlot, match="onnx adjoint emitter"):
        NoReverse().emit_adjoint(Any, made, "r", ["x"], "o")  # type: ignore[arg-type]
    assert not fills(NoReverse(), "emit_adjoint")


def test_compiled_pass_runs_other_batch_sizes_when_batch_is_not_first() -> None:
    """Attention's stacked q, k, v (3, N, ...) picked by a Gather on axis 0: the
    graph built on one batch size runs another (the batch axis is symbolic
    wherever it sits) and equals the array pass."""
    view = NodeView("Gather", "pick", {"axis": 0}, {1: np.array(1, np.int64)}, (0,), 2, 13)
    node = PlanNode("pick", "Gather", ["qkv", "idx"], ["k"], view, (0,), {1: "idx"})
    plan: Any = SimpleNamespace(logits="k", nodes=[node])
    g = np.random.default_rng(0)

    def acts(n: int) -> dict[str, np.ndarray]:
        qkv = g.standard_normal((3, n, 4)).astype(np.float32)
        return {"qkv": qkv, "k": qkv[1]}

    built = AdjointGraph.build(plan, [0], ["qkv"], acts(5), {"pick": view}, CPU)
    other = acts(2)
    r = g.standard_normal((2, 4)).astype(np.float32)
    got = built.run(other, r, {"pick": view})["qkv"]
    sums, _ = reverse(plan, other, other["k"] + r, [0], {"pick": view}, 0.0, linearized=True)
    np.testing.assert_allclose(got, sums["qkv"], rtol=0, atol=1e-6)
    assert got.shape == (3, 2, 4) and np.abs(got[[0, 2]]).max() == 0
