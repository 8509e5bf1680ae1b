"""Capture: turn a model and its example inputs into FX graphs the analysis can read.

IR level: ATen graphs from `torch.export` (non-strict), or torch-level graphs from dynamo.
Front-ends are tried in order, each only if the previous one failed:
  1. `torch.export.export(strict=False)` of the whole model;
  2. dynamo: the graphs torch.compile hands to a collecting backend (graph breaks leave several);
  3. `torch.export` block by block: each child of the model's largest ModuleList of repeated
     blocks, with the inputs it received in an eager forward.
Nothing here changes the model's parameters, buffers or modules.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from mohdify.errors import CaptureError, InputError

__all__ = ["CapturedGraph", "Capture", "normalize_inputs", "capture", "module_path", "node_value"]


@dataclass
class CapturedGraph:
    """One captured graph. `prefix` is the qualified name of the captured submodule ("" = model)."""

    graph: fx.Graph
    frontend: str
    prefix: str = ""


@dataclass
class Capture:
    graphs: list[CapturedGraph]
    frontend: str
    failures: list[tuple[str, str]] = field(default_factory=list)   # (front-end, why it failed)


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


def run_eager(model: nn.Module, args: tuple, kwargs: dict, example_inputs: Any) -> None:
    """Run the model once on the inputs; wrong inputs fail here with a clear message."""
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward is reported as bad input
        raise InputError(
            f"{type(model).__name__} failed on example_inputs {describe_inputs(example_inputs)}: "
            f"{type(e).__name__}: {e}. example_inputs must be arguments the model's forward accepts.") from e


def node_value(node: fx.Node):
    """The fake/example value of a node (export: meta['val']; dynamo: meta['example_value'])."""
    return node.meta.get("val", node.meta.get("example_value"))


_DYNAMO_PREFIX = re.compile(r"^(L\['self'\]|L\['mod'\]|L\['model'\]|self)\.?")


def module_path(path: str) -> str:
    """Normalize an nn_module_stack path from export or dynamo to a qualified module name."""
    path = _DYNAMO_PREFIX.sub("", path)
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"^_modules\['([^']*)'\]", r"\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return path.strip(".")


def _export(model: nn.Module, args: tuple, kwargs: dict) -> fx.Graph:
    with torch.no_grad():
        program = torch.export.export(model, args, kwargs, strict=False)
    return program.graph


def _dynamo(model: nn.Module, args: tuple, kwargs: dict) -> list[fx.Graph]:
    graphs: list[fx.Graph] = []

    def collect(gm: fx.GraphModule, example_inputs):
        graphs.append(gm.graph)
        return gm.forward

    compiled = torch.compile(model, backend=collect, dynamic=False)
    with torch.no_grad():
        compiled(*args, **kwargs)
    if not graphs:
        raise RuntimeError("dynamo produced no graph")
    return graphs


def _repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children of the largest ModuleList whose children share one class."""
    best: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) >= 2:
            if len({type(m) for m in module}) == 1 and len(module) > len(best):
                best = [(f"{name}.{i}" if name else str(i), m) for i, m in enumerate(module)]
    return best


def _export_blocks(model: nn.Module, args: tuple, kwargs: dict) -> list[CapturedGraph]:
    blocks = _repeated_blocks(model)
    if not blocks:
        raise RuntimeError("the model has no ModuleList of repeated blocks")
    seen: dict[str, tuple[tuple, dict]] = {}
    handles = []
    for name, block in blocks:
        def hook(module, b_args, b_kwargs, name=name):
            seen.setdefault(name, (b_args, b_kwargs))
        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    out = []
    for name, block in blocks:
        if name not in seen:
            continue
        b_args, b_kwargs = seen[name]
        out.append(CapturedGraph(_export(block, b_args, b_kwargs), "torch.export per block", name))
    if not out:
        raise RuntimeError("no repeated block ran in the forward pass")
    return out


def capture(model: nn.Module, example_inputs: Any) -> Capture:
    """Capture graphs of `model` on `example_inputs`, trying each front-end in order."""
    args, kwargs = normalize_inputs(model, example_inputs)
    run_eager(model, args, kwargs, example_inputs)
    failures: list[tuple[str, str]] = []
    try:
        return Capture([CapturedGraph(_export(model, args, kwargs), "torch.export")], "torch.export", failures)
    except Exception as e:  # noqa: BLE001 - every front-end failure is recorded and reported
        failures.append(("torch.export (non-strict)", f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
    try:
        graphs = _dynamo(model, args, kwargs)
        return Capture([CapturedGraph(g, "dynamo") for g in graphs], "dynamo", failures)
    except Exception as e:  # noqa: BLE001
        failures.append(("dynamo", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"))
    try:
        graphs = _export_blocks(model, args, kwargs)
        return Capture(graphs, graphs[0].frontend, failures)
    except Exception as e:  # noqa: BLE001
        failures.append(("torch.export per block", f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"))
    lines = "\n".join(f"  - {name}: {why}" for name, why in failures)
    raise CaptureError(
        f"could not capture a graph of {type(model).__name__} on example_inputs "
        f"{describe_inputs(example_inputs)}; every front-end failed:\n{lines}\n"
        "Make the model exportable (torch.export.export(model, args, kwargs, strict=False)) or "
        "pass a filter_fn / smaller blocks.")
