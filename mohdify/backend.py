"""`torch.compile(model, backend="mohd")`: the MoHD compiler backend.

Registered under the `torch_dynamo_backends` entry point (pyproject.toml), so it works right after
`pip install` without importing mohdify first.

Each graph dynamo hands over (one per graph piece: graph breaks give several) is handled alone:
  - a graph of a mohdified model (it calls torch.ops.mohdify.route/read/write, one routing per branch
    application) is first fused (mohdify.passes.fuse): the reads of one branch input (q|k|v,
    gate|up) become one `mohdify::read_multi` (one Triton launch on CUDA), and each write followed by
    its residual add one `mohdify::write_add` (the add in the writer's epilogue). Then it is
    compiled: inductor keeps the custom ops as calls, which run the kernels registered for the
    device (Triton on CUDA; on CPU the kernels of codegen/cpu, which read only the active groups'
    weights), and compiles everything else;
  - a graph of a dense model is analysed, the branches `mohdify()` would rewrite are chosen by the
    same rule (mohdify.passes.select), and rewritten to magnitude-routed MoHD ops
    (mohdify.passes.rewrite), fused the same way, then compiled. A branch dynamo split across two
    graphs stays dense with a Python warning (UserWarning) naming its writer.
    Its weights keep nn.Linear's row-major layout (a backend does not re-lay parameters out), so on
    CPU its readers read strided group blocks, slower than after mohdify() (codegen/README.md).

Options: torch.compile(model, backend="mohd", options={...}) with the MoHDConfig fields
`num_groups`, `num_shared`, `top_k`, `scaling` (router is "magnitude" and fusion "none": a backend
cannot add parameters), and `compiler`: "inductor" (default), "aot_eager" or "eager", the compiler
the (rewritten) graph is handed to, and `fuse` (default True; False leaves the MoHD graph unfused, e.g.
to compare). torch.compile hands `options` (minus the `guard_filter_fn` and
`use_aoti` keys it takes for itself) and a non-default `mode` to the backend as keyword arguments;
`mode` goes on to inductor as its mode options (torch.compile allows `mode` or `options`, not both).

Every graph leaves a record: counters in torch._dynamo.utils.counters["mohdify"] (graphs,
mohdified_graphs, dense_graphs, branches_rewritten, readers_rewritten, writers_rewritten,
layers_left_dense, graphs_without_branch; for mohdified graphs reads_merged, read_multi,
writes_fused) and a message on
logging.getLogger("mohdify").
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import fields
from typing import Any, Optional

import torch
from torch import fx

from mohdify.config import MoHDConfig
from mohdify.errors import ConfigError
from mohdify.guards import from_demohdified_model, warn_once
from mohdify.passes.fuse import fuse_graph
from mohdify.passes.rewrite import rewrite_graph
from mohdify.passes.targets import mohd_op_nodes
from mohdify.routers import ROUTER_KINDS

__all__ = ["mohd_backend", "backend_config", "COMPILERS", "CONFIG_OPTIONS"]

log = logging.getLogger("mohdify")

COMPILERS = ("inductor", "aot_eager", "eager")
CONFIG_OPTIONS = ("num_groups", "num_shared", "top_k", "router", "scaling", "fusion")
# the router kind the backend routes with: the one without parameters (mohdify/routers.py)
_FIXED = {"router": next(k.name for k in ROUTER_KINDS.values() if k.backend_refusal is None), "fusion": "none"}
_WHY_FIXED = {
    "router": lambda name: getattr(ROUTER_KINDS.get(name), "backend_refusal", None) or "it is no router kind",
    "fusion": lambda name: "group fusion has a learnable matrix",
}


def backend_config(options: Optional[dict] = None) -> tuple[MoHDConfig, str]:
    """Validate the backend's `options` into (MoHDConfig, compiler name); raise ConfigError if bad."""
    if options is None:
        options = {}
    if not isinstance(options, dict):
        raise ConfigError(f"torch.compile(backend='mohd', options=...) must be a dict, got "
                          f"{type(options).__name__}: {options!r}.")
    allowed = (*CONFIG_OPTIONS, "compiler", "fuse")
    unknown = sorted(k for k in options if k not in allowed)
    if unknown:
        ignored = sorted({f.name for f in fields(MoHDConfig)} - set(allowed))
        raise ConfigError(f"torch.compile(backend='mohd') got unknown option(s) {unknown}; the options are "
                          f"{list(allowed)} ({ignored} do not apply to the backend's magnitude router).")
    for key, required in _FIXED.items():
        if key in options and options[key] != required:
            raise ConfigError(
                f"torch.compile(backend='mohd') got {key}={options[key]!r}, but the backend needs "
                f"{key}={required!r}: {_WHY_FIXED[key](options[key])}, and a compiler backend cannot add parameters "
                f"to a model. Call mohdify.mohdify(model, MoHDConfig({key}={options[key]!r}, ...), example_inputs=...) "
                "first, then torch.compile(model, backend='mohd').")
    if not isinstance(options.get("fuse", True), bool):
        raise ConfigError(f"torch.compile(backend='mohd') option fuse must be True or False, got {options['fuse']!r}.")
    compiler = options.get("compiler", "inductor")
    if compiler not in COMPILERS:
        raise ConfigError(f"torch.compile(backend='mohd') option compiler must be one of {COMPILERS}, "
                          f"got {compiler!r}.")
    kwargs = {k: options[k] for k in CONFIG_OPTIONS if k in options}
    kwargs.update(_FIXED)
    try:
        config = MoHDConfig(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"torch.compile(backend='mohd', options={options!r}): {e}") from e
    return config, compiler


