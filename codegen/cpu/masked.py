"""Many-token path of a MoHD branch on CPU: the dense-equivalent as plain torch ops, masks made once.

Where the crossover table (crossover.py) sends every kernel call of a branch application to the
dense path (narrow groups, high density, bf16), the kernels' work is the reference's: a masked
dense `F.linear`. Run through the custom ops, each reader masks its input again, each backward masks
its gradients again, every mask is a `[T, N, G]` broadcast (slow for small G: measured 6x a plain
`[T, D]` multiply at G 8), and each call pays the custom-op dispatch. The modules
(mohdify/modules.py) instead run the reference's ops themselves:

  - the branch masks x once per application (`times_groups`: one broadcast multiply over the
    `[T, N, G]` view); every reader is `F.linear` on that masked input, so autograd sums the
    readers' input gradients first and masks them once;
  - the writer is `F.linear`, times the gates spread over their groups (`times_groups` again, so
    the gates' gradient is a sum over each group's G dims), then the fusion as in `write_naive`.

Values equal `read_naive` / `write_naive` bit for bit (the same products); gradients are autograd's
of the reference. Under torch.compile (backend "mohd" or inductor) dynamo traces these ops, so
inductor fuses the masks and gates into their neighbours (the decision is taken at trace time, from
the token count, which dynamo guards); under torch.export the modules keep the custom ops (an
exported graph names its MoHD ops). `PATHS` (backward.py) counts "read:masked" and "write:masked"
per eager call only: under torch.compile the count is skipped, since dynamo would guard on the
counter's value and so recompile at every call.

Shape legend: T = tokens, D = hidden size = N * G, N = groups, G = group size, O / I = reader
out_features / writer in_features.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import grouped
from .backward import PATHS
from .crossover import grouped_pays
from .plan import DECODE_MAX_TOKENS

__all__ = ["masked_pays", "times_groups", "read_masked", "write_masked"]

_KINDS = ("read", "read_backward", "write", "write_backward")


def masked_pays(x: Tensor, group_size: int, density: float) -> bool:
    """Whether a branch application on `x` `[T, D]` runs the masked path: CPU, not exporting, no
    autocast, many tokens, and the crossover table sends every kernel call of the
    application to the dense path at this group size, dtype, token count and active share (= density:
    every token has the same number of active groups)."""
    if x.device.type != "cpu" or torch.compiler.is_exporting() or torch.is_autocast_enabled("cpu"):
        return False
    tokens = x.shape[0]
    if tokens <= DECODE_MAX_TOKENS:
        return False
    native = x.dtype == torch.float32 and grouped.available()
    return not any(grouped_pays(kind, x.dtype, group_size, tokens, density, native) for kind in _KINDS)


def times_groups(x: Tensor, per_group: Tensor) -> Tensor:
    """`x` `[T, D]` times each token's per-group value `per_group` `[T, N]` (a bool mask or the gates),
    spread over the group's G = D / N dims: one broadcast multiply over the `[T, N, G]` view (no `[T, D]`
    copy of the values; the gradient to `per_group` is a sum over G). Measured forward + backward with
    the gates' gradient, 1 thread, T 2064, N 16, G 8: 0.54 ms eager, 0.34 ms compiled; a multiply by
    `per_group @ spread` (the 0/1 `[N, D]` matrix) 0.64 / 0.53 ms, by the expanded and reshaped values
    0.70 / 0.50 ms (inductor indexes that one per element with a division, unvectorised)."""
    num_tokens, num_groups = per_group.shape
    group_size = x.shape[1] // num_groups
    return (x.reshape(num_tokens, num_groups, group_size) * per_group.to(x.dtype)[:, :, None]).reshape(x.shape)


def read_masked(xm: Tensor, weight: Tensor, bias: Optional[Tensor], alpha: Optional[Tensor]) -> Tensor:
    """`read_naive` on the masked input `xm` `[T, D]` (made once per branch application): `[T, O]`."""
    if not torch.compiler.is_compiling():   # a traced count is a guarded side effect: a recompile per call
        PATHS["read:masked"] += 1
    if alpha is None:
        return F.linear(xm, weight, bias)                                     # [T, O]
    y = F.linear(xm, weight) * alpha[:, None].to(xm.dtype)                    # [T, O]
    return y if bias is None else y + bias                                    # [T, O]


def write_masked(u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor, fusion: Optional[Tensor]) -> Tensor:
    """`write_naive` with the gates spread over their groups (`times_groups`): `[T, I]` -> `[T, D]`."""
    if not torch.compiler.is_compiling():
        PATHS["write:masked"] += 1
    num_tokens, num_groups = gates.shape                                      # T, N
    z = F.linear(u, weight, bias)                                             # [T, D]
    zg = times_groups(z, gates)                                               # [T, D]
    if fusion is None:
        return zg
    zg3 = zg.view(num_tokens, num_groups, z.shape[1] // num_groups)           # [T, N, G]
    mixed = torch.einsum("ij,tjg->tig", fusion.to(z.dtype), zg3)              # [T, N, G]
    return mixed.reshape(num_tokens, z.shape[1])                              # [T, D]
