"""Public entry points: explain, mohdify, demohdify, aux_loss, graph."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch
from torch import fx, nn

from mohdify.passes import apply_plan, find_plan, is_mohdified, mohd_branches, remove_mohd
from mohdify.passes.capture import normalize_inputs

from .config import MoHDConfig
from .errors import ConfigError, MohdifyError, UnsupportedModelError
from .plan import Plan, untrained_router_note

__all__ = ["explain", "mohdify", "demohdify", "aux_loss", "graph", "branches"]

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
    """Warn (UserWarning) when `config` routes with a learned router that is still untrained."""
    note = untrained_router_note(config)
    if note:
        warnings.warn(f"mohdify.{called}(): {note}", UserWarning, stacklevel=3)


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
    plan = _plan(model, example_inputs, config, filter_fn, "mohdify")
    if not plan.branches:
        reasons = "\n".join(f"  {n}: {w}" for n, w in plan.skipped) or "  (no linear layers)"
        raise UnsupportedModelError(
            f"mohdify found no residual branch to rewrite in {type(model).__name__}; each layer was left "
            f"dense for this reason:\n{reasons}")
    config.check_hidden_size(plan.hidden_size)
    apply_plan(model, plan, config)
    model.mohd_plan = plan
    warn_untrained_router(config, "mohdify")
    return model


def demohdify(model: nn.Module) -> nn.Module:
    """Undo `mohdify`: put the original layers back and drop routers and fusion matrices.

    The original weights come back bit for bit (they are the same Parameters, trained or not).
    """
    _check_model(model, "demohdify")
    if not is_mohdified(model):
        raise UnsupportedModelError(f"{type(model).__name__} is not mohdified: there is nothing to undo.")
    remove_mohd(model)
    if "mohd_plan" in model.__dict__:
        del model.__dict__["mohd_plan"]
    return model


def branches(model: nn.Module):
    """The MoHDBranch modules of a mohdified model."""
    return mohd_branches(model)


def aux_loss(model: nn.Module) -> torch.Tensor:
    """The load-balancing loss of the last forward pass, summed over branches, times aux_loss_coef.

    Per branch: N_r * sum_i f_i P_i (f_i: share of tokens routed to group i, P_i: mean router
    probability of i). Branches with the magnitude router contribute 0. It is computed only in
    forward passes with autograd enabled (a training step), not under no_grad/inference.
    """
    _check_model(model, "aux_loss")
    found = mohd_branches(model)
    if not found:
        raise UnsupportedModelError(f"aux_loss: {type(model).__name__} is not mohdified.")
    learned = [b for b in found if b.router is not None]
    if not learned:
        return torch.zeros((), device=found[0].shared_idx.device)
    missing = [b.name for b in learned if b.last_aux_loss is None]
    if missing:
        raise RuntimeError(f"aux_loss: no forward pass with gradients enabled has run through branches "
                           f"{missing[:3]}; the balance loss is computed only when autograd is on (not under "
                           "torch.no_grad() or inference_mode, e.g. generate). Call the model in a training step first.")
    return sum(b.config.aux_loss_coef * b.last_aux_loss for b in learned)


def _reset_state(model: nn.Module) -> None:
    for b in mohd_branches(model):
        b.gates = None
        b.last_aux_loss = None


def graph(model: nn.Module, example_inputs: Any) -> fx.GraphModule:
    """A captured (torch.export, non-strict) graph of a mohdified model, printable and callable.

    MoHD ops appear as nodes named after their layer: `mohd_route__<layer>`,
    `mohd_read__<reader>` and `mohd_write__<writer>`.
    """
    _check_model(model, "graph")
    if not is_mohdified(model):
        raise UnsupportedModelError(f"graph() shows the MoHD ops of a mohdified model; {type(model).__name__} "
                                    "is not mohdified. Use mohdify.explain() on a dense model.")
    args, kwargs = normalize_inputs(model, example_inputs)
    user_keys = set(example_inputs) if isinstance(example_inputs, dict) else set()
    fixed = {k: v for k, v in kwargs.items() if k not in user_keys}   # e.g. use_cache=False
    kwargs = {k: v for k, v in kwargs.items() if k in user_keys}
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Routing state (branch.gates) is plain attribute state by design; see mohdify.modules.
            warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
            program = torch.export.export(_Bound(model, fixed), args, kwargs, strict=False)
    finally:
        _reset_state(model)
    gm = program.module()
    _name_mohd_nodes(gm, prefix=_Bound.PREFIX)
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


_OP_NAMES = {"mohdify.route.default": "route", "mohdify.read.default": "read", "mohdify.write.default": "write"}


def _name_mohd_nodes(gm: fx.GraphModule, prefix: str) -> None:
    from mohdify.passes.analyze import innermost_module
    for node in gm.graph.nodes:
        kind = _OP_NAMES.get(str(node.target))
        if node.op != "call_function" or kind is None:
            continue
        fqn, _ = innermost_module(node)
        fqn = fqn[len(prefix) + 1:] if fqn.startswith(prefix + ".") else fqn
        node._rename(f"mohd_{kind}__{fqn.replace('.', '_')}" if fqn else f"mohd_{kind}")
    gm.recompile()
