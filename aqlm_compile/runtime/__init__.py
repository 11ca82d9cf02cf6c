"""Loading built artifacts with runtimes only (no torch, no TVM compiler)."""
