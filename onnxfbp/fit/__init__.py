"""Fitting one layer's weights: the output layer's logistic-regression solve
(:mod:`.head`) and the least-squares sweeps' normal equations (:mod:`.normal`).
The solvers themselves are in :mod:`onnxfbp.solve`, the label targets in
:mod:`onnxfbp.targets`, a layer's rows in :mod:`onnxfbp.layers`."""
