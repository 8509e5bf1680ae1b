"""Public entry points: explain, mohdify, demohdify, aux_loss, graph."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator
from typing import Any, Optional

import torch
from torch import fx, nn

from mohdify.passes import apply_plan, find_plan, is_mohdified, mohd_branches, remove_mohd
from mohdify.passes.inputs import normalize_inputs

from .config import MoHDConfig
from .errors import ConfigError, MohdifyError, UnsupportedModelError
from .guards import check_filter_fn, mark_demohdified, warn_once
from .modules import MoHDLinear, MoHDWriter
from .plan import Plan, untrained_router_note
from .routers import router_kind
from .routing import Routing
from .saving import check_recordable, forget_rewrite, record_rewrite

__all__ = ["explain", "mohdify", "demohdify", "aux_loss", "graph", "branches", "trace_routing"]

FilterFn = Callable[[nn.Module, str], bool]


def _check_model(model: Any, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} expects a torch.nn.Module, got {type(model).__name__}.")


def _check_config(config: Any) -> MoHDConfig:
    if config is None:
        return MoHDConfig()
    if not isinstance(config, MoHDConfig):
        raise ConfigError(f"config must be a mohdify.MoHDConfig, got {type(config).__name__}: {config!r}.")
    return config


def explain(model: nn.Module, example_inputs: Any, config: Optional[MoHDConfig] = None, *,
            filter_fn: Optional[FilterFn] = None) -> Plan:
    """Capture and analyse `model` without changing it; return the Plan `mohdify` would apply.

    Args:
        model: any nn.Module Transformer (HF models included).
        example_inputs: a tuple of positional arguments or a dict of keyword arguments.
        config: the MoHDConfig to count activated parameters for (default MoHDConfig()).
        filter_fn: `filter_fn(module, qualified_name) -> bool`, limits which layers are rewritten.

    Returns:
        A Plan; `print(plan)` shows the table of branches, readers, writers and counts.

    Example::

        plan = mohdify.explain(model, {"input_ids": ids})
        print(plan)
    """
    _check_model(model, "explain")
    config = _check_config(config)
    plan = _plan(model, example_inputs, config, filter_fn, "explain")
    warn_untrained_router(config, "explain")
    return plan


def _plan(model: nn.Module, example_inputs: Any, config: MoHDConfig, filter_fn, called: str) -> Plan:
    check_filter_fn(filter_fn)
    if is_mohdified(model):
        raise UnsupportedModelError(
            f"{called}() got a model that is already mohdified ({type(model).__name__} has "
            f"{len(mohd_branches(model))} MoHD branches); {called}() needs the dense model: call "
            "mohdify.demohdify(model) first.")
    try:
        return find_plan(model, example_inputs, config, filter_fn)
    except MohdifyError as e:   # say which function the user called; keep the type and the traceback
        e.args = (f"{called}(): {e}", *e.args[1:])
        raise


def warn_untrained_router(config: MoHDConfig, called: str) -> None:
    """Warn (UserWarning, once per process and config) when `config` routes with a learned router
    that is still untrained."""
    note = untrained_router_note(config)
    if note:
        warn_once(f"mohdify.{called}(): {note}", key=note, stacklevel=3)


def mohdify(model: nn.Module, config: Optional[MoHDConfig] = None, *, example_inputs: Any,
            filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Rewrite the residual branches of `model` into MoHD branches, in place.

    The model keeps its class (an HF model keeps `generate` and `save_pretrained`); readers and
    writers keep their original weight and bias Parameters. On any error the model is left
    exactly as it was.

    Args:
        model: the dense model.
        config: a MoHDConfig (default MoHDConfig()).
        example_inputs: a tuple of positional arguments or a dict of keyword arguments.
        filter_fn: `filter_fn(module, qualified_name) -> bool`; a branch is rewritten if its
            writer and at least one reader pass (readers that fail stay dense).

    Returns:
        `model` itself.

    Example::

        model = mohdify.mohdify(model, mohdify.MoHDConfig(num_groups=16, num_shared=4, top_k=4),
                                example_inputs={"input_ids": ids})
    """
    _check_model(model, "mohdify")
    config = _check_config(config)
    check_recordable(model)
    plan = _plan(model, example_inputs, config, filter_fn, "mohdify")
    if not plan.branches:
        reasons = "\n".join(f"  {n}: {w}" for n, w in plan.skipped) or "  (no linear layers)"
        raise UnsupportedModelError(
            f"mohdify found no residual branch to rewrite in {type(model).__name__}; each layer was left "
            f"dense for this reason:\n{reasons}")
    config.check_hidden_size(plan.hidden_size)
    apply_plan(model, plan, config)
    try:
        _check_runs(model, example_inputs)
    except Exception as e:
        remove_mohd(model)
        raise UnsupportedModelError(
            f"mohdify: the rewritten {type(model).__name__} failed on example_inputs "
            f"({type(e).__name__}: {e}); the model was restored to its dense form. Please report this model: "
            "the plan is in mohdify.explain(model, example_inputs, config).") from e
    model.mohd_plan = plan
    record_rewrite(model, plan, config)
    warn_untrained_router(config, "mohdify")
    return model


