"""Host-side plan of a CPU kernel call: which groups are active, for how many tokens, and which path runs.

The CPU kernels read the routing (a `[T, N]` mask or gates, N <= a few dozen) on the host once per
call and launch torch ops over contiguous weight blocks. Paths (thresholds measured, codegen/README.md):
  - "dense":  the reference itself (a masked dense F.linear): when every group is in use, or when
              grouping would cost more than the dense layer (prefill at high density);
  - "decode": few tokens (T <= DECODE_MAX_TOKENS): one matmul per run of consecutive groups that
              some token uses, each reading one contiguous weight block; the groups no token uses
              are never read;
  - "grouped": prefill: groups every token uses run as one matmul over all tokens, the others
              gather their tokens, so each group's weight block is read once for all its tokens.

Shape legend: T = tokens, N = groups, G = group size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GroupPlan", "plan_groups", "runs", "DECODE_MAX_TOKENS", "GROUPED_MAX_FRACTION"]

DECODE_MAX_TOKENS = 16
# Prefill: the grouped path runs when the active (token, group) pairs are at most this fraction of
# T * N; above it the dense reference is faster. Measured (codegen/README.md, T = 512, D 2048 x 5632,
# fp32, 1 thread; grouped / dense): reader 4.2x / 1.5x / 2.0x at 25 / 37.5 / 50%, writer 2.5x /
# 1.5x / 0.89x. bf16 grouped lost everywhere (0.2-0.4x): bf16 small matmuls are slow on CPU.
GROUPED_MAX_FRACTION = {
    "read": {torch.float32: 0.5, torch.bfloat16: 0.0, torch.float16: 0.0},
    "write": {torch.float32: 0.4, torch.bfloat16: 0.0, torch.float16: 0.0},
}


def runs(groups: list[int]) -> list[tuple[int, int]]:
    """Sorted group ids -> maximal runs [a, b) of consecutive ids: [0, 1, 2, 5, 6] -> [(0, 3), (5, 7)]."""
    out: list[tuple[int, int]] = []
    for g in groups:
        if out and out[-1][1] == g:
            out[-1] = (out[-1][0], g + 1)
        else:
            out.append((g, g + 1))
    return out


@dataclass(frozen=True)
class GroupPlan:
    path: str                     # "dense", "decode" or "grouped"
    full: list[int]               # groups every token uses
    partial: list[int]            # groups some but not all tokens use
    tokens_of: dict[int, Tensor]  # grouped path: group -> int64 ids of its tokens (partial groups only)

    @property
    def used(self) -> list[int]:
        return sorted(self.full + self.partial)


def plan_groups(active: Tensor, dtype: torch.dtype, kind: str) -> GroupPlan:
    """`active` `[T, N]` bool (reader mask, or writer gates != 0) -> the plan of one call (T >= 1);
    `kind` is "read" or "write" (their prefill crossovers differ)."""
    num_tokens, num_groups = active.shape
    counts = active.sum(0).tolist()                                           # [N] tokens per group
    full = [g for g, c in enumerate(counts) if c == num_tokens]
    partial = [g for g, c in enumerate(counts) if 0 < c < num_tokens]
    if len(full) == num_groups:
        return GroupPlan("dense", full, partial, {})
    if num_tokens <= DECODE_MAX_TOKENS:
        return GroupPlan("decode", full, partial, {})
    fraction = sum(counts) / (num_tokens * num_groups)
    if fraction > GROUPED_MAX_FRACTION[kind].get(dtype, 0.0):
        return GroupPlan("dense", full, partial, {})
    tokens_of = {g: active[:, g].nonzero().squeeze(1) for g in partial}      # [T_g] each
    return GroupPlan("grouped", full, partial, tokens_of)
