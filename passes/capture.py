"""Capture: turn a model and its example inputs into FX graphs the analysis can read.

IR level: ATen graphs from `torch.export` (non-strict), or torch-level graphs from dynamo.
Front-ends (the list `FRONTENDS`) are tried in order, each only if the previous one failed:
  1. `torch.export.export(strict=False)` of the whole model;
  2. dynamo: the graphs torch.compile hands to a collecting backend (graph breaks leave several);
  3. `torch.export` block by block: each child of the model's largest ModuleList of repeated
     blocks, with the inputs it received in an eager forward;
  4. the ops of one eager run recorded with real values (passes/capture_real.py).
Each CapturedGraph carries `params` (placeholder name -> parameter's qualified name), and its
nodes' nn_module_stack names modules by qualified name (dynamo's source paths are replaced via
id(module), its stack key; `module_path` normalises the remaining spellings). A dynamo graph that
several identical blocks reuse is returned once per block, renamed (see `_dynamo`).
Nothing here changes the model's parameters, buffers or modules.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import fx, nn

from mohdify.errors import CaptureError

from . import capture_real as real_values
from .capture_real import FRONTEND as REAL_FRONTEND
from .captured import Capture, CapturedGraph
from .graph_names import join_name, module_path
from .inputs import describe_inputs, normalize_inputs, run_eager

__all__ = ["CapturedGraph", "Capture", "FrontEnd", "FRONTENDS", "capture"]


def _export(model: nn.Module, args: tuple, kwargs: dict, prefix: str = "") -> CapturedGraph:
    with torch.no_grad():
        program = torch.export.export(model, args, kwargs, strict=False)
    frontend = "torch.export per block" if prefix else "torch.export"
    params = {name: join_name(prefix, fqn) for name, fqn in program.graph_signature.inputs_to_parameters.items()}
    return CapturedGraph(program.graph, frontend, prefix, params)



def _dynamo_limits() -> dict:
    """Recompile limits raised for the capture: every new model instance (and every graph break)
    is a recompile of the same code objects, and past the limit dynamo silently runs eagerly."""
    names = ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit")
    return {n: 1 << 16 for n in names if hasattr(torch._dynamo.config, n)}


def _dynamo(model: nn.Module, args: tuple, kwargs: dict) -> tuple[list[CapturedGraph], list[str]]:
    """The graphs dynamo compiles in one forward, one CapturedGraph per distinct use, and the
    reasons of the graph breaks it met.

    Dynamo lifts parameters to graph inputs and reuses a compiled graph for every block of the same
    structure (the guards do not pin the module): a graph compiled for layer 0 also runs layer 1.
    So the backend records, at run time, which parameters each call received, and a graph run with
    another block's parameters is analysed again as a copy whose module names are moved to it.
    """
    compiled: list[tuple[fx.Graph, list[str], list[Optional[str]]]] = []
    calls: list[tuple[int, tuple]] = []
    param_names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    module_names = {str(id(m)): name for name, m in model.named_modules(remove_duplicate=False)}

    def collect(gm: fx.GraphModule, example_inputs):
        holders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        _name_module_stacks(gm.graph, module_names)
        index = len(compiled)
        compiled.append((gm.graph, holders, [param_names.get(id(v)) for v in example_inputs]))

        def run(*inputs):
            calls.append((index, tuple(param_names.get(id(v)) for v in inputs)))
            return gm.forward(*inputs)
        return run

    # Dynamo's caches live on code objects: a frame it skipped (or compiled) for an earlier model of the
    # same class would be skipped (or reused) for this one. Start from empty caches, and leave none behind.
    counters = torch._dynamo.utils.counters
    saved = {k: Counter(v) for k, v in counters.items()}   # reset() clears dynamo's counters: keep the user's
    torch._dynamo.reset()
    try:
        with torch.no_grad(), torch._dynamo.config.patch(**_dynamo_limits()):
            torch.compile(model, backend=collect, dynamic=False)(*args, **kwargs)
        breaks = _break_reasons([*counters["graph_break"], *counters["unimplemented"]])
    finally:
        torch._dynamo.reset()
        counters.clear()
        counters.update(saved)
    if not compiled:
        raise RuntimeError("dynamo produced no graph (the forward ran eagerly, e.g. under torch._dynamo.disable)")
    graphs, done = [], set()
    for index, names in calls:
        if (index, names) in done:
            continue
        done.add((index, names))
        graph, holders, first = compiled[index]
        if list(names) != first:
            graph = _moved_copy(graph, _prefix_map(first, names))
        graphs.append(CapturedGraph(graph, "dynamo", "", {h: n for h, n in zip(holders, names) if n}))
    return graphs, breaks


def _break_reasons(keys: list[str]) -> list[str]:
    """Short, distinct graph-break reasons from dynamo's counter keys (their first lines)."""
    out = list(dict.fromkeys(k.strip().splitlines()[0][:120] for k in keys if k.strip()))
    if any("graph break in loop" in k for k in keys):
        out.append("graph break in loop: frame skipped")
    return out


