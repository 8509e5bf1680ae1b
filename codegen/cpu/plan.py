"""Host-side plan of a CPU kernel call: which groups are active, for how many tokens, and which path runs.

The CPU kernels read the routing (a `[T, N]` mask or gates, N <= a few dozen) on the host once per
call and launch torch ops over contiguous weight blocks. Paths (thresholds measured, codegen/README.md):
  - "dense":  the reference itself (a masked dense F.linear): when every group is in use, or when
              grouping would cost more than the dense layer (prefill at high density);
  - "decode": few tokens (T <= DECODE_MAX_TOKENS): one matmul per run of consecutive groups that
              some token uses, each reading one contiguous weight block; the groups no token uses
              are never read;
  - "grouped": prefill: groups every token uses run as one matmul over all tokens, the others
              gather their tokens, so each group's weight block is read once for all its tokens;
              when it beats dense is the measured table of crossover.py.

Shape legend: T = tokens, N = groups, G = group size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from .crossover import grouped_pays

__all__ = ["GroupPlan", "plan_groups", "runs", "DECODE_MAX_TOKENS"]

DECODE_MAX_TOKENS = 16


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
    csr: Optional[Any] = None     # the same lists as one grouped.Csr, when the native planner made them

    @property
    def used(self) -> list[int]:
        return sorted(self.full + self.partial)


def plan_groups(active: Tensor, dtype: torch.dtype, kind: str, group_size: int = 0, native: bool = False) -> GroupPlan:
    """`active` `[T, N]` bool (reader mask, or writer gates != 0) -> the plan of one call (T >= 1);
    `kind` is a key of the crossover table (codegen/cpu/crossover.py: "read", "write",
    "read_backward", "write_backward"), `group_size` G (0: unknown), `native` whether the native
    many-token kernels (grouped.py) take the call's operands (their own crossover table)."""
    num_tokens, num_groups = active.shape
    lists = None
    if native:
        from .grouped import MAX_GROUPS, plan_lists
        native = num_groups <= MAX_GROUPS                                     # the native kernels' limit
    if native and num_tokens > DECODE_MAX_TOKENS:   # one C pass: counts and the partial groups' token lists
        counts, lists = plan_lists(active)
    else:
        counts = active.sum(0).tolist()                                       # [N] tokens per group
    full = [g for g, c in enumerate(counts) if c == num_tokens]
    partial = [g for g, c in enumerate(counts) if 0 < c < num_tokens]
    if len(full) == num_groups:
        return GroupPlan("dense", full, partial, {})
    if num_tokens <= DECODE_MAX_TOKENS:
        return GroupPlan("decode", full, partial, {})
    share = sum(counts) / (num_tokens * num_groups)
    if not grouped_pays(kind, dtype, group_size, num_tokens, share, native):
        return GroupPlan("dense", full, partial, {})
    if lists is not None:
        off = lists.off.tolist()
        tokens_of = {g: lists.tok[off[s]:off[s + 1]] for s, g in enumerate(partial)}  # [T_g] each, views
        return GroupPlan("grouped", full, partial, tokens_of, lists)
    tokens_of = {g: active[:, g].nonzero().squeeze(1) for g in partial}      # [T_g] each
    return GroupPlan("grouped", full, partial, tokens_of)