@functools.cache   # once per process and setting, not once per graph
def _warn_defaults(num_groups: int, num_shared: int, top_k: int, scaling: str) -> None:
    density = (num_shared + top_k) / num_groups
    warn_once(f"mohd backend: torch.compile(model, backend='mohd') got no options, so it rewrote a dense model with "
              f"magnitude routing at density {density:.3f} (num_groups={num_groups}, num_shared={num_shared}, "
              f"top_k={top_k}): its outputs change. Pass options={{'num_groups': ..., 'num_shared': ..., "
              "'top_k': ...}, or use another backend to leave MoHD out.", stacklevel=5)
    log.warning(
        "mohd backend: torch.compile(model, backend='mohd') got no options, so it rewrites this dense model with "
        "the defaults: magnitude routing (training-free), num_groups=%d, num_shared=%d, top_k=%d, scaling=%r, "
        "density %.3f: each token reads and writes only that share of the hidden dimensions, so the model's "
        "outputs change. Choose with options={'num_groups': ..., 'num_shared': ..., 'top_k': ...} (top_k = "
        "num_groups - num_shared keeps the outputs unchanged), or compile with another backend (e.g. "
        "backend='inductor') to leave MoHD out.", num_groups, num_shared, top_k, scaling, density)


def _compile(gm: fx.GraphModule, example_inputs: Sequence[Any], compiler: str, mode: Optional[str]):
    if compiler == "eager":
        return gm.forward
    if compiler == "aot_eager":
        from torch._dynamo.backends.registry import lookup_backend
        return lookup_backend("aot_eager")(gm, example_inputs)
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.custom_graph_pass import get_custom_graph_passes
    from torch._inductor.decomposition import select_decomp_table

    from mohdify.codegen.nograd import nograd_pass
    from mohdify.codegen.route.naive import route_naive
    patches = dict(list_mode_options(mode)) if mode else {}
    # Inside the compiled graph the readers and writers need no autograd kernel (AOT autograd has
    # traced their backward already): their `_nograd` twins skip its per-call Python hop.
    passes = get_custom_graph_passes(patches.get("post_grad_custom_post_pass",
                                                 torch._inductor.config.post_grad_custom_post_pass))
    patches["post_grad_custom_post_pass"] = [*passes, nograd_pass()]
    # Routing (top-k of <= a few dozen scores per token) is compiled into the graph's own code rather
    # than called as the mohdify::route custom op: at decode the op's per-call cost (~0.1 ms) was
    # several percent of a step (codegen/README.md). The readers and writers stay custom-op calls.
    decompositions = {**select_decomp_table(), torch.ops.mohdify.route.default: route_naive}
    return compile_fx(gm, example_inputs, config_patches=patches, decompositions=decompositions)