def _prefix_map(before: list, after: tuple) -> dict[str, str]:
    """Module prefixes that move, from parameter names at compile time and at a later call:
    "h.0.attn.c_attn.weight" -> "h.1.attn.c_attn.weight" gives {"h.0": "h.1"}."""
    moves = {}
    for a, b in zip(before, after):
        if a and b and a != b:
            pa, pb = a.split("."), b.split(".")
            while pa and pb and pa[-1] == pb[-1]:
                pa, pb = pa[:-1], pb[:-1]
            moves[".".join(pa)] = ".".join(pb)
    return moves


def _moved_copy(graph: fx.Graph, moves: dict[str, str]) -> fx.Graph:
    """A copy of `graph` whose nn_module_stack names are moved by the longest matching prefix."""
    def move(path: str) -> str:
        for a in sorted(moves, key=len, reverse=True):
            if path == a or path.startswith(a + "."):
                return moves[a] + path[len(a):]
        return path
    copy = fx.Graph()
    out = copy.graph_copy(graph, {})
    copy.output(out)
    for node in copy.nodes:   # node_copy gives each node its own meta dict
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {k: (move(p), c) for k, (p, c) in stack.items()}
    return copy


def _name_module_stacks(graph: fx.Graph, module_names: dict[str, str]) -> None:
    """Dynamo keys nn_module_stack entries by id(module): replace its source paths by qualified names,
    so that names do not depend on how dynamo spells the root (module_path handles the rest)."""
    for node in graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                key: ((module_names[key] if key in module_names else path), cls) for key, (path, cls) in stack.items()}


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
        out.append(_export(block, b_args, b_kwargs, prefix=name))
    if not out:
        raise RuntimeError("no repeated block ran in the forward pass")
    return out


def _seen_modules(graphs: list[CapturedGraph]) -> set[str]:
    """Qualified names of the modules whose code some graph shows: every module a node was traced in,
    and each graph's top module (the common prefix of its nodes' modules: the frame compiled)."""
    seen = set()
    for g in graphs:
        names = [join_name(g.prefix, module_path(path)) for n in g.graph.nodes
                 for path, _ in (n.meta.get("nn_module_stack") or {}).values()]
        seen.update(names)
        parts = [n.split(".") if n else [] for n in names]
        top = []
        for level in zip(*parts) if parts else ():
            if len(set(level)) != 1:
                break
            top.append(level[0])
        seen.add(".".join(top) if parts else g.prefix)
    return seen


def _unseen_frames(model: nn.Module, called: list[str], graphs: list[CapturedGraph], why: str):
    """Modules whose forward ran and that no graph shows, though modules inside them are in a graph:
    their own code (e.g. residual adds between the calls of their children) ran eagerly, unseen."""
    seen = _seen_modules(graphs)
    modules = dict(model.named_modules())
    out = []
    for name in called:
        inner = any((c.startswith(name + ".") if name else c) for c in seen)
        if name not in seen and inner and not isinstance(modules.get(name), (nn.ModuleList, nn.ModuleDict)):
            out.append((name, type(modules[name]).__name__, why))
    return out


def capture(model: nn.Module, example_inputs: Any, after: str = "",
            failures: Sequence[tuple[str, str]] = ()) -> Capture:
    """Capture graphs of `model` on `example_inputs`, trying each front-end in order.

    `after`: the name of a front-end whose graphs did not do; the ones after it are tried, and
    `failures` (what failed so far, with why) is carried on.
    The dynamo front-end resets dynamo's caches before and after it runs (torch._dynamo.reset()),
    so that what it captures does not depend on what was compiled before; functions the user compiled
    earlier compile again on their next call.
    """
    names = [f.name for f in FRONTENDS]
    if after and after not in names:
        raise ValueError(f"capture(after={after!r}): required one of {names}")
    args, kwargs = normalize_inputs(model, example_inputs)
    called = run_eager(model, args, kwargs, example_inputs)
    start = names.index(after) + 1 if after else 0
    cap = _capture(model, args, kwargs, called, example_inputs, FRONTENDS[start:], list(failures))
    cap.called = called
    return cap


