"""Backward launcher of the fused MoHD reader (Triton), `read_backward_triton`.

Its own module, not launch.py: it uses the writer's launcher (grad_x is the writer's gathered-row
pattern), and keeping it here lets read/launch.py and write/launch.py import nothing of each other.

Shape legend: T = tokens, D = in_features = N * G, O = out_features, N = groups, G = group size.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..contracts import check_read_backward
from ..write.launch import write_triton
from .launch import check_read_devices, read_triton

__all__ = ["read_backward_triton"]


def read_backward_triton(grad: Tensor, x: Tensor, weight: Tensor, has_bias: bool, mask: Tensor,
                         alpha: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of the reader w.r.t. (x, weight, bias, alpha), as `read_backward_naive`.

    grad_x only has the columns of a token's active groups: it is the writer's gathered-row
    pattern on W.T with per-group gates alpha_t * mask, so it runs on the writer kernel and skips
    groups inactive for a whole token tile. grad_alpha needs W[:, A] x[A] again: the reader kernel
    recomputes it. grad_w (a dense [O, D] result) and grad_b stay cuBLAS / torch reductions.
    """
    group_size = check_read_backward("read_backward_triton", grad, x, weight, mask, alpha)
    check_read_devices("read_backward_triton", group_size, x, [weight], [None], mask, alpha)
    scale = mask.to(torch.float32)                                            # [T, N]
    grad_alpha = None
    grad_scaled = grad                                                        # [T, O]
    if alpha is not None:
        plain = read_triton(x, weight, None, mask, None)                      # [T, O] = W[:, A] x[A]
        grad_alpha = (grad.float() * plain.float()).sum(-1).to(alpha.dtype)   # [T]
        scale = scale * alpha.float()[:, None]                                # [T, N]
        grad_scaled = grad * alpha[:, None].to(grad.dtype)                    # [T, O]
    grad_x = write_triton(grad, weight.t(), None, scale, None)                # [T, D]
    xm = x * mask.repeat_interleave(group_size, dim=1).to(x.dtype)            # [T, D]
    grad_w = grad_scaled.t() @ xm                                             # [O, D]
    grad_b = grad.sum(0) if has_bias else None                                # [O]
    return grad_x, grad_w, grad_b, grad_alpha
