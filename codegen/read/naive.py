"""Reference MoHD reader: a linear map that reads only the active groups of its input.

Shape legend: T = tokens, D = hidden size (in_features), O = out_features, N = groups, G = D / N.
"""

from typing import Optional

import torch.nn.functional as F
from torch import Tensor


def expand_groups(per_group: Tensor, group_size: int) -> Tensor:
    """`[T, N]` -> `[T, N * G]`: repeat each group's value over its G dims."""
    return per_group.repeat_interleave(group_size, dim=1)


def read_naive(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, alpha: Optional[Tensor]) -> Tensor:
    """y_t = alpha_t * W[:, A_t] x_t[A_t] + b.

    Args:
        x: `[T, D]` branch input.
        weight: `[O, D]`.
        bias: `[O]` or None.
        mask: `[T, N]` bool, the active groups A_t.
        alpha: `[T]` activation scale, or None for 1.

    Returns:
        `[T, O]`.
    """
    group_size = x.shape[1] // mask.shape[1]                                  # G
    xm = x * expand_groups(mask, group_size).to(x.dtype)                      # [T, D]
    if alpha is None:
        return F.linear(xm, weight, bias)                                     # [T, O]
    y = F.linear(xm, weight) * alpha[:, None].to(x.dtype)                     # [T, O]
    return y if bias is None else y + bias                                    # [T, O]


def read_backward_naive(grad: Tensor, x: Tensor, weight: Tensor, has_bias: bool, mask: Tensor,
                        alpha: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """Gradients of `read_naive` w.r.t. (x, weight, bias, alpha); `grad` is `[T, O]`."""
    group_size = x.shape[1] // mask.shape[1]                                  # G
    m = expand_groups(mask, group_size).to(x.dtype)                           # [T, D]
    xm = x * m                                                                # [T, D]
    grad_alpha = None
    grad_scaled = grad                                                        # [T, O]
    if alpha is not None:
        grad_alpha = (grad * F.linear(xm, weight)).sum(-1).to(alpha.dtype)   # [T]
        grad_scaled = grad * alpha[:, None].to(grad.dtype)                    # [T, O]
    grad_x = (grad_scaled @ weight) * m                                       # [T, D]
    grad_w = grad_scaled.t() @ xm                                             # [O, D]
    grad_b = grad.sum(0) if has_bias else None                                # [O]
    return grad_x, grad_w, grad_b, grad_alpha
