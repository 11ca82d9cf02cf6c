"""Errors a user can act on: each names the file or field and what was expected."""


class AqlmError(Exception):
    """Base class; the CLI prints these as one line and exits with status 2."""


class ConfigError(AqlmError):
    """A bad AQLM config string or quantization_config field."""


class FormatError(AqlmError):
    """A checkpoint file or tensor that does not match the HF AQLM format."""


class ModelError(AqlmError):
    """A missing or unusable model directory."""


class DataError(AqlmError):
    """A missing or unusable dataset."""
