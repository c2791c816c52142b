"""What a run gives back: the results (:mod:`.results`), their summaries
(:mod:`.summary`), the patched ONNX file (:mod:`.patch`) and the JSON / HTML
report (:mod:`.report`)."""
