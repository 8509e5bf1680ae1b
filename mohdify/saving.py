"""Saving and loading mohdified Hugging Face models.

`mohdify()` records the rewrite (its MoHDConfig and Plan) in the model's HF config as its
`quantization_config` (quant_method "mohd"), so `model.save_pretrained(path)` writes it into
`config.json` next to the weights (routers, fusion matrices and group ids are ordinary state-dict
entries). transformers' own `from_pretrained` reads it back through the quantizer mohdify registers
on import (`mohdify/hf_quantizer.py`): the saved plan is applied as it is, no capture.

`mohdify.from_pretrained(ModelClass, path)` is that same load, plus a refusal when `path` holds a
dense model (transformers would load it silently), and the loading of folders saved by mohdify
0.1 (config.json entry `mohd`).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from torch import nn

from .config import MoHDConfig
from .errors import InputError
from .plan import Plan

__all__ = ["from_pretrained", "record_rewrite", "check_recordable", "forget_rewrite", "HAS_TRANSFORMERS"]

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
LEGACY_KEY = "mohd"   # mohdify 0.1 wrote {"format": 1, "config": ..., "plan": ...} under this config.json key


def _hf_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    return config if hasattr(config, "to_json_string") else None


def record_rewrite(model: nn.Module, plan: Plan, config: MoHDConfig) -> None:
    """Write the rewrite into an HF model's config (no-op for models without an HF config)."""
    hf = _hf_config(model)
    if hf is not None:
        from .hf_quantizer import record
        record(hf, plan, config)


def check_recordable(model: nn.Module) -> None:
    """Raise before a rewrite that could not be recorded in the model's HF config."""
    hf = _hf_config(model)
    if hf is not None:
        from .hf_quantizer import check_recordable as check
        check(hf)


def forget_rewrite(model: nn.Module) -> None:
    if _hf_config(model) is not None:
        from .hf_quantizer import forget
        forget(model)


def from_pretrained(model_class: Any, path: str, **kwargs) -> nn.Module:
    """Load a mohdified model saved with `save_pretrained`, mohdified as it was saved.

    The same as `model_class.from_pretrained(path, **kwargs)` after `import mohdify`, except that a
    folder holding a dense model is refused with an error (plain `from_pretrained` would load it
    dense), and folders saved by mohdify 0.1 load too.

    Args:
        model_class: the HF class to load with (e.g. `LlamaForCausalLM` or `AutoModelForCausalLM`).
        path: the folder `save_pretrained` wrote.
        **kwargs: passed to `model_class.from_pretrained` (dtype, device_map, ...).

    Example::

        model.save_pretrained("ckpt")                     # a mohdified model
        model = mohdify.from_pretrained(AutoModelForCausalLM, "ckpt")
    """
    from transformers import AutoConfig

    from .hf_quantizer import MoHDQuantizationConfig, saved_record

    hf_config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
    legacy = getattr(hf_config, LEGACY_KEY, None)
    if saved_record(hf_config) is None and isinstance(legacy, dict) and legacy.get("format") == 1:
        hf_config.quantization_config = MoHDQuantizationConfig(config=legacy["config"], plan=legacy["plan"]).to_dict()
        delattr(hf_config, LEGACY_KEY)
    if saved_record(hf_config) is None:
        raise InputError(f"from_pretrained: {path!r} holds no mohdified model (its config.json has no "
                         f"quantization_config with quant_method 'mohd'); load it with "
                         f"{getattr(model_class, '__name__', model_class)}.from_pretrained.")
    return model_class.from_pretrained(path, config=hf_config, **kwargs)
