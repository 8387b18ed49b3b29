"""Hypatia's benchmark suite: ``python -m benchmarks`` (``--quick`` for a CPU smoke run)."""
