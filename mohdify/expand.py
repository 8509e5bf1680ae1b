"""Expansion mode (MOHD_SPEC.md, "Modes"): widen the residual stream of an HF config to E x D while the
inner widths (heads x head_dim, FFN width) stay those of D, then mohdify at density 1/E, so the
activated parameters per token of the readers and writers stay those of the dense D model.

    wide = mohdify.expand_config(llama_config, 2)                 # hidden 2D, same heads x head_dim, same FFN
    model = mohdify.expand(llama_config, 2)                       # built from wide, mohdified at density 1/2

A factor below 1 gives the narrow dense model with the same inner widths (the dense model whose
parameters per token equal a MoHD model's activated ones).
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from .config import MoHDConfig
from .errors import ConfigError

__all__ = ["expand_config", "expansion_mohd_config", "expand"]

_GROUP_CHOICES = (16, 12, 24, 32, 8, 20, 10, 6, 4)


def _inner_widths(hf_config: Any) -> tuple[int, int, int]:
    missing = [a for a in ("hidden_size", "num_attention_heads", "intermediate_size") if not hasattr(hf_config, a)]
    if missing or not hasattr(hf_config, "head_dim"):
        raise ConfigError(
            f"expand needs an HF config whose attention width is set by head_dim, independent of hidden_size "
            f"(Llama, Mistral, Qwen2/3, Gemma, OLMo ...); {type(hf_config).__name__} lacks "
            f"{missing + ([] if hasattr(hf_config, 'head_dim') else ['head_dim'])}.")
    heads = hf_config.num_attention_heads
    head_dim = hf_config.head_dim or hf_config.hidden_size // heads
    return hf_config.hidden_size, heads * head_dim, hf_config.intermediate_size


def expand_config(hf_config: Any, factor: float) -> Any:
    """A copy of `hf_config` with hidden_size = factor x hidden_size and head_dim, heads and
    intermediate_size unchanged (head_dim written out explicitly)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 0:
        raise ConfigError(f"expand factor must be a number > 0, got {factor!r}.")
    hidden = hf_config.hidden_size
    _inner_widths(hf_config)
    wide = hidden * factor
    if abs(wide - round(wide)) > 1e-9 or round(wide) < 1:
        raise ConfigError(f"expand factor {factor} times hidden_size {hidden} = {wide} is not a whole number of dims.")
    out = copy.deepcopy(hf_config)
    out.head_dim = hf_config.head_dim or hidden // hf_config.num_attention_heads
    out.hidden_size = int(round(wide))
    return out


def expansion_mohd_config(factor: float, hidden_size: int, **kwargs) -> MoHDConfig:
    """A MoHDConfig of density 1/factor for a stream of `hidden_size` dims: the first group count in
    (16, 12, 24, 32, ...) that divides hidden_size and gives a whole number N / factor of active groups;
    half of them shared (rounded down), the rest routed. Extra kwargs go to MoHDConfig (router, scaling ...)."""
    if not factor > 1:
        raise ConfigError(f"expansion_mohd_config needs factor > 1 (density 1/factor < 1), got {factor!r}.")
    for n in _GROUP_CHOICES:
        active = n / factor
        if hidden_size % n == 0 and abs(active - round(active)) < 1e-9 and 1 <= round(active) < n:
            active = int(round(active))
            return MoHDConfig(num_groups=n, num_shared=active // 2, top_k=active - active // 2, **kwargs)
    raise ConfigError(f"no group count in {_GROUP_CHOICES} divides hidden size {hidden_size} and gives a density of "
                      f"exactly 1/{factor}; pass a MoHDConfig yourself.")


def expand(hf_config: Any, factor: float, config: Optional[MoHDConfig] = None, *, model_class: Any = None,
           example_inputs: Any = None) -> nn.Module:
    """Build a model of `expand_config(hf_config, factor)` with fresh weights (the model's own
    initialisation) and mohdify it at density 1/factor.

    Args:
        hf_config: the dense model's HF config (D = hidden_size).
        factor: E > 1, the residual width multiplier.
        config: the MoHDConfig; default `expansion_mohd_config(factor, E*D)`. Its density should be 1/E
            for the activated parameters to equal the dense model's.
        model_class: the class to build (default transformers.AutoModelForCausalLM).
        example_inputs: for the capture (default {"input_ids": zeros(1, 8)}).

    Returns:
        the mohdified model; `model.mohd_plan.totals()["active_params"]` minus the routers' parameters
        equals the dense model's reader and writer parameters when the density is exactly 1/E.
    """
    from .api import mohdify
    if not factor > 1:
        raise ConfigError(f"expand builds a wider MoHD model: factor must be > 1, got {factor!r} "
                          "(use expand_config for a narrower dense config).")
    wide = expand_config(hf_config, factor)
    if config is None:
        config = expansion_mohd_config(factor, wide.hidden_size)
    if model_class is None:
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_config(wide)
    else:
        model = model_class(wide)
    if example_inputs is None:
        example_inputs = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    return mohdify(model, config, example_inputs=example_inputs)
