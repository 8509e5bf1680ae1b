"""`mohdify::read`: the MoHD reader as a custom op with a registered backward."""

from typing import Optional

import torch
from torch import Tensor

from ..cpu.read import read_cpu
from ..devices import register_devices
from .fused import read_backward, read_cuda
from .naive import read_naive


@torch.library.custom_op("mohdify::read", mutates_args=())
def read(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, alpha: Optional[Tensor]) -> Tensor:
    """See `read_naive`: `[T, D]` -> `[T, O]`."""
    return read_naive(x, weight, bias, mask, alpha)


@read.register_fake
def _read_fake(x, weight, bias, mask, alpha):
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup_context(ctx, inputs, output):
    x, weight, bias, mask, alpha = inputs
    ctx.has_bias = bias is not None
    ctx.has_alpha = alpha is not None
    ctx.save_for_backward(x, weight, mask, alpha if alpha is not None else x.new_empty(0))


def _backward(ctx, grad):
    x, weight, mask, alpha = ctx.saved_tensors
    # A custom op (reference on CPU, Triton on CUDA) so that AOT autograd can trace this formula.
    grads = read_backward(grad, x, weight, ctx.has_bias, mask, alpha if ctx.has_alpha else None)
    grad_x, grad_w, grad_b, grad_alpha = grads
    return grad_x, grad_w, grad_b, None, grad_alpha


read.register_autograd(_backward, setup_context=_setup_context)
# CUDA runs the fused Triton reader (codegen/read/kernel.py), CPU the kernel over contiguous active
# weight blocks (codegen/cpu/read.py); the reference above is the ground truth in tests.
register_devices(read, cpu=read_cpu, cuda=read_cuda)
