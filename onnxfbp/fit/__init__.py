"""Fitting one layer's weights: the output layer's logistic-regression solve
(:mod:`.head`) and the least-squares sweeps' normal equations (:mod:`.normal`).
The solvers themselves are in :mod:`onnxfbp.fit.solve`, the label targets in
:mod:`onnxfbp.fit.targets`, a layer's rows in :mod:`onnxfbp.fit.layers`."""
