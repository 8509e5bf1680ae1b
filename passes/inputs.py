"""Inputs: a model's example_inputs normalised to (args, kwargs), described, and run once eagerly.

Used by every entry point that runs the user's model on example inputs (api, calibrate, flow, capture):
bad inputs fail here, once, with a message naming what was passed and what is required. The
calibration passes (calibrate, rebasis.energy_order, flow) run their batches with `run_batches`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mohdify.errors import InputError

__all__ = ["describe_inputs", "normalize_inputs", "run_eager", "run_batches"]


def describe_inputs(example_inputs: Any) -> str:
    """A short description of example_inputs for error messages."""
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"Tensor{tuple(v.shape)}:{str(v.dtype).replace('torch.', '')}"
        return type(v).__name__
    if isinstance(example_inputs, dict):
        return "{" + ", ".join(f"{k!r}: {one(v)}" for k, v in example_inputs.items()) + "}"
    if isinstance(example_inputs, (tuple, list)):
        return "(" + ", ".join(one(v) for v in example_inputs) + ")"
    return one(example_inputs)


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def normalize_inputs(model: nn.Module, example_inputs: Any) -> tuple[tuple, dict]:
    """example_inputs -> (args, kwargs). HF-style models get `use_cache=False` unless given."""
    if example_inputs is None:
        raise InputError(
            "example_inputs is required: pass a tuple of positional arguments or a dict of keyword "
            "arguments that the model's forward accepts, e.g. (input_ids,) or {'input_ids': input_ids}.")
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, tuple):
        args, kwargs = example_inputs, {}
    elif isinstance(example_inputs, list):
        args, kwargs = tuple(example_inputs), {}
    elif isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    else:
        raise InputError(
            f"example_inputs must be a tuple of positional arguments or a dict of keyword arguments, "
            f"got {type(example_inputs).__name__}: {describe_inputs(example_inputs)}.")
    if not any(isinstance(v, torch.Tensor) for v in (*args, *kwargs.values())):
        raise InputError(
            f"example_inputs must contain at least one tensor, got {describe_inputs(example_inputs)}.")
    if "use_cache" not in kwargs and _accepts(model, "use_cache"):
        kwargs["use_cache"] = False
    return args, kwargs


def run_eager(model: nn.Module, args: tuple, kwargs: dict, example_inputs: Any) -> list[str]:
    """Run the model once on the inputs; wrong inputs fail here with a clear message.

    Returns the qualified names of the modules whose forward ran, in call order."""
    names = {id(m): n for n, m in model.named_modules()}
    called: dict[str, None] = {}

    def hook(module, inputs):
        if id(module) in names:
            called.setdefault(names[id(module)])
    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward is reported as bad input
        raise InputError(
            f"{type(model).__name__} failed on example_inputs {describe_inputs(example_inputs)}: "
            f"{type(e).__name__}: {e}. example_inputs must be arguments the model's forward accepts.") from e
    finally:
        handle.remove()
    return list(called)


def run_batches(model: nn.Module, batches: Iterable[Any], hooks: Iterable[RemovableHandle],
                before_each: Optional[Callable[[Any], None]] = None) -> None:
    """Run the model on each batch (`normalize_inputs`) in eval mode without gradients, for the hooks
    `hooks` (registered by the caller) to read; `before_each(batch)` runs before each forward. The
    hooks are removed and every module's training flag restored afterwards, also when a forward fails."""
    hooks = list(hooks)
    modes = {m: m.training for m in model.modules()}
    model.eval()   # calibration passes do not train: no dropout, no balance loss
    try:
        with torch.no_grad():
            for batch in batches:
                if before_each is not None:
                    before_each(batch)
                args, kwargs = normalize_inputs(model, batch)
                model(*args, **kwargs)
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes.items():
            m.training = training
