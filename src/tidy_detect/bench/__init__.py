"""Benchmarks on real-size architectures with random weights (``tidy-detect bench``)."""
