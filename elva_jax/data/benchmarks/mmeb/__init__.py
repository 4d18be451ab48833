"""MMEB-V2 (VLM2Vec's benchmark): the reader (:mod:`.reader`) and the bundled MMEB-format set (:mod:`.bundled`)."""
