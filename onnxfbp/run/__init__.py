"""Running the model: onnxruntime sessions (:mod:`.forward`), the array module
(:mod:`.backend`: NumPy or CuPy) and the hand-off of outputs to the device
(:mod:`.device`)."""
