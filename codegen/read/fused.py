"""CUDA side of `mohdify::read`: the fused Triton forward, and `mohdify::read_backward`.

The backward is its own custom op so that torch.compile / AOT autograd can trace the registered
autograd formula (a Triton launcher cannot take fake tensors): on CPU it runs
codegen/cpu/backward.py (active groups only), on CUDA the launchers. Inputs the kernels cannot take run the reference
with a warning (codegen/devices.py). The CPU forward kernel is codegen/cpu/read.py.
"""

from typing import Optional

import torch
from torch import Tensor

from ..cpu.backward import read_backward_cpu
from ..devices import kernel_or_reference, register_devices
from .naive import read_backward_naive, read_naive


def _check(op: str, x, weight, bias, mask, alpha) -> None:
    from .launch import check_read_inputs

    check_read_inputs(op, x, [weight], [bias], mask, alpha)


def read_cuda(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, alpha: Optional[Tensor]) -> Tensor:
    """CUDA kernel of `mohdify::read`: the fused Triton reader."""
    def kernel():
        from .launch import read_triton

        return read_triton(x, weight, bias, mask, alpha)

    return kernel_or_reference("mohdify::read", lambda op: _check(op, x, weight, bias, mask, alpha), kernel,
                               lambda: read_naive(x, weight, bias, mask, alpha))


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


def _read_backward_cuda(grad, x, weight, has_bias, mask, alpha):
    def kernel():
        from .backward import read_backward_triton

        return read_backward_triton(grad, x, weight, has_bias, mask, alpha)

    grads = kernel_or_reference("mohdify::read_backward", lambda op: _check(op, x, weight, None, mask, alpha), kernel,
                                lambda: read_backward_naive(grad, x, weight, has_bias, mask, alpha))
    return _pack(grads, has_bias, alpha is not None, x)


def _read_backward_cpu(grad, x, weight, has_bias, mask, alpha):
    return _pack(read_backward_cpu(grad, x, weight, has_bias, mask, alpha), has_bias, alpha is not None, x)


register_devices(read_backward_op, cpu=_read_backward_cpu, cuda=_read_backward_cuda)


@read_backward_op.register_fake
def _read_backward_fake(grad, x, weight, has_bias, mask, alpha):
    grad_b = grad.new_empty(weight.shape[0]) if has_bias else grad.new_empty(0)
    grad_alpha = alpha.new_empty(alpha.shape) if alpha is not None else x.new_empty(0)
    # CPU kernels return grad_w in the weight's layout (column-major readers, codegen/cpu/backward.py).
    grad_w = torch.empty_like(weight) if weight.device.type == "cpu" else weight.new_empty(weight.shape)
    return x.new_empty(x.shape), grad_w, grad_b, grad_alpha


def read_backward(grad: Tensor, x: Tensor, weight: Tensor, has_bias: bool, mask: Tensor,
                  alpha: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """`read_backward_op` with absent gradients as None, for the autograd formula in op.py."""
    grad_x, grad_w, grad_b, grad_alpha = read_backward_op(grad, x, weight, has_bias, mask, alpha)
    return grad_x, grad_w, grad_b if has_bias else None, grad_alpha if alpha is not None else None
