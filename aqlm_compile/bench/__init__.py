"""Benchmarks that report same-run ratios against baselines (`aqlm-compile bench`)."""
