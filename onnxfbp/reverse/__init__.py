"""Carrying targets and residuals back from the logits to the refined layers.

- :mod:`.arrays`: the reference pass, each node's inverse rule or its
  linearization in NumPy (CuPy on a GPU);
- :mod:`.adjoint`: the same linearized pass compiled as one onnxruntime graph;
- :mod:`.kept_branch`: the deepest convolution's residual at its kept
  positions only;
- :mod:`.select`: which of them a minibatch run uses, and why.
"""

from .arrays import reverse, reverse_target
from .select import KeptRoute, ReverseChoice, choose_reverse, kept_route

__all__ = ["KeptRoute", "ReverseChoice", "choose_reverse", "kept_route", "reverse",
           "reverse_target"]
