"""Reference MoHD writer: the output rows of active groups, gated, then group fusion.

Shape legend: T = tokens, I = in_features, D = hidden size (out_features), N = groups, G = D / N.
"""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def write_naive(u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor, fusion: Optional[Tensor]) -> Tensor:
    """o_t[group i] = g_{t,i} (W[group i] u_t + b[group i]); o'_t = (M (x) I_G) o_t.

    Args:
        u: `[T, I]` writer input.
        weight: `[D, I]`.
        bias: `[D]` or None.
        gates: `[T, N]` gate of each group, 0 for inactive groups.
        fusion: `[N, N]` group-mixing matrix M, or None.

    Returns:
        `[T, D]`.
    """
    num_tokens, num_groups = gates.shape                                      # T, N
    z = F.linear(u, weight, bias)                                             # [T, D]
    zg = z.view(num_tokens, num_groups, z.shape[1] // num_groups) * gates[:, :, None].to(z.dtype)  # [T, N, G]
    if fusion is not None:
        zg = torch.einsum("ij,tjg->tig", fusion.to(z.dtype), zg)              # [T, N, G]
    return zg.reshape(num_tokens, z.shape[1])                                 # [T, D]


def write_backward_naive(grad: Tensor, u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor,
                         fusion: Optional[Tensor]):
    """Gradients of `write_naive` w.r.t. (u, weight, bias, gates, fusion); `grad` is `[T, D]`."""
    num_tokens, num_groups = gates.shape                                      # T, N
    z = F.linear(u, weight, bias)                                             # [T, D]
    z = z.view(num_tokens, num_groups, z.shape[1] // num_groups)             # [T, N, G]
    g = gates[:, :, None].to(z.dtype)                                         # [T, N, 1]
    grad3 = grad.view(num_tokens, num_groups, grad.shape[1] // num_groups)    # [T, N, G]
    grad_fusion = None
    if fusion is not None:
        grad_fusion = torch.einsum("tig,tjg->ij", grad3, z * g).to(fusion.dtype)  # [N, N]
        grad3 = torch.einsum("ij,tig->tjg", fusion.to(z.dtype), grad3)        # [T, N, G]
    grad_gates = (grad3 * z).sum(-1).to(gates.dtype)                          # [T, N]
    grad_z = (grad3 * g).reshape(num_tokens, grad.shape[1])                   # [T, D]
    grad_u = grad_z @ weight                                                  # [T, I]
    grad_w = grad_z.t() @ u                                                   # [D, I]
    grad_b = grad_z.sum(0) if bias is not None else None                      # [D]
    return grad_u, grad_w, grad_b, grad_gates, grad_fusion
