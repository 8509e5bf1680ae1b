"""Where the grouped CPU path beats the dense one for many tokens (prefill, training), forward and backward.

The grouped path runs one matmul per group over the tokens that use it (codegen/cpu/plan.py). Its
matmuls are narrow (K or N = G, the group size) and it gathers / scatters rows per group, so it pays
only when the active (token, group) pairs are a small enough share of T * N and the groups are wide
enough. This table holds the measured crossover (`benchmarks/bench_cpu_crossover.py`, numbers in
codegen/README.md): for each op direction and dtype, rows of (minimum group size, minimum tokens,
largest active share at which grouped was faster than dense). The first row whose group size and
token count the call meets decides; no row means dense. The dense path stays the fallback
everywhere (MoHD never slower than its dense-equivalent for the same shape).

Kinds: "read" / "write" (forward of read, read_multi / write, write_add) and "read_backward" /
"write_backward".
"""

from __future__ import annotations

import torch

__all__ = ["GROUPED_WHEN", "grouped_pays"]

_F32 = torch.float32
# (kind, dtype) -> [(min group size, min tokens, max active share)], most specific first.
GROUPED_WHEN: dict[tuple[str, torch.dtype], list[tuple[int, int, float]]] = {
    ("read", _F32): [(64, 0, 0.5), (32, 0, 0.5)],
    ("write", _F32): [(64, 0, 0.4), (32, 0, 0.5)],
    ("read_backward", _F32): [(32, 0, 0.5)],
    ("write_backward", _F32): [(32, 0, 0.5)],
}


def grouped_pays(kind: str, dtype: torch.dtype, group_size: int, tokens: int, share: float) -> bool:
    """Whether the grouped path is the faster one for a call of `tokens` tokens whose active
    (token, group) pairs are `share` of T * N, at group size `group_size` (0: unknown, taken as wide)."""
    for min_group, min_tokens, max_share in GROUPED_WHEN.get((kind, dtype), ()):
        if (group_size == 0 or group_size >= min_group) and tokens >= min_tokens:
            return share <= max_share
    return False
