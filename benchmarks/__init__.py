"""Benchmarks of ClusTR training and evaluation against plain cross-entropy training:
``python -m benchmarks.run`` (R1-R4, the seed's command; docs/benchmarking.md)."""
