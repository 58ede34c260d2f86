"""Benchmarks: performance is measured here, against a baseline run side by side."""
