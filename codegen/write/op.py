"""`mohdify::write`: the MoHD writer as a custom op with a registered backward."""

from typing import Optional

import torch
from torch import Tensor

from ..cpu.write import write_cpu
from ..devices import register_devices
from .fused import write_backward, write_cuda
from .naive import write_naive


@torch.library.custom_op("mohdify::write", mutates_args=())
def write(u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor, fusion: Optional[Tensor]) -> Tensor:
    """See `write_naive`: `[T, I]` -> `[T, D]`."""
    return write_naive(u, weight, bias, gates, fusion)


@write.register_fake
def _write_fake(u, weight, bias, gates, fusion):
    return u.new_empty(u.shape[0], weight.shape[0])


def _setup_context(ctx, inputs, output):
    u, weight, bias, gates, fusion = inputs
    ctx.has_bias = bias is not None
    ctx.has_fusion = fusion is not None
    empty = u.new_empty(0)
    # Without fusion the output is gates * z: the CPU backward reads z = out / gates from it
    # instead of running the forward matmul again for the gates' gradient.
    ctx.save_for_backward(u, weight, bias if bias is not None else empty, gates,
                          fusion if fusion is not None else empty, output if fusion is None else empty)


def _backward(ctx, grad):
    u, weight, bias, gates, fusion, out = ctx.saved_tensors
    # A custom op (CPU kernel in codegen/cpu/backward.py, Triton on CUDA) that AOT autograd can trace.
    return write_backward(grad, u, weight, bias if ctx.has_bias else None, gates,
                          fusion if ctx.has_fusion else None, ctx.needs_input_grad[3],
                          out if not ctx.has_fusion else None)


write.register_autograd(_backward, setup_context=_setup_context)
# CUDA runs the fused Triton writer (codegen/write/kernel.py), CPU the kernel over contiguous active
# weight rows (codegen/cpu/write.py); the reference above is the ground truth in tests.
register_devices(write, cpu=write_cpu, cuda=write_cuda)