def _capture(model, args, kwargs, called, example_inputs, frontends, failures) -> Capture:
    for frontend in frontends:
        try:
            return frontend.run(model, args, kwargs, called, failures)
        except Exception as e:  # noqa: BLE001 - every front-end failure is recorded and reported
            failures.append((frontend.name, _why(e)))
    lines = "\n".join(f"  - {name}: {why}" for name, why in failures)
    raise CaptureError(
        f"could not capture a graph of {type(model).__name__} on example_inputs "
        f"{describe_inputs(example_inputs)}; every front-end failed:\n{lines}\n"
        "Make the model exportable (torch.export.export(model, args, kwargs, strict=False)), e.g. by "
        "replacing data-dependent Python control flow with torch.cond / torch.where, or keep its "
        "repeated blocks in an nn.ModuleList so they can be captured one by one.")


def _whole_export(model, args, kwargs, called, failures) -> Capture:
    return Capture([_export(model, args, kwargs)], "torch.export", failures)


def _dynamo_graphs(model, args, kwargs, called, failures) -> Capture:
    """dynamo's graphs; where it skipped frames that per-block export shows, the blocks instead."""
    graphs, breaks = _dynamo(model, args, kwargs)
    why = "; ".join(breaks[:3]) or "a graph break"
    unseen = _unseen_frames(model, called, graphs, why)
    if not unseen:
        return Capture(graphs, "dynamo", failures)
    blocks = _blocks_that_see(model, args, kwargs, unseen)
    if blocks is not None:
        inside = [f for f in unseen if _inside(f[0], blocks)]
        names = ", ".join(n for n, _, _ in inside)
        failures.append(("dynamo", f"skipped the frame of {names} ({why}); the blocks are exported one by one"))
        return Capture(blocks, blocks[0].frontend, failures, [f for f in unseen if f not in inside])
    try:                                   # frames dynamo ran eagerly: follow the real values instead
        found = _real_trace(model, args, kwargs, called, failures)
    except Exception as e:  # noqa: BLE001 - recorded; the dynamo graphs stand, with the frames named
        failures.append((REAL_FRONTEND, _why(e)))
        return Capture(graphs, "dynamo", failures, unseen)
    frames = [n or "(model)" for n, _, _ in unseen]
    failures.append(("dynamo", f"skipped the frames of {frames} ({why}); traced with real values instead"))
    return found


def _per_block_export(model, args, kwargs, called, failures) -> Capture:
    graphs = _export_blocks(model, args, kwargs)
    return Capture(graphs, graphs[0].frontend, failures)


def _real_trace(model, args, kwargs, called, failures) -> Capture:
    """The ops of one eager run, recorded with real values (passes/capture_real.py)."""
    return Capture([real_values.capture_real(model, args, kwargs)], REAL_FRONTEND, failures)


@dataclass(frozen=True)
class FrontEnd:
    """A way to capture a model: `run(model, args, kwargs, called, failures) -> Capture`, raising if it
    cannot (its failure is recorded under `name` and the next front-end is tried). `called` lists the
    modules whose forward ran eagerly; `failures` what failed before (a Capture carries it on)."""

    name: str
    run: Callable[[nn.Module, tuple, dict, list[str], list[tuple[str, str]]], Capture]


# The front-ends, tried in this order until one captures. A new one is one entry here.
FRONTENDS: list[FrontEnd] = [
    FrontEnd("torch.export (non-strict)", _whole_export),
    FrontEnd("dynamo", _dynamo_graphs),
    FrontEnd("torch.export per block", _per_block_export),
    FrontEnd(REAL_FRONTEND, _real_trace),
]


def _blocks_that_see(model, args, kwargs, unseen) -> Optional[list[CapturedGraph]]:
    """Per-block export graphs if they show frames dynamo did not see: each unseen frame is inside an
    exported block, or above the blocks (it calls them; its own code stays unseen either way)."""
    try:
        graphs = _export_blocks(model, args, kwargs)
    except Exception:  # noqa: BLE001 - this fallback is optional; dynamo's graphs are kept with a reason
        return None
    prefixes = [g.prefix for g in graphs]
    above = [n for n, _, _ in unseen if any(not n or p.startswith(n + ".") for p in prefixes)]
    inside = [n for n, _, _ in unseen if _inside(n, graphs)]
    if inside and len(inside) + len(above) == len(unseen):   # the blocks show more than dynamo did
        return graphs
    return None


def _inside(name: str, graphs: list[CapturedGraph]) -> bool:
    return any(name == g.prefix or name.startswith(g.prefix + ".") for g in graphs)


def _why(e: BaseException) -> str:
    """One line saying why a front-end failed: the exception type and its first non-empty line."""
    lines = [line for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:300]}" if lines else type(e).__name__
