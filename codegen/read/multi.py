"""`mohdify::read_multi`: all readers of one branch input (q|k|v, gate|up) as one op.

The torch.compile backend's fusion pass (passes/fuse.py) puts it where several
`mohdify::read` calls share x, mask and alpha. On CPU it is the CPU reader kernel per weight with
the routing read once (`codegen/cpu/read.py`: the numbers of the separate reads, bit for bit); on
CUDA one Triton launch per 4 weights (`read_multi_triton`). The backward is the reader's, per
weight (`mohdify::read_backward`), with the gradients of x and alpha summed over the weights.
Biases get gradients when every weight has one or none has (torch.library differentiates a list
only when all its entries are tensors).

Shape legend: T = tokens, D = in_features, O_i = out_features of weight i, N = groups.
"""

from typing import Optional

import torch
from torch import Tensor

from ..contracts import check_read_lists
from ..cpu.read import read_multi_cpu
from ..devices import kernel_or_reference, register_devices
from .fused import read_backward
from .naive import read_naive

__all__ = ["read_multi", "read_multi_naive"]


def read_multi_naive(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], mask: Tensor,
                     alpha: Optional[Tensor]) -> list[Tensor]:
    """`[read_naive(x, W_i, b_i, mask, alpha)]`: x `[T, D]`, W_i `[O_i, D]` -> `[T, O_i]` each."""
    check_read_lists("mohdify::read_multi", weights, biases)
    return [read_naive(x, w, b, mask, alpha) for w, b in zip(weights, biases)]


@torch.library.custom_op("mohdify::read_multi", mutates_args=())
def read_multi(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], mask: Tensor,
               alpha: Optional[Tensor]) -> list[Tensor]:
    """See `read_multi_naive`."""
    return read_multi_naive(x, weights, biases, mask, alpha)


@read_multi.register_fake
def _read_multi_fake(x, weights, biases, mask, alpha):
    check_read_lists("mohdify::read_multi", weights, biases)
    return [x.new_empty(x.shape[0], w.shape[0]) for w in weights]


def _read_multi_cuda(x, weights, biases, mask, alpha):
    from .launch import check_read_inputs, read_multi_triton

    check_read_lists("mohdify::read_multi", weights, biases)
    return kernel_or_reference("mohdify::read_multi", lambda op: check_read_inputs(op, x, weights, biases, mask, alpha),
                               lambda: read_multi_triton(x, weights, biases, mask, alpha),
                               lambda: read_multi_naive(x, weights, biases, mask, alpha))


def _setup_context(ctx, inputs, output):
    x, weights, biases, mask, alpha = inputs
    ctx.has_bias = [b is not None for b in biases]
    if not all(ctx.has_bias) and any(b is not None and b.requires_grad for b in biases):
        # torch.library differentiates a list argument only when every entry is a tensor.
        raise ValueError(f"mohdify::read_multi got biases {['tensor' if h else None for h in ctx.has_bias]}: "
                         "gradients reach the biases only when every weight has one or none has; "
                         "split the call into reads with and reads without a bias")
    ctx.has_alpha = alpha is not None
    ctx.save_for_backward(x, mask, alpha if alpha is not None else x.new_empty(0), *weights)


def _backward(ctx, grads):
    x, mask, alpha, *weights = ctx.saved_tensors
    alpha = alpha if ctx.has_alpha else None
    grad_x = grad_alpha = None
    grad_ws, grad_bs = [], []
    for grad, w, has_bias in zip(grads, weights, ctx.has_bias):
        if grad is None:   # an output that reaches no loss
            grad_ws.append(None)
            grad_bs.append(None)
            continue
        gx, gw, gb, ga = read_backward(grad, x, w, has_bias, mask, alpha)
        grad_x = gx if grad_x is None else grad_x + gx                        # [T, D]
        if ga is not None:
            grad_alpha = ga if grad_alpha is None else grad_alpha + ga        # [T]
        grad_ws.append(gw)
        grad_bs.append(gb)
    # A list with a None in it is one non-differentiable argument for torch.library: its gradient is None.
    return grad_x, grad_ws, grad_bs if all(ctx.has_bias) else None, None, grad_alpha


read_multi.register_autograd(_backward, setup_context=_setup_context)
register_devices(read_multi, cpu=read_multi_cpu, cuda=_read_multi_cuda)
