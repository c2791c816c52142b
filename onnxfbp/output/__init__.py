"""What a run gives back: the results (:mod:`.results`), their summaries
(:mod:`.summary`, and in words :mod:`.outcome`), the patched ONNX file
(:mod:`.patch`) and the JSON / HTML report (:mod:`.report`)."""
