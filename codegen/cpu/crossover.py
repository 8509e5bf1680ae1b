"""Where the grouped CPU path beats the dense one for many tokens (prefill, training), forward and backward.

The grouped path runs one matmul per group over the tokens that use it (codegen/cpu/plan.py). Its
matmuls are narrow (K or N = G, the group size) and it gathers / scatters rows per group, so it pays
only when the active (token, group) pairs are a small enough share of T * N and the groups are wide
enough. This table holds the measured crossover (`benchmarks/bench_cpu_crossover.py`, numbers in
codegen/README.md): for each op direction and dtype, rows of (minimum group size, token range,
largest active share at which grouped was faster than dense). The first row whose group size and
token count the call meets decides; no row means dense. The dense path stays the fallback
everywhere (MoHD never slower than its dense-equivalent for the same shape).

Kinds: "read" / "write" (forward of read, read_multi / write, write_add) and "read_backward" /
"write_backward".
"""

from __future__ import annotations

import torch

__all__ = ["GROUPED_WHEN", "GROUPED_WHEN_NATIVE", "grouped_pays"]

_F32 = torch.float32
_ANY = 1 << 62
# Measured (benchmarks/bench_cpu_crossover.py, 2 threads, fp32, codegen/README.md): grouped / dense
# at G 32 (D 512, F 1408) and G 128 (D 2048, F 5632), T 128..8192, delta 0.25 / 0.5 / 0.75.
# Grouped wins at delta 0.25 almost everywhere (1.1-3.2x), is even at 0.5 for G 32 (0.84-1.20x),
# wins at 0.5 for G 128 at T 512 (1.36-1.57x), and loses at 0.75 (0.58-1.05x). It also loses when a
# group's gathered rows grow past ~8 MB (G 32 at T 8192, G 128 at T 2048, delta 0.5: 0.4-0.9x),
# hence the token caps. Narrower groups (G 8: train_lm.py's D 128) always lose: no row. At G 32,
# delta 0.5 the op-level reader gain (1.02-1.20x at T 512-2048, D -> F) did not survive in the model
# (HF Llama D 512, 8 x 256 tokens: MoHD step 0.948x of dense eager with it, 0.969x all dense), so
# G 32 groups only up to 30% active.
# (kind, dtype) -> [(min group size, min tokens, max tokens, max active share)], first match decides.
GROUPED_WHEN: dict[tuple[str, torch.dtype], list[tuple[int, int, int, float]]] = {
    ("read", _F32): [(128, 0, 1024, 0.5), (128, 0, _ANY, 0.3), (32, 0, _ANY, 0.3)],
    ("write", _F32): [(128, 0, 1024, 0.5), (128, 0, _ANY, 0.3), (32, 0, _ANY, 0.3)],
    ("read_backward", _F32): [(128, 0, 1024, 0.5), (128, 0, _ANY, 0.3), (32, 0, _ANY, 0.3)],
    ("write_backward", _F32): [(128, 0, 1024, 0.5), (128, 0, _ANY, 0.3), (32, 128, 4096, 0.3)],
}


# With the native kernels (grouped.c: the partial groups computed in place, no gathered copies), measured
# the same way (benchmarks/results/cpu/cpu_crossover_native_*.json, codegen/README.md): at G 32 (D 512)
# grouped / dense path 1.13-1.54x at delta 0.5 for T 128-2048 (every kind), 0.94-1.31x at T 8192, and
# 0.69-1.13x at delta 0.75; at G 128 (D 2048) 1.22-2.04x at delta 0.5, T 512-2048. G 8 (D 128) still
# loses at delta 0.5 (0.58-1.02x forward): no row, so train_lm.py's default shape stays dense.
_NATIVE = [(32, 0, 4096, 0.5), (32, 0, _ANY, 0.3)]
GROUPED_WHEN_NATIVE: dict[tuple[str, torch.dtype], list[tuple[int, int, int, float]]] = {
    (kind, _F32): _NATIVE for kind in ("read", "write", "read_backward", "write_backward")}


def grouped_pays(kind: str, dtype: torch.dtype, group_size: int, tokens: int, share: float,
                 native: bool = False) -> bool:
    """Whether the grouped path is the faster one for a call of `tokens` tokens whose active
    (token, group) pairs are `share` of T * N, at group size `group_size` (0: unknown, taken as wide);
    `native`: the native many-token kernels (grouped.py) take the call's partial groups."""
    table = GROUPED_WHEN_NATIVE if native else GROUPED_WHEN
    for min_group, min_tokens, max_tokens, max_share in table.get((kind, dtype), ()):
        if (group_size == 0 or group_size >= min_group) and min_tokens <= tokens <= max_tokens:
            return share <= max_share
    return False
