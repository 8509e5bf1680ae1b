"""CUDA side of `mohdify::write`: the fused Triton forward, and `mohdify::write_backward`.

As for the reader: the backward is a custom op (traceable by AOT autograd) whose CPU kernel is
codegen/cpu/backward.py (active groups only) and whose CUDA kernel uses the launchers. Inputs the kernels
cannot take run the reference with a warning (codegen/devices.py). The CPU forward kernel is
codegen/cpu/write.py.
"""

from typing import Optional

import torch
from torch import Tensor

from ..cpu.backward import write_backward_cpu
from ..devices import kernel_or_reference, register_devices
from .naive import write_backward_naive, write_naive


def _check(op: str, u, weight, bias, gates, fusion) -> None:
    from .launch import check_write_inputs

    check_write_inputs(op, u, weight, bias, gates, fusion)


def write_cuda(u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor, fusion: Optional[Tensor]) -> Tensor:
    """CUDA kernel of `mohdify::write`: the fused Triton writer."""
    def kernel():
        from .launch import write_triton

        return write_triton(u, weight, bias, gates, fusion)

    return kernel_or_reference("mohdify::write", lambda op: _check(op, u, weight, bias, gates, fusion), kernel,
                               lambda: write_naive(u, weight, bias, gates, fusion))


def _pack(grads, u: Tensor):
    grad_u, grad_w, grad_b, grad_gates, grad_fusion = grads
    # Separate empties: outputs of a custom op must not alias each other.
    return (grad_u, grad_w, grad_b if grad_b is not None else u.new_empty(0), grad_gates,
            grad_fusion if grad_fusion is not None else u.new_empty(0))


@torch.library.custom_op("mohdify::write_backward", mutates_args=())
def write_backward_op(grad: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor,
                      fusion: Optional[Tensor], need_gates: bool = True,
                      out: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(grad_u, grad_w, grad_b, grad_gates, grad_fusion); absent gradients come back empty. With
    need_gates False (the gates need no gradient) a kernel may return zeros for grad_gates; `out`,
    the forward's output when it had no fusion, lets a kernel read z = out / gates instead of
    recomputing W u + b (the CPU kernel does)."""
    return _pack(write_backward_naive(grad, u, weight, bias, gates, fusion), u)


def _write_backward_cpu(grad, u, weight, bias, gates, fusion, need_gates=True, out=None):
    return _pack(write_backward_cpu(grad, u, weight, bias, gates, fusion, need_gates, out), u)


def _write_backward_cuda(grad, u, weight, bias, gates, fusion, need_gates=True, out=None):
    def kernel():
        from .backward import write_backward_triton

        return write_backward_triton(grad, u, weight, bias, gates, fusion)

    return _pack(kernel_or_reference("mohdify::write_backward",
                                     lambda op: _check(op, u, weight, bias, gates, fusion),
                                     kernel, lambda: write_backward_naive(grad, u, weight, bias, gates, fusion)), u)


register_devices(write_backward_op, cpu=_write_backward_cpu, cuda=_write_backward_cuda)


@write_backward_op.register_fake
def _write_backward_fake(grad, u, weight, bias, gates, fusion, need_gates=True, out=None):
    grad_b = bias.new_empty(bias.shape) if bias is not None else u.new_empty(0)
    grad_fusion = fusion.new_empty(fusion.shape) if fusion is not None else u.new_empty(0)
    return u.new_empty(u.shape), weight.new_empty(weight.shape), grad_b, gates.new_empty(gates.shape), grad_fusion


def write_backward(grad: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor,
                   fusion: Optional[Tensor], need_gates: bool = True, out: Optional[Tensor] = None):
    """`write_backward_op` with absent gradients as None, for the autograd formula in op.py."""
    grad_u, grad_w, grad_b, grad_gates, grad_fusion = write_backward_op(grad, u, weight, bias, gates, fusion,
                                                                        need_gates, out)
    return grad_u, grad_w, grad_b if bias is not None else None, grad_gates, grad_fusion if fusion is not None else None
