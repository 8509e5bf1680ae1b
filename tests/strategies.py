"""Hypothesis strategies for the property tests: MoHD configs, zoo cases and seeded inputs.

Every random tensor comes from `torch.Generator().manual_seed(seed)` with a drawn seed, so a
failing example replays exactly; every draw is reported with `note()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import torch
from hypothesis import note
from hypothesis import strategies as st
from zoo import VOCAB, ZOO

import mohdify
from mohdify.config import FUSIONS, ROUTERS, SCALINGS

SEEDS = st.integers(min_value=0, max_value=2**31 - 1)
MAX_GROUPS = 16   # more groups than this only makes groups of 1-3 dims in the zoo's D = 32..64


def divisors(n: int, limit: int = MAX_GROUPS) -> list[int]:
    """Divisors of `n` up to `limit`: the valid group counts for hidden size n."""
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


@st.composite
def mohd_configs(draw, hidden_size: int, *, dense: bool = False, routers: Sequence[str] = ROUTERS,
                 min_groups: int = 1) -> mohdify.MoHDConfig:
    """A valid MoHDConfig for hidden size `hidden_size`; `dense=True` draws delta = 1 (k = N_r)."""
    num_groups = draw(st.sampled_from([d for d in divisors(hidden_size) if d >= min_groups]))
    num_shared = draw(st.integers(0, num_groups - 1))
    kwargs = dict(router=draw(st.sampled_from(list(routers))), scaling=draw(st.sampled_from(SCALINGS)),
                  fusion=draw(st.sampled_from(FUSIONS)))
    if dense:
        config = mohdify.MoHDConfig.dense(num_groups=num_groups, num_shared=num_shared, **kwargs)
    else:
        top_k = draw(st.integers(1, num_groups - num_shared))
        config = mohdify.MoHDConfig(num_groups=num_groups, num_shared=num_shared, top_k=top_k, **kwargs)
    return config


@dataclass
class Case:
    """One drawn example: a zoo model, a config, a seed for parameters and inputs, input sizes."""

    name: str
    config: mohdify.MoHDConfig
    seed: int
    batch: int
    seqs: tuple[int, ...]      # one sequence length per integer input (T5 has two)
    permute_groups: bool       # draw the shared groups at random instead of 0..N_s-1

    def build(self) -> tuple[torch.nn.Module, Any, Any]:
        """(dense model, its zoo example inputs, random inputs drawn for this case)."""
        model, example = ZOO[self.name].build()
        return model, example, random_inputs(example, self.seed, self.batch, self.seqs)


@st.composite
def cases(draw, names: Sequence[str], *, dense: bool = False, routers: Sequence[str] = ROUTERS,
          min_groups: int = 1, permute: bool = True) -> Case:
    """A Case for one of the zoo models `names`."""
    name = draw(st.sampled_from(list(names)))
    config = draw(mohd_configs(ZOO[name].hidden_size, dense=dense, routers=routers, min_groups=min_groups))
    _, example = _example_shapes(name)
    n_int = sum(1 for v in _tensors(example) if not v.is_floating_point())
    case = Case(name=name, config=config, seed=draw(SEEDS), batch=draw(st.integers(1, 3)),
                seqs=tuple(draw(st.integers(1, 9)) for _ in range(n_int)),
                permute_groups=permute and draw(st.booleans()))
    note(f"case: {case}")
    return case


@st.composite
def tied_inputs(draw):
    """(config, G, seed, T, shared groups or None) for routing inputs with integer values in {-1, 0, 1}:
    integer logits and energies make many exact ties."""
    num_groups = draw(st.sampled_from([2, 3, 4, 6, 8]))
    group_size = draw(st.sampled_from([1, 2, 4]))
    num_shared = draw(st.integers(0, num_groups - 1))
    config = mohdify.MoHDConfig(num_groups=num_groups, num_shared=num_shared,
                                top_k=draw(st.integers(1, num_groups - num_shared)),
                                router=draw(st.sampled_from(ROUTERS)), scaling=draw(st.sampled_from(SCALINGS)))
    shared = None
    if draw(st.booleans()):
        shared = sorted(draw(st.permutations(range(num_groups)))[:num_shared])
    seed, tokens = draw(SEEDS), draw(st.integers(1, 6))
    note(f"config {config}, G={group_size}, seed={seed}, T={tokens}, shared groups {shared}")
    return config, group_size, seed, tokens, shared


_SHAPES: dict[str, Any] = {}


def _example_shapes(name: str):
    """The zoo model's example inputs (cached: building a model just to look at them is wasteful)."""
    if name not in _SHAPES:
        _SHAPES[name] = ZOO[name].build()
    return _SHAPES[name]


def _tensors(inputs: Any) -> list[torch.Tensor]:
    values = inputs.values() if isinstance(inputs, dict) else inputs
    return [v for v in values if isinstance(v, torch.Tensor)]


def random_inputs(example: Any, seed: int, batch: int, seqs: Sequence[int]) -> Any:
    """Inputs shaped like `example`: token ids `[batch, seq]`, float inputs `[batch, *rest]`."""
    gen = torch.Generator().manual_seed(seed)
    lengths = iter(seqs)

    def one(v: Any) -> Any:
        if not isinstance(v, torch.Tensor):
            return v
        if v.is_floating_point():
            return torch.randn((batch, *v.shape[1:]), generator=gen, dtype=v.dtype)
        return torch.randint(0, VOCAB, (batch, next(lengths)), generator=gen, dtype=v.dtype)

    if isinstance(example, dict):
        return {k: one(v) for k, v in example.items()}
    return tuple(one(v) for v in example)


def run(model: torch.nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


def output_tensors(out: Any, prefix: str = "out") -> dict[str, torch.Tensor]:
    """Every tensor of a model output (a tensor, a tuple or an HF ModelOutput), by name."""
    if isinstance(out, torch.Tensor):
        return {prefix: out}
    if isinstance(out, dict):   # HF ModelOutput is an OrderedDict; caches are not tensors and are skipped
        return {f"{prefix}.{k}": v for k, v in out.items() if isinstance(v, torch.Tensor)}
    if isinstance(out, (tuple, list)):
        return {f"{prefix}[{i}]": v for i, v in enumerate(out) if isinstance(v, torch.Tensor)}
    raise TypeError(f"output_tensors: cannot read tensors out of a {type(out).__name__}")


def main_output(out: Any) -> torch.Tensor:
    """The output a loss would use: logits, else the last hidden state, else the tensor itself."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("logits", "last_hidden_state"):
        value: Optional[torch.Tensor] = out.get(key) if isinstance(out, dict) else None
        if value is not None:
            return value
    raise TypeError(f"main_output: no logits or last_hidden_state in a {type(out).__name__}")
