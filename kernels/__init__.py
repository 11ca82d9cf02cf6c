"""TVM kernel schedules for AQLM layers (installed as `aqlm_compile.kernels`). Filled by the kernels issue."""