def _fuse(gm: fx.GraphModule, counts) -> None:
    report = fuse_graph(gm)
    for key in ("reads_merged", "read_multi", "writes_fused"):
        counts[key] += getattr(report, key)
    log.info("mohd backend: fused %d reads into %d read_multi, %d write + residual add into write_add",
             report.reads_merged, report.read_multi, report.writes_fused)
    for name, why in report.not_fused:
        log.info("mohd backend: not fused at %s: %s", name, why)


def mohd_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *, options: Optional[dict] = None,
                 mode: Optional[str] = None):
    """The dynamo backend behind `torch.compile(model, backend="mohd", options={...})`.

    dynamo calls it as `mohd_backend(gm, example_inputs, options=..., mode=...)` (torch passes
    `options` and a non-default `mode` as keyword arguments to a non-inductor backend).
    """
    config, compiler = backend_config(options)
    counts = torch._dynamo.utils.counters["mohdify"]
    counts["graphs"] += 1
    ops = mohd_op_nodes(gm.graph)
    if ops:
        counts["mohdified_graphs"] += 1
        given = sorted(k for k in (options or {}) if k in CONFIG_OPTIONS)
        note = f"; options {given} are ignored (the model has its own MoHDConfig)" if given else ""
        log.info("mohd backend: graph with %d MoHD ops (a mohdified model), compiled with %s%s",
                 len(ops), compiler, note)
        if (options or {}).get("fuse", True):
            _fuse(gm, counts)
        return _compile(gm, example_inputs, compiler, mode)
    counts["dense_graphs"] += 1
    if not any(k in (options or {}) for k in CONFIG_OPTIONS) and from_demohdified_model(example_inputs):
        counts["demohdified_graphs"] += 1
        warn_once("mohd backend: this dense graph belongs to a model that mohdify.demohdify() made dense again (a "
                  "torch.compile wrapper made before demohdify recompiles it); it is compiled unchanged, without "
                  "MoHD. Pass options={'num_groups': ..., 'num_shared': ..., 'top_k': ...} to rewrite it here, or "
                  "call mohdify.mohdify() again.", stacklevel=2)
        return _compile(gm, example_inputs, compiler, mode)
    try:
        report = rewrite_graph(gm, config)
    except ConfigError as e:
        raise ConfigError(f"torch.compile(backend='mohd', options={options!r}): {e}") from e
    if report.branches and not any(k in (options or {}) for k in CONFIG_OPTIONS):
        _warn_defaults(config.num_groups, config.num_shared, config.top_k, config.scaling)
    counts["branches_rewritten"] += len(report.branches)
    counts["readers_rewritten"] += report.readers
    counts["writers_rewritten"] += len(report.branches)
    counts["layers_left_dense"] += len(report.skipped)
    if report.branches:
        log.info("mohd backend: rewrote %d residual branches (%d readers, %d writers) with magnitude routing, "
                 "D=%d, groups=%d, shared=%d, top_k=%d (density %.3f), scaling=%s",
                 len(report.branches), report.readers, len(report.branches), report.hidden_size,
                 config.num_groups, config.num_shared, config.top_k, config.density, config.scaling)
    else:
        counts["graphs_without_branch"] += 1
        log.warning("mohd backend: no residual branch in this graph (%d linear-layer calls, %d nodes); "
                    "it is compiled unchanged, with no MoHD", report.linears, len(gm.graph.nodes))
    for name, readers, writer in report.branches:
        log.info("mohd backend: branch %s: readers %s, writer %s", name, readers, writer)
    for name, why in report.skipped:
        log.info("mohd backend: left dense %s: %s", name, why)
    if report.branches and (options or {}).get("fuse", True):
        _fuse(gm, counts)
    return _compile(gm, example_inputs, compiler, mode)
