"""The input contract of each MoHD kernel op, one check per op for every device.

The CPU kernels (codegen/cpu) and the Triton launchers (codegen/read, codegen/write) call these;
the launchers add only what the Triton kernels need on top (`launch_common.check_triton_inputs`:
CUDA devices, group sizes that are multiples of 16). A broken contract raises `ContractError` (a
ValueError) "<op>: <what was passed>: required <what is required>".

The checks run on every call, also on the CPU decode path (tens of microseconds per op matter):
each condition is one comparison, and a message is built only when it fails.

Shape legend: T = tokens, D = reader in_features / writer out_features = N * G, O = reader
out_features, I = writer in_features, N = groups, G = group size.
"""

from __future__ import annotations

from typing import NoReturn, Optional

import torch
from torch import Tensor

__all__ = ["ContractError", "FLOAT_DTYPES", "transformed", "check_read", "check_read_multi", "check_read_lists",
           "check_read_backward", "check_write", "check_write_backward"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def transformed(t: Tensor) -> bool:
    """Whether `t` is inside a torch.func transform (grad, vjp, vmap, ...). The kernel ops carry autograd
    formulas registered with torch.library, which torch refuses under these transforms, so the modules
    run the pure-torch references there (same math) and the native routing is not taken. False while
    torch.compile traces (dynamo cannot call the check; it traces torch.func transforms itself)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


class ContractError(ValueError):
    """An input that breaks a kernel op's contract; `what` is the message without the op name."""

    def __init__(self, op: str, what: str):
        super().__init__(f"{op}: {what}")
        self.op, self.what = op, what


def _fail(op: str, what: str) -> NoReturn:
    raise ContractError(op, what)


def _dtype_error(op: str, name: str, dtype: torch.dtype, like: Optional[torch.dtype] = None) -> NoReturn:
    if dtype not in FLOAT_DTYPES or like is None:
        _fail(op, f"{name} has dtype {dtype}: required float32, bfloat16 or float16")
    _fail(op, f"{name} has dtype {dtype}, but the input has {like}: they must match")


def _check_float(op: str, name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        _dtype_error(op, name, t.dtype)


def _check_shape(op: str, name: str, t: Tensor, shape: tuple[int, ...], why: str) -> None:
    if t.shape != shape:
        _fail(op, f"{name} has shape {tuple(t.shape)}: required {list(shape)}{why}")


# ---- readers: x [T, D], weight [O, D], bias [O], mask bool [T, N], alpha [T] -> y [T, O]

def _read_input(op: str, x: Tensor, mask: Tensor, alpha: Optional[Tensor]) -> tuple[int, int, int]:
    """Checks x, mask and alpha; returns (T, D, N)."""
    if x.dim() != 2:
        _fail(op, f"x has shape {tuple(x.shape)}: required 2-D [T, D]")
    num_tokens, dim = x.shape
    if mask.dim() != 2 or mask.shape[0] != num_tokens:
        _fail(op, f"mask has shape {tuple(mask.shape)}: required [T, N] with T = x.shape[0] = {num_tokens}")
    if mask.dtype != torch.bool:
        _fail(op, f"mask has dtype {mask.dtype}: required torch.bool")
    num_groups = mask.shape[1]
    if num_groups < 1 or dim % num_groups:
        _fail(op, f"mask has {num_groups} groups, which does not divide x.shape[1] = {dim}")
    _check_float(op, "x", x)
    if alpha is not None:
        _check_shape(op, "alpha", alpha, (num_tokens,), " (T = x.shape[0])")
        _check_float(op, "alpha", alpha)
    return num_tokens, dim, num_groups


def _read_weight(op: str, x: Tensor, dim: int, weight: Tensor, bias: Optional[Tensor]) -> None:
    if weight.dim() != 2 or weight.shape[1] != dim:
        _fail(op, f"weight has shape {tuple(weight.shape)}: required [O, {dim}] (D = x.shape[1])")
    if weight.dtype != x.dtype:
        _dtype_error(op, "weight", weight.dtype, like=x.dtype)
    if bias is not None:
        _check_shape(op, "bias", bias, (weight.shape[0],), " (O = weight.shape[0])")
        _check_float(op, "bias", bias)


def check_read(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor,
               alpha: Optional[Tensor]) -> int:
    """The contract of `mohdify::read`; returns the group size G."""
    _, dim, num_groups = _read_input(op, x, mask, alpha)
    _read_weight(op, x, dim, weight, bias)
    return dim // num_groups


def check_read_lists(op: str, weights: list[Tensor], biases: list[Optional[Tensor]]) -> None:
    """`mohdify::read_multi` takes at least one weight and one bias (or None) per weight."""
    if len(weights) == 0 or len(weights) != len(biases):
        _fail(op, f"got {len(weights)} weights and {len(biases)} biases: required at least one weight and one "
                  "bias (or None) per weight")


def check_read_multi(op: str, x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], mask: Tensor,
                     alpha: Optional[Tensor]) -> int:
    """The contract of `mohdify::read_multi` (`check_read` per weight, x, mask and alpha checked once);
    returns the group size G."""
    check_read_lists(op, weights, biases)
    _, dim, num_groups = _read_input(op, x, mask, alpha)
    for w, b in zip(weights, biases):
        _read_weight(op, x, dim, w, b)
    return dim // num_groups


def check_read_backward(op: str, grad: Tensor, x: Tensor, weight: Tensor, mask: Tensor,
                        alpha: Optional[Tensor]) -> int:
    """The contract of `mohdify::read_backward`: the reader's, and grad `[T, O]`; returns G."""
    group_size = check_read(op, x, weight, None, mask, alpha)
    _check_shape(op, "grad", grad, (x.shape[0], weight.shape[0]), " ([T, O] of the read)")
    return group_size


# ---- writers: u [T, I], weight [D, I], bias [D], gates [T, N], fusion [N, N], residual [T, D] -> [T, D]

def check_write(op: str, u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor,
                fusion: Optional[Tensor], residual: Optional[Tensor] = None) -> int:
    """The contract of `mohdify::write` (and, with a residual, `mohdify::write_add`); returns G."""
    if u.dim() != 2:
        _fail(op, f"u has shape {tuple(u.shape)}: required 2-D [T, I]")
    num_tokens, in_features = u.shape
    if weight.dim() != 2 or weight.shape[1] != in_features:
        _fail(op, f"weight has shape {tuple(weight.shape)}: required [D, {in_features}] (I = u.shape[1])")
    if gates.dim() != 2 or gates.shape[0] != num_tokens:
        _fail(op, f"gates has shape {tuple(gates.shape)}: required [T, N] with T = u.shape[0] = {num_tokens}")
    out_features, num_groups = weight.shape[0], gates.shape[1]
    if num_groups < 1 or out_features % num_groups:
        _fail(op, f"gates has {num_groups} groups, which does not divide weight.shape[0] = {out_features}")
    _check_float(op, "u", u)
    if weight.dtype != u.dtype:
        _dtype_error(op, "weight", weight.dtype, like=u.dtype)
    _check_float(op, "gates", gates)
    if bias is not None:
        _check_shape(op, "bias", bias, (out_features,), " (D = weight.shape[0])")
        _check_float(op, "bias", bias)
    if fusion is not None:
        _check_shape(op, "fusion", fusion, (num_groups, num_groups), " (N = gates.shape[1])")
        _check_float(op, "fusion", fusion)
    if residual is not None:
        _check_shape(op, "residual", residual, (num_tokens, out_features), " ([T, D] of the write)")
        _check_float(op, "residual", residual)
    return out_features // num_groups


def check_write_backward(op: str, grad: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor,
                         fusion: Optional[Tensor]) -> int:
    """The contract of `mohdify::write_backward`: the writer's, and grad `[T, D]`; returns G."""
    group_size = check_write(op, u, weight, bias, gates, fusion)
    _check_shape(op, "grad", grad, (u.shape[0], weight.shape[0]), " ([T, D] of the write)")
    return group_size
