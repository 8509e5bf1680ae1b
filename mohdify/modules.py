"""The modules a MoHD rewrite puts into a model.

A residual branch gets one `MoHDBranch` (its router, its fusion matrix, its shared/routed group
ids). Its readers become `MoHDReader`s and its writer a `MoHDWriter`; both keep the original
weight and bias Parameters (same objects, same state-dict keys), so the rewrite is reversible.

How routing reaches the writer: every reader calls `branch.route(x)`, which computes the routing
of the branch input x and keeps the writer's gates on the branch (`branch.gates`). The writer
of the same branch, which runs after its readers, reads them back. All readers of a branch see
the same x, so they compute the same routing (torch.compile merges the repeated computation).
This is plain attribute state on a registered module: it works eagerly, under torch.export and
under torch.compile(fullgraph=True).

Shape legend: T = tokens, D = hidden size, N = groups, G = D / N, N_s / N_r = shared / routed
groups, k = top_k.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mohdify.codegen import read as read_op
from mohdify.codegen import route as route_op
from mohdify.codegen import write as write_op

from .config import MoHDConfig

__all__ = ["MoHDBranch", "MoHDReader", "MoHDWriter", "magnitude_scores", "activation_scale"]


# Pure functions of the routing math, shared by MoHDBranch and the torch.compile backend's graph
# rewrite (mohdify.passes.rewrite), so both compute exactly the same thing.
def magnitude_scores(x: Tensor, group_size: int, routed_idx: Tensor) -> Tensor:
    """Magnitude-router scores `[T, N_r]`: the energy ||x_t[group i]||^2 of each routed group."""
    energy = x.float().view(x.shape[0], -1, group_size).pow(2).sum(-1)        # [T, N]
    return energy[:, routed_idx]                                              # [T, N_r]


def activation_scale(x: Tensor, mask: Tensor, scaling: str, density: float, group_size: int) -> Optional[Tensor]:
    """Activation scaling alpha `[T]` of the readers' input `x` `[T, D]`, or None for scaling "none"."""
    if scaling == "none":
        return None
    if scaling == "density":
        return x.new_full((x.shape[0],), 1.0 / density)                       # [T]
    kept = x.view(x.shape[0], -1, group_size) * mask[:, :, None].to(x.dtype)  # [T, N, G]
    full = x.norm(dim=-1)                                                     # [T]
    part = kept.flatten(1).norm(dim=-1)                                       # [T]
    return torch.where(part > 0, full / part.clamp_min(torch.finfo(x.dtype).tiny), torch.ones_like(full))


