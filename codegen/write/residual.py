"""`mohdify::write_add`: the MoHD writer with the residual add fused, h + write(u, ...).

The torch.compile backend's fusion pass (passes/fuse.py) puts it where a `mohdify::write`
result reaches nothing but the residual add. On CPU it is the CPU writer kernel plus the residual
(`codegen/cpu/write.py`: the numbers of the separate write and add, bit for bit); on CUDA
`write_triton(..., residual=...)`,
which adds the residual in the writer's (or the mixing kernel's) epilogue. The backward is the
writer's (`mohdify::write_backward`); the residual's gradient is the incoming gradient.

Shape legend: T = tokens, I = in_features, D = out_features, N = groups.
"""

from typing import Optional

import torch
from torch import Tensor

from ..contracts import ContractError
from ..cpu.write import write_add_cpu
from ..devices import kernel_or_reference, register_devices
from .fused import write_backward
from .naive import write_naive

__all__ = ["write_add", "write_add_naive"]


def write_add_naive(u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor, fusion: Optional[Tensor],
                    residual: Tensor) -> Tensor:
    """`write_naive(u, weight, bias, gates, fusion) + residual`; residual `[T, D]` -> `[T, D]`."""
    return write_naive(u, weight, bias, gates, fusion) + residual             # [T, D]


@torch.library.custom_op("mohdify::write_add", mutates_args=())
def write_add(u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor, fusion: Optional[Tensor],
              residual: Tensor) -> Tensor:
    """See `write_add_naive`."""
    return write_add_naive(u, weight, bias, gates, fusion, residual)


@write_add.register_fake
def _write_add_fake(u, weight, bias, gates, fusion, residual):
    return u.new_empty(u.shape[0], weight.shape[0], dtype=torch.promote_types(u.dtype, residual.dtype))


def _write_add_cuda(u, weight, bias, gates, fusion, residual):
    from .launch import check_write_inputs, write_triton

    def check(op: str) -> None:
        check_write_inputs(op, u, weight, bias, gates, fusion, residual)
        if residual.dtype != u.dtype:
            raise ContractError(op, f"residual has dtype {residual.dtype}, but u has {u.dtype}: the fused add on "
                                    "CUDA needs them equal")

    return kernel_or_reference("mohdify::write_add", check,
                               lambda: write_triton(u, weight, bias, gates, fusion, residual=residual),
                               lambda: write_add_naive(u, weight, bias, gates, fusion, residual))


def _setup_context(ctx, inputs, output):
    u, weight, bias, gates, fusion, residual = inputs
    ctx.has_bias = bias is not None
    ctx.has_fusion = fusion is not None
    ctx.residual_dtype = residual.dtype
    # fp32 without fusion: the backward reads the write (gates * z) as output - residual, so the gates'
    # gradient needs no second matmul (as `write` reads its output); the difference is taken only when
    # the gates need a gradient (the CPU kernel reads it only then). Both tensors are the hidden states
    # before and after the branch, which the model keeps for its own backward anyway. bf16 / fp16 would
    # lose the write to cancellation against a large residual: they run the matmul.
    ctx.from_out = fusion is None and u.dtype == residual.dtype == torch.float32
    empty = u.new_empty(0)
    ctx.save_for_backward(u, weight, bias if bias is not None else empty, gates,
                          fusion if fusion is not None else empty,
                          output if ctx.from_out else empty, residual if ctx.from_out else empty)


def _backward(ctx, grad):
    u, weight, bias, gates, fusion, output, residual = ctx.saved_tensors
    grads = write_backward(grad.to(u.dtype), u, weight, bias if ctx.has_bias else None, gates,
                           fusion if ctx.has_fusion else None, ctx.needs_input_grad[3],
                           output - residual if ctx.from_out and ctx.needs_input_grad[3] else None)
    return (*grads, grad.to(ctx.residual_dtype))


write_add.register_autograd(_backward, setup_context=_setup_context)
register_devices(write_add, cpu=write_add_cpu, cuda=_write_add_cuda)
