"""`mohdify::route`: top-k group selection as a custom op (a named node in captured graphs).

Its outputs are discrete (a mask and indices), so it has no backward: gradients reach the
router through the gates, which are computed from the probabilities outside this op.
"""

import torch
from torch import Tensor

from .naive import route_naive


@torch.library.custom_op("mohdify::route", mutates_args=())
def route(scores: Tensor, shared_idx: Tensor, routed_idx: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """See `route_naive`: `[T, N_r]` scores -> (`[T, N]` bool mask, `[T, k]` int64 top-k columns)."""
    return route_naive(scores, shared_idx, routed_idx, top_k)


@route.register_fake
def _route_fake(scores, shared_idx, routed_idx, top_k):
    num_groups = shared_idx.shape[0] + routed_idx.shape[0]
    mask = scores.new_empty(scores.shape[0], num_groups, dtype=torch.bool)
    topk = scores.new_empty(scores.shape[0], top_k, dtype=torch.int64)
    return mask, topk
