"""CUDA side of `mohdify::read`: the fused Triton forward, and `mohdify::read_backward`.

The backward is its own custom op so that torch.compile / AOT autograd can trace the registered
autograd formula (a Triton launcher cannot take fake tensors): on CPU it runs the reference
`read_backward_naive`, on CUDA the launchers. The CPU path stays the reference. On CUDA, inputs
the kernels cannot take (e.g. a group size that is not a multiple of 16) run the reference with a
warning that says why, rather than failing inside a model.
"""

import warnings
from typing import Optional

import torch
from torch import Tensor

from .naive import read_backward_naive, read_naive


def _unsupported(x, weight, bias, mask, alpha) -> Optional[str]:
    from .launch import check_read_inputs

    try:
        check_read_inputs(x, weight, bias, mask, alpha)
    except ValueError as err:
        return str(err)
    return None


def read_cuda(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, alpha: Optional[Tensor]) -> Tensor:
    """CUDA kernel of `mohdify::read`: the fused Triton reader."""
    reason = _unsupported(x, weight, bias, mask, alpha)
    if reason is not None:
        warnings.warn(f"mohdify::read on CUDA runs the reference path: {reason}", stacklevel=2)
        return read_naive(x, weight, bias, mask, alpha)
    from .launch import read_triton

    return read_triton(x, weight, bias, mask, alpha)


def _pack(grads, has_bias: bool, has_alpha: bool, x: Tensor):
    grad_x, grad_w, grad_b, grad_alpha = grads
    # Separate empties: outputs of a custom op must not alias each other.
    return grad_x, grad_w, grad_b if has_bias else x.new_empty(0), grad_alpha if has_alpha else x.new_empty(0)


@torch.library.custom_op("mohdify::read_backward", mutates_args=())
def read_backward_op(grad: Tensor, x: Tensor, weight: Tensor, has_bias: bool, mask: Tensor,
                     alpha: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_x, grad_w, grad_b, grad_alpha); absent gradients come back as empty tensors."""
    grads = read_backward_naive(grad, x, weight, has_bias, mask, alpha)
    return _pack(grads, has_bias, alpha is not None, x)


@read_backward_op.register_kernel("cuda")
def _read_backward_cuda(grad, x, weight, has_bias, mask, alpha):
    reason = _unsupported(x, weight, None, mask, alpha)
    if reason is not None:
        warnings.warn(f"mohdify::read_backward on CUDA runs the reference path: {reason}", stacklevel=2)
        grads = read_backward_naive(grad, x, weight, has_bias, mask, alpha)
    else:
        from .launch import read_backward_triton

        grads = read_backward_triton(grad, x, weight, has_bias, mask, alpha)
    return _pack(grads, has_bias, alpha is not None, x)


@read_backward_op.register_fake
def _read_backward_fake(grad, x, weight, has_bias, mask, alpha):
    grad_b = grad.new_empty(weight.shape[0]) if has_bias else grad.new_empty(0)
    grad_alpha = alpha.new_empty(alpha.shape) if alpha is not None else x.new_empty(0)
    return x.new_empty(x.shape), weight.new_empty(weight.shape), grad_b, grad_alpha


def read_backward(grad: Tensor, x: Tensor, weight: Tensor, has_bias: bool, mask: Tensor,
                  alpha: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """`read_backward_op` with absent gradients as None, for the autograd formula in op.py."""
    grad_x, grad_w, grad_b, grad_alpha = read_backward_op(grad, x, weight, has_bias, mask, alpha)
    return grad_x, grad_w, grad_b if has_bias else None, grad_alpha if alpha is not None else None
