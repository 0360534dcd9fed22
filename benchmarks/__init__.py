"""Benchmarks of ClusTR training and evaluation against plain cross-entropy training.

``python -m benchmarks.run`` measures the ratios R1-R4 and the epoch scaling on whatever
device is present and writes ``docs/results/BENCHMARKS.md``. Nothing here runs at import time.
"""
