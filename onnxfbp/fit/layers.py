"""Layers as least-squares blocks: rows ``X`` and targets ``T`` from activations,
weights to and from the solver's layout ``(groups, d_in [+1 bias row], d_out)``.

- dense (Gemm ``alpha x B' + beta C``, MatMul ``x W`` (+ Add b)):
  ``X = x`` (leading axes flattened), ``W_eff = alpha B'``, bias row ``beta C``.
- conv: ``X`` = im2col patches per group (a random subset of output positions
  per sample, so the Gram cost does not grow with the image area), weights
  ``W[g]`` of shape (C_in/g * kh * kw, C_out/g), bias row per group.
- ConvTranspose (one group): the stride-1 Conv it equals
  (:func:`onnxfbp.rules.convtranspose.as_conv`: the input dilated by the strides
  and padded by ``d (k - 1) - p``, the kernel flipped and in/out-swapped); its rows
  are that Conv's, the solved kernel goes back in ConvTranspose layout.

A bias that cannot be refined (absent, or shaped so that it broadcasts) stays
fixed: it is subtracted from the target and gets no row.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..graph.plan import Layer
from ..rules import Array, NodeView, xp_of
from ..rules.convtranspose import as_conv, from_conv_kernel, to_conv_kernel
from ..rules.linear import ConvGeometry, ConvRule, dense_weight, gather_patches, im2col

__all__ = ["LayerBlock", "gather_patches", "kept_positions"]


def kept_positions(
    rng: np.random.Generator | None, positions: int, max_positions: int
) -> np.ndarray | None:
    """``max_positions`` of a convolution's ``positions`` output positions, drawn
    without replacement and sorted (the same for every sample of a batch); None
    (all of them) without ``rng`` or when there are not more than that."""
    if rng is None or positions <= max_positions:
        return None
    return np.sort(rng.choice(positions, size=max_positions, replace=False))


@dataclass
class LayerBlock:
    """One layer's view for the solver, built from its current node view."""

    layer: Layer
    view: NodeView
    bias_value: np.ndarray | None  # current bias (raw tensor value), if refinable
    fixed_bias: np.ndarray | None  # bias that is not refined, per output channel

    @property
    def groups(self) -> int:
        return int(self.view.attr("group")) if self.layer.op == "Conv" else 1

    @property
    def transposed(self) -> bool:
        return self.layer.op == "ConvTranspose"

    def conv_input(self, x: Array) -> tuple[Array, ConvGeometry]:
        """The input and geometry of the Conv this layer is (a ConvTranspose: the
        equivalent stride-1 Conv's)."""
        if self.transposed:
            return as_conv(self.view, x)
        return x, ConvRule().geometry(self.view, x.shape)

    def _kernel(self) -> np.ndarray:
        """The layer's kernel as a Conv's (C_out, C_in/g, kh, kw)."""
        w = np.asarray(self.view.const(1), dtype=np.float64)
        return to_conv_kernel(w) if self.transposed else w

    @property
    def has_bias_row(self) -> bool:
        return self.bias_value is not None

    def effective_bias(self) -> np.ndarray | None:
        if self.bias_value is None:
            return None
        b = np.asarray(self.bias_value, dtype=np.float64).reshape(-1)
        if self.layer.op == "Gemm" and self.layer.bias_add_node is None:
            b = b * float(self.view.attr("beta"))
        return b

    def weights(self) -> np.ndarray:
        """Current weights in solver layout (G, d_in [+1], d_out), float64."""
        if self.layer.kind == "dense":
            blocks = dense_weight(self.view).astype(np.float64)[None]
        else:
            w = self._kernel()
            g = self.groups
            cout = w.shape[0]
            blocks = w.reshape(g, cout // g, -1).transpose(0, 2, 1)
        b = self.effective_bias()
        if b is not None:
            bias_rows = b.reshape(blocks.shape[0], 1, blocks.shape[2])
            blocks = np.concatenate([blocks, bias_rows], axis=1)
        return blocks

    def split(self, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Solver layout back to (weight tensor value, bias tensor value)."""
        bias = None
        if self.has_bias_row:
            bias_eff = blocks[:, -1, :].reshape(-1)
            blocks = blocks[:, :-1, :]
            if self.layer.op == "Gemm" and self.layer.bias_add_node is None:
                bias_eff = bias_eff / float(self.view.attr("beta"))
            bias = bias_eff
        if self.layer.kind == "dense":
            w_eff = blocks[0]
            if self.layer.op == "Gemm":
                w_eff = w_eff / float(self.view.attr("alpha"))
                if self.view.attr("transB"):
                    w_eff = w_eff.T
            return w_eff, bias
        w_shape = self._kernel().shape
        w = blocks.transpose(0, 2, 1).reshape(w_shape)
        return (from_conv_kernel(w) if self.transposed else w), bias

    def rows(
        self,
        x: Array,
        t: Array,
        rng: np.random.Generator | None,
        max_positions: int,
        residual: bool = False,
    ) -> tuple[Array, Array]:
        """Rows (G, n, d[+1]) and targets (G, n, k) for one batch; with ``residual``,
        ``t`` is a target residual (no fixed bias to take off)."""
        xp = xp_of(x)
        if self.layer.kind == "dense":
            d_in = x.shape[-1]
            xr = x.reshape(-1, d_in)[None]
            tr = t.reshape(-1, t.shape[-1])[None]
            return self._finish(xr, tr, residual)
        out_hw = (t.shape[2], t.shape[3])
        tr = t.reshape(t.shape[0], t.shape[1], -1)
        keep = kept_positions(rng, out_hw[0] * out_hw[1], max_positions)
        if keep is None:
            xr = im2col(*self.conv_input(x))
            return self._finish(xr, self._conv_targets(tr), residual)
        # (the positions are picked before any copy of the full maps)
        return self.rows_at(x, tr[:, :, xp.asarray(keep)], keep, out_hw, residual)

    def rows_at(
        self, x: Array, t: Array, keep: np.ndarray, out_hw: tuple[int, int],
        residual: bool = False,
    ) -> tuple[Array, Array]:
        """A convolution's rows at the output positions ``keep`` (flat indices into
        the ``out_hw`` grid, the same for every sample) with targets ``t`` at them,
        (N, C_out, len(keep)); the result as :meth:`rows`."""
        xr = self._patch_subset(*self.conv_input(x), keep, out_hw)
        return self._finish(xr, self._conv_targets(t), residual)

    def _conv_targets(self, t: Array) -> Array:
        """(N, C_out, P) targets to the solver's (G, N * P, C_out / G)."""
        g, (n, n_out) = self.groups, t.shape[:2]
        t = t.reshape(n, g, n_out // g, -1).transpose(1, 0, 3, 2)
        return t.reshape(g, -1, n_out // g)

    def _finish(self, xr: Array, tr: Array, residual: bool) -> tuple[Array, Array]:
        """Targets in float32 less the fixed bias (unless ``residual``), and the
        rows' bias column."""
        xp = xp_of(xr)
        tr = xp.asarray(tr, dtype=xp.float32)
        if self.fixed_bias is not None and not residual:
            fb = xp.asarray(self.fixed_bias, dtype=xp.float32).reshape(tr.shape[0], 1, -1)
            tr = tr - fb
        if self.has_bias_row:
            ones = xp.ones((*xr.shape[:2], 1), dtype=xr.dtype)
            xr = xp.concatenate([xr, ones], axis=2)
        return xr, tr

    @staticmethod
    def _patch_subset(
        x: Array, g: ConvGeometry, keep: np.ndarray, out_hw: tuple[int, int]
    ) -> Array:
        """The im2col rows of the output positions ``keep`` (flat indices into the
        ``out_hw`` grid): (G, N * len(keep), Cg * kh * kw), rows ordered (n, p).

        One ``take`` of precomputed flat offsets (:func:`gather_patches`). Fancy
        indexing of a strided window view of the padded input made the rows of
        the shared CNN's conv2 (100 samples, 16 positions, 32 x 3 x 3) take 5.0 ms;
        with this they take 1.4 ms."""
        n, c = x.shape[:2]
        picked = gather_patches(x, g, keep, out_hw)  # N, P, C, kh * kw
        groups = g.group
        picked = picked.reshape(n, len(keep), groups, c // groups, -1)
        return picked.transpose(2, 0, 1, 3, 4).reshape(groups, n * len(keep), -1)
