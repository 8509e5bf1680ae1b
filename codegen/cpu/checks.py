"""Input checks of the CPU kernels: every error names the op, what was passed and what is required."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

__all__ = ["check_reader", "check_writer"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _require(ok: bool, op: str, message: Callable[[], str]) -> None:
    """Raise when not ok; the message is built only then (these checks run on every decode call)."""
    if not ok:
        raise ValueError(f"{op} (CPU kernel): {message()}")


def _check_float(op: str, name: str, t: Tensor, like: Optional[Tensor] = None) -> None:
    _require(t.dtype in _FLOATS, op, lambda: f"{name} has dtype {t.dtype}: required float32, bfloat16 or float16")
    if like is not None:
        _require(t.dtype == like.dtype, op, lambda: f"{name} has dtype {t.dtype}, but the input has {like.dtype}: "
                                            "they must match")


def check_reader(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor,
                 alpha: Optional[Tensor]) -> int:
    """Validate a reader call; returns the group size G."""
    _require(x.dim() == 2, op, lambda: f"x has shape {tuple(x.shape)}: required 2-D [T, D]")
    _require(weight.dim() == 2 and weight.shape[1] == x.shape[1], op,
             lambda: f"weight has shape {tuple(weight.shape)}: required [O, {x.shape[1]}] (D = x.shape[1])")
    _require(mask.dim() == 2 and mask.shape[0] == x.shape[0] and mask.dtype == torch.bool, op,
             lambda: f"mask has shape {tuple(mask.shape)} and dtype {mask.dtype}: required bool [T, N], "
                     f"T = {x.shape[0]}")
    num_groups = mask.shape[1]
    _require(num_groups >= 1 and x.shape[1] % num_groups == 0, op,
             lambda: f"mask has {num_groups} groups, which does not divide x.shape[1] = {x.shape[1]}")
    _check_float(op, "x", x)
    _check_float(op, "weight", weight, like=x)
    if bias is not None:
        _require(tuple(bias.shape) == (weight.shape[0],), op,
                 lambda: f"bias has shape {tuple(bias.shape)}: required [{weight.shape[0]}] (O = weight.shape[0])")
    if alpha is not None:
        _require(tuple(alpha.shape) == (x.shape[0],), op,
                 lambda: f"alpha has shape {tuple(alpha.shape)}: required [{x.shape[0]}] (T = x.shape[0])")
    return x.shape[1] // num_groups


def check_writer(op: str, u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor,
                 fusion: Optional[Tensor], residual: Optional[Tensor] = None) -> int:
    """Validate a writer call; returns the group size G."""
    _require(u.dim() == 2, op, lambda: f"u has shape {tuple(u.shape)}: required 2-D [T, I]")
    _require(weight.dim() == 2 and weight.shape[1] == u.shape[1], op,
             lambda: f"weight has shape {tuple(weight.shape)}: required [D, {u.shape[1]}] (I = u.shape[1])")
    _require(gates.dim() == 2 and gates.shape[0] == u.shape[0], op,
             lambda: f"gates has shape {tuple(gates.shape)}: required [T, N] with T = u.shape[0] = {u.shape[0]}")
    out_features, num_groups = weight.shape[0], gates.shape[1]
    _require(num_groups >= 1 and out_features % num_groups == 0, op,
             lambda: f"gates has {num_groups} groups, which does not divide weight.shape[0] = {out_features}")
    _check_float(op, "u", u)
    _check_float(op, "weight", weight, like=u)
    _check_float(op, "gates", gates)
    if bias is not None:
        _require(tuple(bias.shape) == (out_features,), op,
                 lambda: f"bias has shape {tuple(bias.shape)}: required [{out_features}] (D = weight.shape[0])")
    if fusion is not None:
        _require(tuple(fusion.shape) == (num_groups, num_groups), op,
                 lambda: f"fusion has shape {tuple(fusion.shape)}: required [{num_groups}, {num_groups}] "
                         "(N = gates.shape[1])")
    if residual is not None:
        _require(tuple(residual.shape) == (u.shape[0], out_features), op,
                 lambda: f"residual has shape {tuple(residual.shape)}: required [{u.shape[0]}, {out_features}]")
    return out_features // num_groups
