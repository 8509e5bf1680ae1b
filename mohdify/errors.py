"""Exceptions raised by mohdify. Every message names what was passed and what is required."""

__all__ = ["MohdifyError", "ConfigError", "CaptureError", "UnsupportedModelError", "InputError"]


class MohdifyError(Exception):
    """Base class of every mohdify error."""


class ConfigError(MohdifyError, ValueError):
    """A MoHDConfig field, or the config against a model, is invalid."""


class InputError(MohdifyError, ValueError):
    """example_inputs are missing or do not fit the model."""


class CaptureError(MohdifyError, RuntimeError):
    """Every capture front-end failed on the model; the message lists each and why."""


class UnsupportedModelError(MohdifyError, ValueError):
    """The model has nothing MoHD can rewrite (no residual branches), or is already mohdified."""
