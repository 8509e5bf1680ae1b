"""Saving and loading mohdified Hugging Face models.

`mohdify()` records the rewrite (its MoHDConfig and Plan) in the model's HF config as the entry
`mohd`, so `model.save_pretrained(path)` writes it into `config.json` next to the weights (the
routers, fusion matrices and group ids are ordinary state-dict entries). `from_pretrained` reads
it back: it loads the dense weights with the model class's own `from_pretrained`, applies the
recorded plan (no capture, no example inputs) and loads the MoHD entries.

Shape of the entry: {"format": 1, "config": MoHDConfig fields, "plan": Plan fields}.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, fields
from typing import Any

import torch
from torch import nn

from mohdify.passes import apply_plan, mohd_branches

from .config import MoHDConfig
from .errors import InputError
from .plan import Branch, Plan

__all__ = ["from_pretrained", "record_rewrite", "forget_rewrite", "CONFIG_KEY"]

CONFIG_KEY = "mohd"
FORMAT = 1


def _hf_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    return config if hasattr(config, "to_json_string") else None


def record_rewrite(model: nn.Module, plan: Plan, config: MoHDConfig) -> None:
    """Write the rewrite into an HF model's config (no-op for models without an HF config)."""
    hf = _hf_config(model)
    if hf is not None:
        setattr(hf, CONFIG_KEY, {"format": FORMAT, "config": config.to_dict(), "plan": _plan_dict(plan)})


def forget_rewrite(model: nn.Module) -> None:
    hf = _hf_config(model)
    if hf is not None and hasattr(hf, CONFIG_KEY):
        delattr(hf, CONFIG_KEY)


def _plan_dict(plan: Plan) -> dict:
    out = {f.name: getattr(plan, f.name) for f in fields(plan) if f.name != "config"}
    out["branches"] = [asdict(b) for b in plan.branches]
    return out


def _plan_from(record: dict, config: MoHDConfig) -> Plan:
    p = dict(record["plan"])
    branches = [Branch(**{**b, "reader_shapes": {k: tuple(v) for k, v in b["reader_shapes"].items()},
                          "writer_shape": tuple(b["writer_shape"])}) for b in p.pop("branches")]
    p["skipped"] = [tuple(s) for s in p.get("skipped", [])]
    p["capture_failures"] = [tuple(s) for s in p.get("capture_failures", [])]
    return Plan(branches=branches, config=config, **p)


def _checkpoint_files(path: str) -> list[str]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        full = os.path.join(path, index)
        if os.path.exists(full):
            with open(full) as f:
                return sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise InputError(f"from_pretrained: no weights (model.safetensors or pytorch_model.bin) in {path!r}.")


def _load_entries(files: list[str], wanted: set[str]) -> dict[str, torch.Tensor]:
    out = {}
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(file, framework="pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys() if k in wanted})
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            out.update({k: v for k, v in state.items() if k in wanted})
    return out


def from_pretrained(model_class: Any, path: str, **kwargs) -> nn.Module:
    """Load a mohdified model saved with `save_pretrained`, mohdified as it was saved.

    Args:
        model_class: the HF class to load with (e.g. `LlamaForCausalLM` or `AutoModelForCausalLM`).
        path: the folder `save_pretrained` wrote.
        **kwargs: passed to `model_class.from_pretrained` (dtype, device_map, ...).

    Example::

        model.save_pretrained("ckpt")                     # a mohdified model
        model = mohdify.from_pretrained(LlamaForCausalLM, "ckpt")
    """
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(path)
    record = getattr(hf_config, CONFIG_KEY, None)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise InputError(f"from_pretrained: {path!r} holds no mohdified model (its config.json has no "
                         f"'{CONFIG_KEY}' entry of format {FORMAT}, got {type(record).__name__}); load it with "
                         f"{getattr(model_class, '__name__', model_class)}.from_pretrained.")
    config = MoHDConfig(**record["config"])
    plan = _plan_from(record, config)
    hf_logger = logging.getLogger("transformers")
    level = hf_logger.level
    hf_logger.setLevel(logging.ERROR)   # the MoHD entries are "unexpected" to the dense class; loaded below
    try:
        model = model_class.from_pretrained(path, **kwargs)
    finally:
        hf_logger.setLevel(level)
    apply_plan(model, plan, config)
    model.mohd_plan = plan
    record_rewrite(model, plan, config)
    own = {name for name, _ in model.state_dict().items()
           if any(name.startswith(b_name + ".") for b_name in _branch_names(model))}
    state = _load_entries(_checkpoint_files(path), own)
    missing = sorted(own - set(state))
    if missing:
        raise InputError(f"from_pretrained: {path!r} lacks MoHD entries {missing[:4]} ({len(missing)} in all): "
                         "the checkpoint does not match the MoHD plan in its config.json.")
    model.load_state_dict(state, strict=False)
    return model


def _branch_names(model: nn.Module) -> list[str]:
    ids = {id(b) for b in mohd_branches(model)}
    return [name for name, m in model.named_modules() if id(m) in ids]
