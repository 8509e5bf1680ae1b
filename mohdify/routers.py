"""Router kinds: each kind of router, in one place.

A kind knows its parameters (what MoHDBranch registers), what the plan counts and prints for it
(parameters, routing FLOPs, a note when it starts untrained), whether it has a balance loss and
whether the compiler backend can use it (a backend cannot add parameters), and how it scores the
tokens (`RouterKind.scores`). The rest of the routing math (top-k, gates, activation scale, balance
loss) is `mohdify.routing.route_tokens`, which asks the kind. MoHDConfig.router names a kind of
`ROUTER_KINDS`.

A new router kind: one `RouterKind` entry in `ROUTER_KINDS` (with its scoring function), plus its tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RouterKind", "ROUTER_KINDS", "router_kind", "magnitude_scores", "learned_scores"]

# Shape legend: T = tokens, D = hidden size, N = groups, N_r = routed groups, G = D / N.


def magnitude_scores(x: Tensor, weight: Optional[Tensor], group_size: int, routed_idx: Tensor) -> tuple[Tensor, None]:
    """Magnitude-router scores `[T, N_r]`: the energy ||x_t[group i]||^2 of each routed group; no
    probabilities (the chosen groups' gates are 1)."""
    energy = x.float().view(x.shape[0], x.shape[1] // group_size, group_size).pow(2).sum(-1)  # [T, N]
    return energy[:, routed_idx], None                                        # [T, N_r]


def learned_scores(x: Tensor, weight: Optional[Tensor], group_size: int, routed_idx: Tensor) -> tuple[Tensor, Tensor]:
    """Learned-router scores: the softmax over routed groups of `x W^T` (W `[N_r, D]`), `[T, N_r]`
    fp32; they are also the probabilities the gates and the balance loss use."""
    probs = torch.softmax(F.linear(x, weight).float(), dim=-1)               # [T, N_r]
    return probs, probs


@dataclass(frozen=True)
class RouterKind:
    name: str
    learned: bool       # a `[N_r, D]` weight (zero-initialised), a softmax over routed groups, a balance loss
    describe: str       # one line for the docs and the config's error messages
    # (x [T, D], its weight or None, G, routed_idx [N_r]) -> (scores [T, N_r] for the top-k, probabilities
    # [T, N_r] for the gates and the balance loss, or None: the chosen groups' gates are 1)
    scores: Callable[[Tensor, Optional[Tensor], int, Tensor], tuple[Tensor, Optional[Tensor]]]

    def parameter(self, num_routed: int, hidden_size: int, dtype=None, device=None) -> Optional[nn.Parameter]:
        """The router weight MoHDBranch registers, or None for a parameter-free kind."""
        if not self.learned:
            return None
        return nn.Parameter(torch.zeros(num_routed, hidden_size, dtype=dtype, device=device))

    @property
    def has_balance_loss(self) -> bool:
        return self.learned

    @property
    def backend_refusal(self) -> Optional[str]:
        """Why `torch.compile(dense, backend='mohd')` cannot route with this kind, or None if it can."""
        return "a learned router has parameters" if self.learned else None

    def extra_params(self, config: Any, hidden_size: int) -> int:
        """Parameters the router adds to a branch."""
        return config.num_routed * hidden_size if self.learned else 0

    def route_flops(self, config: Any, hidden_size: int) -> int:
        """Per-token FLOPs of scoring the routed groups."""
        return 2 * config.num_routed * hidden_size if self.learned else 2 * hidden_size

    def untrained_note(self, config: Any) -> Optional[str]:
        """What this router does before training, or None when that does not matter (delta = 1: every
        group is active whatever the router says)."""
        if not self.learned or config.top_k >= config.num_routed:
            return None
        return (f"router='{self.name}' starts untrained: its weights are zero at init (so that delta = 1 is exactly "
                f"the dense model), so until it is trained every token gets the same {config.top_k} of the "
                f"{config.num_routed} routed groups (the lowest-numbered ones, ties go to the lower index). For a "
                "pretrained model, train the router (fine-tune with mohdify.aux_loss), or use router='magnitude' "
                "(training-free, per-token), optionally with mohdify.calibrate for the shared groups.")


ROUTER_KINDS: dict[str, RouterKind] = {
    "learned": RouterKind("learned", True, "a zero-initialised linear router, softmax, top-k, gates of mean one",
                          learned_scores),
    "magnitude": RouterKind("magnitude", False, "training-free: the k routed groups of largest energy, gates 1",
                            magnitude_scores),
}


def router_kind(name: str) -> RouterKind:
    """The kind MoHDConfig.router names (MoHDConfig validates the name)."""
    return ROUTER_KINDS[name]
