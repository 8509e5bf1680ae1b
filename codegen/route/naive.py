"""Reference top-k group selection.

Shape legend: T = tokens, N = groups, N_s = shared groups, N_r = routed groups, k = top_k.
"""

import torch
from torch import Tensor


def route_naive(scores: Tensor, shared_idx: Tensor, routed_idx: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Pick the top-k routed groups of each token; ties go to the lower index.

    Args:
        scores: `[T, N_r]` routing scores (probabilities or group energies), routed groups in order.
        shared_idx: `[N_s]` int64 group ids that are always active.
        routed_idx: `[N_r]` int64 group ids of the routed groups, in the column order of `scores`.
        top_k: k.

    Returns:
        mask: `[T, N]` bool, True for active groups (shared and chosen).
        topk: `[T, k]` int64 column indices into `scores` of the chosen routed groups.
    """
    num_tokens = scores.shape[0]                                              # T
    num_groups = shared_idx.numel() + routed_idx.numel()                      # N
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices  # [T, N_r]
    topk = order[:, :top_k].contiguous()                                      # [T, k]
    # out-of-place ops: the torch.compile backend also uses this function as the op's decomposition
    mask = torch.zeros(num_tokens, num_groups, dtype=torch.bool, device=scores.device)  # [T, N]
    mask = mask.index_fill(1, shared_idx, True)                               # [T, N]
    return mask.scatter(1, routed_idx[topk], True), topk                      # [T, N], [T, k]
