"""No silent surprises: checks and one-time warnings that the API and the backend share.

- `warn_once`: a UserWarning the first time a message key is seen in this process (the
  untrained-router note, the backend's default rewrite), not once per call.
- `mark_demohdified` / `from_demohdified_model`: `demohdify()` tags the Parameters it puts back,
  so that the backend, handed a dense graph of such a model (a `torch.compile` wrapper made while
  the model was mohdified recompiles after `demohdify`), compiles it dense instead of rewriting it
  with default settings. The tag is an attribute on the Parameter objects; copies do not carry it.
- `check_filter_fn`: a `filter_fn` that cannot be called as `filter_fn(module, qualified_name)`
  is refused before anything runs.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from .errors import ConfigError

__all__ = ["warn_once", "reset_warn_once", "mark_demohdified", "from_demohdified_model", "check_filter_fn"]

DEMOHDIFIED = "_mohd_demohdified"
_warned: set[str] = set()   # message keys warned about in this process


def warn_once(message: str, *, key: str | None = None, stacklevel: int = 2) -> None:
    """`warnings.warn(message, UserWarning)` unless `key` (default: the message) was warned before."""
    key = message if key is None else key
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


def reset_warn_once() -> None:
    """Forget which warnings were given (for tests)."""
    _warned.clear()


def mark_demohdified(params: Iterable[torch.Tensor]) -> None:
    for p in params:
        setattr(p, DEMOHDIFIED, True)


def from_demohdified_model(example_inputs: Iterable[Any]) -> bool:
    """Whether a dynamo graph's inputs hold Parameters that `demohdify()` put back."""
    return any(isinstance(t, torch.Tensor) and getattr(t, DEMOHDIFIED, False) for t in example_inputs)


def check_filter_fn(filter_fn: Any) -> None:
    """Raise ConfigError unless `filter_fn` is None or callable as `filter_fn(module, qualified_name)`."""
    if filter_fn is None:
        return
    if not callable(filter_fn):
        raise ConfigError(f"filter_fn must be a function filter_fn(module, qualified_name) -> bool, got "
                          f"{type(filter_fn).__name__}: {filter_fn!r}.")
    try:
        signature = inspect.signature(filter_fn)
    except (TypeError, ValueError):
        return   # builtins without a signature: called as they are
    try:
        signature.bind(torch.nn.Identity(), "name")
    except TypeError as e:
        name = getattr(filter_fn, "__qualname__", repr(filter_fn))
        raise ConfigError(f"filter_fn must take two arguments, filter_fn(module, qualified_name) -> bool; "
                          f"{name}{signature} cannot be called that way ({e}).") from None