class MoHDBranch(nn.Module):
    """Routing state of one residual branch.

    Parameters: `router` `[N_r, D]` (learned router, zero-initialised) and `fusion` `[N, N]`
    (fusion="mix", identity-initialised). Buffers: `shared_idx` `[N_s]`, `routed_idx` `[N_r]`.
    """

    def __init__(self, hidden_size: int, config: MoHDConfig, *, name: str = "",
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.group_size = config.check_hidden_size(hidden_size)
        self.config = config
        self.name = name
        n, n_s = config.num_groups, config.num_shared
        self.register_buffer("shared_idx", torch.arange(n_s, device=device))
        self.register_buffer("routed_idx", torch.arange(n_s, n, device=device))
        self.router = None
        if config.router == "learned":
            self.router = nn.Parameter(torch.zeros(config.num_routed, hidden_size, dtype=dtype, device=device))
        self.fusion = None
        if config.fusion == "mix":
            self.fusion = nn.Parameter(torch.eye(n, dtype=dtype, device=device))
        self.gates: Optional[Tensor] = None      # [T, N], set by route() for the writer
        self.last_aux_loss: Optional[Tensor] = None

    def extra_repr(self) -> str:
        c = self.config
        return (f"{self.name or 'branch'}: D={self.hidden_size}, groups={c.num_groups}x{self.group_size}, "
                f"shared={c.num_shared}, top_k={c.top_k}, router={c.router}, scaling={c.scaling}, fusion={c.fusion}")

    def scores(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Routing scores `[T, N_r]` and, for the learned router, the probabilities `[T, N_r]`."""
        if self.router is not None:
            probs = torch.softmax(F.linear(x, self.router).float(), dim=-1)   # [T, N_r]
            return probs, probs
        return magnitude_scores(x, self.group_size, self.routed_idx), None

    def route(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Route `x` `[T, D]`: returns the reader mask `[T, N]` and scale `[T]` (or None)."""
        config = self.config
        scores, probs = self.scores(x)
        mask, topk = route_op(scores.detach(), self.shared_idx, self.routed_idx, config.top_k)
        gates = mask.to(x.dtype)                                              # [T, N]
        if probs is not None:
            chosen = probs.gather(1, topk)                                    # [T, k]
            g = config.top_k * chosen / chosen.sum(-1, keepdim=True)          # [T, k]
            gates = gates.scatter(1, self.routed_idx[topk], g.to(x.dtype))    # [T, N]
            # Only a pass that can train needs the balance loss: inference (generate, decode under
            # no_grad) skips its small kernels and keeps no graph alive.
            self.last_aux_loss = self.balance_loss(probs, topk) if torch.is_grad_enabled() else None
        self.gates = gates
        return mask, self.scale(x, mask)

    def scale(self, x: Tensor, mask: Tensor) -> Optional[Tensor]:
        """Activation scaling alpha `[T]`, or None when scaling is "none"."""
        return activation_scale(x, mask, self.config.scaling, self.config.density, self.group_size)

    def balance_loss(self, probs: Tensor, topk: Tensor) -> Tensor:
        """N_r * sum_i f_i P_i: f_i = share of tokens routed to i, P_i = mean probability of i."""
        num_routed = probs.shape[1]
        chosen = torch.zeros_like(probs).scatter(1, topk, 1.0)                # [T, N_r]
        return num_routed * (chosen.mean(0) * probs.mean(0)).sum()


class _MoHDLinear(nn.Module):
    """Shared base: holds the original layer's Parameters and a reference to its branch."""

    def __init__(self, original: nn.Module, branch: MoHDBranch, *, transposed: bool):
        super().__init__()
        self.weight = original.weight
        self.bias = original.bias
        self.transposed = transposed   # GPT-2 Conv1D stores weight as [in, out]
        in_f, out_f = self.weight.shape[::-1] if not transposed else self.weight.shape
        self.in_features, self.out_features = int(in_f), int(out_f)
        # Plain references, not submodules: the branch is registered once, elsewhere in the model,
        # and the original layer is kept only to be put back by demohdify().
        object.__setattr__(self, "branch", branch)
        object.__setattr__(self, "original", original)

    def linear_weight(self) -> Tensor:
        """The weight as `[out_features, in_features]`."""
        return self.weight.t() if self.transposed else self.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, branch={self.branch.name}"


class MoHDReader(_MoHDLinear):
    """A linear reading the branch input: y = alpha * W[:, A] x[A] + b."""

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])                                       # [T, D]
        mask, alpha = self.branch.route(x2)
        y = read_op(x2, self.linear_weight(), self.bias, mask, alpha)         # [T, O]
        return y.view(*lead, self.out_features)


class MoHDWriter(_MoHDLinear):
    """A linear writing the residual stream: only the rows of active groups, gated and fused."""

    def forward(self, u: Tensor) -> Tensor:
        gates = self.branch.gates
        if gates is None:
            raise RuntimeError(
                f"MoHD writer of branch {self.branch.name!r} ran before any of its readers: the branch "
                "has no routing for this forward pass. Readers must run before their writer.")
        lead = u.shape[:-1]
        u2 = u.reshape(-1, u.shape[-1])                                       # [T, I]
        if u2.shape[0] != gates.shape[0]:
            raise RuntimeError(
                f"MoHD writer of branch {self.branch.name!r} got {u2.shape[0]} tokens, but its readers "
                f"routed {gates.shape[0]}: a branch must write the tokens it read.")
        o = write_op(u2, self.linear_weight(), self.bias, gates, self.branch.fusion)  # [T, D]
        return o.view(*lead, self.out_features)