@contextlib.contextmanager
def _no_trace_left(model: nn.Module):
    """mohdify's own passes run inside leave the branches as they were: their balance logs as before, and
    no routing in this thread's slots if the pass raises between a branch's readers and its writer (a
    stale slot held the failed pass's tensors, and made every graph compiled later in the thread guard
    on one more slot than other threads have)."""
    kept = {b: (b.balance_log.total, b.balance_log.count) for b in mohd_branches(model)}
    try:
        yield
    except BaseException:
        for b in kept:
            b.drop_routing()
        raise
    finally:
        for b, (total, count) in kept.items():
            b.balance_log.total, b.balance_log.count = total, count


@contextlib.contextmanager
def trace_routing(model: nn.Module) -> Iterator[dict[str, list[Routing]]]:
    """Record the routing of every branch application while the context is open.

    Yields {branch name: [Routing, ...]} (one entry per application, in order; tensors detached,
    no balance loss), filled as the model runs. Nothing is kept on the model.

    Example::

        with mohdify.trace_routing(model) as seen:
            model(input_ids=ids)
        load = (seen["model.layers.0.mlp"][0].mask).float().mean(0)   # [N] share of tokens per group
    """
    _check_model(model, "trace_routing")
    seen: dict[str, list[Routing]] = {}

    def before_write(module, args):
        routing = module.branch.pending_routing()
        if routing is not None:
            seen.setdefault(module.branch.name, []).append(Routing(
                routing.mask.detach(), None if routing.scale is None else routing.scale.detach(),
                routing.gates.detach(), None))
    handles = [m.register_forward_pre_hook(before_write) for m in model.modules() if isinstance(m, MoHDWriter)]
    if not handles:
        raise UnsupportedModelError(f"trace_routing: {type(model).__name__} is not mohdified; call "
                                    "mohdify.mohdify() first.")
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def _check_runs(model: nn.Module, example_inputs: Any) -> None:
    """Run the rewritten model once on the example inputs, leaving no trace: the RNG state (dropout),
    the balance logs and the grad mode are as before."""
    args, kwargs = normalize_inputs(model, example_inputs)
    with _no_trace_left(model), torch.random.fork_rng(), torch.no_grad():
        model(*args, **kwargs)


def demohdify(model: nn.Module) -> nn.Module:
    """Undo `mohdify`: put the original layers back and drop routers and fusion matrices.

    The original weights come back bit for bit (they are the same Parameters, trained or not).
    """
    _check_model(model, "demohdify")
    if not is_mohdified(model):
        raise UnsupportedModelError(f"{type(model).__name__} is not mohdified: there is nothing to undo.")
    put_back = [p for m in model.modules() if isinstance(m, MoHDLinear) for p in (m.weight, m.bias) if p is not None]
    remove_mohd(model)
    mark_demohdified(put_back)   # a compiled wrapper that recompiles it runs it dense (mohdify/guards.py)
    forget_rewrite(model)
    if "mohd_plan" in model.__dict__:
        del model.__dict__["mohd_plan"]
    return model


def branches(model: nn.Module):
    """The MoHDBranch modules of a mohdified model."""
    return mohd_branches(model)


