"""Graph passes over exported programs (installed as `aqlm_compile.passes`). Filled by the export issues."""
