"""Backward launcher of the fused MoHD writer (Triton), `write_backward_triton`.

Its own module, not launch.py: it uses the reader's launcher (grad_u is the reader's pattern on
W.T), and keeping it here lets read/launch.py and write/launch.py import nothing of each other.

Shape legend: T = tokens, I = in_features, D = out_features = N * G, N = groups, G = group size.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..contracts import check_write_backward
from ..read.launch import read_triton
from .launch import check_write_devices, mix_triton

__all__ = ["write_backward_triton"]


def write_backward_triton(grad: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor,
                          fusion: Optional[Tensor]):
    """Gradients of the writer w.r.t. (u, weight, bias, gates, fusion), as `write_backward_naive`.

    grad through the fusion is the mixing kernel on M.T. grad_u = grad_z W, where grad_z is zero
    outside a token's active groups: the reader kernel with mask = (gates != 0). The contract gives
    gate gradients at every group (inactive ones too), which needs z = W u + b densely: cuBLAS.
    grad_w, grad_b and grad_fusion are dense reductions: cuBLAS / torch.
    """
    group_size = check_write_backward("write_backward_triton", grad, u, weight, bias, gates, fusion)
    check_write_devices("write_backward_triton", group_size, u, weight, bias, gates, fusion)
    num_tokens, num_groups = gates.shape
    z = F.linear(u, weight, bias).view(num_tokens, num_groups, -1)            # [T, N, G]
    g = gates[:, :, None].to(z.dtype)                                         # [T, N, 1]
    grad_fusion = None
    grad_o = grad                                                             # [T, D]
    if fusion is not None:
        grad3 = grad.view(num_tokens, num_groups, -1)                         # [T, N, G]
        grad_fusion = torch.einsum("tig,tjg->ij", grad3, z * g).to(fusion.dtype)  # [N, N]
        grad_o = mix_triton(grad, fusion.t(), None, None, grad.dtype, group_size)  # [T, D]
    grad_o3 = grad_o.view(num_tokens, num_groups, -1)                         # [T, N, G]
    grad_gates = (grad_o3 * z).sum(-1).to(gates.dtype)                        # [T, N]
    grad_z = (grad_o3 * g).reshape(num_tokens, -1)                            # [T, D]
    grad_u = read_triton(grad_z, weight.t(), None, gates != 0, None)          # [T, I]
    grad_w = grad_z.t() @ u                                                   # [D, I]
    grad_b = grad_z.sum(0) if bias is not None else None                      # [D]
    return grad_u, grad_w, grad_b, grad_gates, grad_fusion