def aux_loss(model: nn.Module) -> torch.Tensor:
    """The balance loss of every routed application since it was last taken, times aux_loss_coef.

    Per branch application: N_r * sum_i f_i P_i (f_i: share of tokens routed to group i, P_i: mean
    router probability of i). The rule:

    - An application keeps its loss when its router requires grad and the model is in training mode
      (`model.train()`), outside `torch.inference_mode` and outside a backward pass. So passes in eval
      mode keep nothing and hold no graph, with autograd on too (input gradients, attribution); a
      no-grad pass in training mode keeps its loss (reentrant checkpointing's forward is one), so
      sample and validate in eval mode.
    - `aux_loss(model)` returns the sum over branches and over all the applications kept since the
      last call, and forgets them: two forwards before one backward, a block applied several times,
      gradient accumulation (call it once per micro-batch) each count every application once.
    - Under activation checkpointing the forward's loss is kept once, also in reentrant mode (whose
      forward runs without autograd: the router logits are recomputed with autograd for the loss);
      the recomputation during backward keeps nothing.

    Returns 0 for magnitude-routed models, and when nothing was kept (with a warning for a learned
    router in eval mode: its passes keep nothing).
    """
    _check_model(model, "aux_loss")
    found = mohd_branches(model)
    if not found:
        raise UnsupportedModelError(f"aux_loss: {type(model).__name__} is not mohdified; call mohdify.mohdify() "
                                    "first.")
    total = None
    for b in found:
        kept = b.balance_log.take()
        if kept is not None:
            term = b.config.aux_loss_coef * kept
            total = term if total is None else total + term
    if total is not None:
        return total
    learned = [b for b in found if router_kind(b.config.router).has_balance_loss]
    if learned and not any(b.training for b in learned):
        warnings.warn("aux_loss: no routed pass kept a balance loss since the last call; the model is in eval "
                      "mode, where passes keep none (with autograd on too). Train with model.train().",
                      stacklevel=2)
    return torch.zeros((), device=found[0].shared_idx.device)


def graph(model: nn.Module, example_inputs: Any) -> fx.GraphModule:
    """A captured (torch.export, non-strict) graph of a mohdified model, printable and callable.

    MoHD ops appear as nodes named after their layer: one `mohd_route__<branch>` per branch
    application, `mohd_read__<reader>` and `mohd_write__<writer>`. `print(gm.summary())` shows only
    those, per branch; `print(gm.graph)` the full aten graph.
    """
    _check_model(model, "graph")
    if not is_mohdified(model):
        raise UnsupportedModelError(f"graph() shows the MoHD ops of a mohdified model; {type(model).__name__} "
                                    "is not mohdified. Use mohdify.explain() on a dense model.")
    args, kwargs = normalize_inputs(model, example_inputs)
    user_keys = set(example_inputs) if isinstance(example_inputs, dict) else set()
    fixed = {k: v for k, v in kwargs.items() if k not in user_keys}   # e.g. use_cache=False
    kwargs = {k: v for k, v in kwargs.items() if k in user_keys}
    with _no_trace_left(model), torch.no_grad():
        program = torch.export.export(_Bound(model, fixed), args, kwargs, strict=False)
    gm = program.module()
    text = _summary(_name_mohd_nodes(gm, model, prefix=_Bound.PREFIX))
    gm.summary = lambda: text
    return gm


class _Bound(nn.Module):
    """The model with capture-only keyword arguments (use_cache=False) bound, so the graph takes
    exactly the user's example_inputs."""

    PREFIX = "model"

    def __init__(self, model: nn.Module, fixed: dict):
        super().__init__()
        self.model = model
        self.fixed = fixed

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs, **self.fixed)


def _name_mohd_nodes(gm: fx.GraphModule, model: nn.Module, prefix: str) -> list[tuple[str, str, str]]:
    """Name each MoHD op node after its layer (read, write) or branch (route, route_gates); returns
    (kind, layer or branch, branch) per MoHD node in graph order."""
    from mohdify.passes.analyze import innermost_module
    from mohdify.passes.targets import mohd_op_kind, mohd_op_nodes
    found = []
    for node in mohd_op_nodes(gm.graph):
        kind = mohd_op_kind(node.target)
        fqn, _ = innermost_module(node)
        fqn = fqn[len(prefix) + 1:] if fqn.startswith(prefix + ".") else fqn
        layer = model.get_submodule(fqn) if fqn else None
        branch = getattr(getattr(layer, "branch", None), "name", "")
        name = branch if kind == "route" else fqn
        node._rename(f"mohd_{kind}__{name.replace('.', '_')}" if name else f"mohd_{kind}")
        found.append((kind, name, branch))
    gm.recompile()
    return found


def _summary(found: list[tuple[str, str, str]]) -> str:
    """One block per branch application: its routing, readers and writer, in graph order."""
    lines: list[str] = []
    current = None
    for kind, name, branch in found:
        if kind == "route":
            current = branch
            lines.append(f"{branch or '(branch)'}:")
            lines.append("  route")
        elif branch != current:
            current = branch
            lines.append(f"{branch}:")
        if kind != "route":
            lines.append(f"  {kind:<5} {name}")
    routes = sum(k == "route" for k, _, _ in found)
    head = (f"MoHD graph: {routes} routings, {sum(k == 'read' for k, _, _ in found)} reads, "
            f"{sum(k == 'write' for k, _, _ in found)} writes")
    return "\n".join([head, *lines])
