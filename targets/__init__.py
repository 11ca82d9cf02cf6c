"""Per-target build and packaging (installed as `aqlm_compile.targets`). Filled by the kernels issue."""
