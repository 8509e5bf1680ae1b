"""MoHDConfig: the knobs of a MoHD rewrite (see MOHD_SPEC.md in the design docs)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .errors import ConfigError
from .routers import ROUTER_KINDS

__all__ = ["MoHDConfig", "ROUTERS", "SCALINGS", "FUSIONS"]

ROUTERS = tuple(ROUTER_KINDS)   # mohdify/routers.py: one entry per router kind
SCALINGS = ("none", "density", "norm")
FUSIONS = ("none", "mix")


@dataclass(frozen=True)
class MoHDConfig:
    """How a residual branch is split and routed.

    Args:
        num_groups: N, groups the hidden size D is split into (N must divide D).
        num_shared: N_s, groups that are always active.
        top_k: k, routed groups chosen per token among the N - N_s routed ones.
            Density delta = (N_s + k) / N.
        router: a kind of mohdify/routers.py: "learned" (a zero-initialised linear router, softmax,
            top-k, gates of mean one) or "magnitude" (training-free: the k routed groups of largest
            energy, gates 1).
        scaling: activation scaling of the readers' input: "none", "density" (1 / delta) or
            "norm" (||x|| / ||x[active]||).
        fusion: "none", or "mix": a learnable N x N group-mixing matrix on the writer's output,
            initialised to the identity.
        aux_loss_coef: weight of the load-balancing loss returned by `mohdify.aux_loss`.
    """

    num_groups: int = 16
    num_shared: int = 4
    top_k: int = 4
    router: str = "learned"
    scaling: str = "none"
    fusion: str = "none"
    aux_loss_coef: float = 0.01

    def __post_init__(self) -> None:
        for name in ("num_groups", "num_shared", "top_k"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"MoHDConfig.{name} must be an int, got {value!r} ({type(value).__name__}).")
        if self.num_groups <= 0:
            raise ConfigError(f"MoHDConfig.num_groups must be a positive int, got {self.num_groups}.")
        if self.num_shared < 0:
            raise ConfigError(f"MoHDConfig.num_shared must be >= 0, got {self.num_shared}.")
        if self.top_k <= 0:
            raise ConfigError(f"MoHDConfig.top_k must be a positive int, got {self.top_k}.")
        if self.num_shared >= self.num_groups:
            raise ConfigError(
                f"MoHDConfig.num_shared must be smaller than num_groups={self.num_groups} "
                f"(at least one routed group is required), got {self.num_shared}."
            )
        if self.top_k > self.num_routed:
            raise ConfigError(
                f"MoHDConfig.top_k must be <= the routed groups num_groups - num_shared = "
                f"{self.num_groups} - {self.num_shared} = {self.num_routed}, got {self.top_k}."
            )
        for name, allowed in (("router", ROUTERS), ("scaling", SCALINGS), ("fusion", FUSIONS)):
            value = getattr(self, name)
            if value not in allowed:
                raise ConfigError(f"MoHDConfig.{name} must be one of {allowed}, got {value!r}.")
        coef = self.aux_loss_coef
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or coef < 0 or coef != coef:
            raise ConfigError(f"MoHDConfig.aux_loss_coef must be a float >= 0, got {coef!r}.")

    @property
    def num_routed(self) -> int:
        """N_r = N - N_s."""
        return self.num_groups - self.num_shared

    @property
    def density(self) -> float:
        """delta = (N_s + k) / N, the fraction of groups active per token."""
        return (self.num_shared + self.top_k) / self.num_groups

    def check_hidden_size(self, hidden_size: int) -> int:
        """Return the group size G = D / N, or raise if N does not divide D."""
        if hidden_size % self.num_groups:
            raise ConfigError(
                f"MoHDConfig.num_groups={self.num_groups} must divide the model's hidden size "
                f"{hidden_size}; divisors of {hidden_size} up to 64: "
                f"{[n for n in range(1, min(hidden_size, 64) + 1) if hidden_size % n == 0]}."
            )
        return hidden_size // self.num_groups

    @classmethod
    def dense(cls, num_groups: int = 16, num_shared: int = 4, **kwargs) -> MoHDConfig:
        """A config with every group active (delta = 1): computes what the dense model computes."""
        return cls(num_groups=num_groups, num_shared=num_shared, top_k=num_groups - num_shared, **kwargs)

    def to_dict(self) -> dict:
        return asdict(self)
