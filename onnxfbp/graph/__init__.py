"""The model as onnxfbp sees it: loaded and checked (:mod:`.load`), planned
(:mod:`.plan`: which layers refine, which nodes carry targets, and why) and
listed for a user (:mod:`.inspect`, which needs nothing else)."""
