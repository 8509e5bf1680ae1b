"""Calibration of the shared groups (MOHD_SPEC.md, "Shared groups"): per branch, the N_s groups
with the highest mean energy ||x[group]||^2 over the calibration tokens become the shared ones."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from mohdify.passes import mohd_branches
from mohdify.passes.inputs import run_batches

from .errors import InputError, UnsupportedModelError
from .modules import MoHDReader

__all__ = ["calibrate"]


def calibrate(model: nn.Module, batches: Iterable[Any]) -> dict[str, list[int]]:
    """Choose each branch's shared groups from calibration data; routed groups are the rest.

    Args:
        model: a mohdified model.
        batches: an iterable of example inputs (each a tuple of positional arguments or a dict of
            keyword arguments), run through the model without gradients.

    Returns:
        {branch name: shared group ids}. The choice is stored in each branch's `shared_idx` and
        `routed_idx` buffers (so it is saved with the state dict).

    Example::

        mohdify.calibrate(model, [{"input_ids": ids} for ids in calibration_batches])
    """
    branches = mohd_branches(model)
    if not branches:
        raise UnsupportedModelError(f"calibrate: {type(model).__name__} is not mohdified.")
    energy = {b: torch.zeros(b.config.num_groups, dtype=torch.float64, device=b.shared_idx.device)
              for b in branches}
    tokens = dict.fromkeys(branches, 0)
    first_reader = {}
    for module in model.modules():
        if isinstance(module, MoHDReader):
            first_reader.setdefault(module.branch, module)

    def record(module, args):
        b = module.branch
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()                 # [T, D]
        energy[b] += x.view(x.shape[0], b.config.num_groups, b.group_size).pow(2).sum(-1).sum(0)      # [N]
        tokens[b] += x.shape[0]

    run_batches(model, batches, [r.register_forward_pre_hook(record) for r in first_reader.values()])
    empty = [b.name for b in branches if tokens[b] == 0]
    if empty:
        raise InputError(f"calibrate: no calibration token reached branches {empty[:3]} "
                         f"({len(empty)} in all); pass at least one batch the model runs on.")
    chosen = {}
    for b in branches:
        n_s = b.config.num_shared
        order = torch.sort(energy[b] / tokens[b], descending=True, stable=True).indices
        shared = order[:n_s].sort().values
        routed = order[n_s:].sort().values
        b.shared_idx.copy_(shared)
        b.routed_idx.copy_(routed)
        chosen[b.name] = shared.tolist()
    return chosen
