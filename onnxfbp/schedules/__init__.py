"""The schedules that refine a model's layers on a data split.

- :mod:`.state`: :class:`ModelState` (weights, forward, scores, set-weights) and
  :class:`RunContext` (the split, the best score, the reports);
- :mod:`.minibatch`: every layer together, preconditioned mini-batch steps (default);
- :mod:`.sweeps`: full-pass least-squares sweeps, jacobi or sequential.
"""
