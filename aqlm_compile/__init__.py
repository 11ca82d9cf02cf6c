"""aqlm-compile: AQLM quantization and export toolchain."""

__version__ = "0.1.0"
