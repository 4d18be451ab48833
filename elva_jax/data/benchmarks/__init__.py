"""Benchmark and data-set readers (M-BEIR, NLI, MMEB-V2) and the generators of the bundled synthetic sets."""
