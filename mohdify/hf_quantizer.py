"""transformers-native loading: MoHD registered as a transformers quantization method, "mohd".

transformers lets a library that changes a model's layers plug into `from_pretrained` through its
quantizer API (`register_quantization_config`, `register_quantizer`, `HfQuantizer`); a
`quantization_config` entry in config.json names the method. mohdify uses it so that any tool that
loads a model by path (pipelines, lm-eval, Trainer scripts) gets the MoHD model:

- `mohdify()` records its MoHDConfig and Plan in the HF config as
  `quantization_config = {"quant_method": "mohd", "format": 1, "config": ..., "plan": ...}`, so
  `save_pretrained` writes them into config.json; routers, fusion matrices and group ids are
  ordinary state-dict entries next to the dense weights.
- After `import mohdify`, `AutoModelForCausalLM.from_pretrained(path)` (any `from_pretrained`)
  builds the dense skeleton, and `MoHDHfQuantizer` applies the saved plan to it before the weights
  load: no capture, no example inputs. The checkpoint's MoHD entries then load like any weight.
- After loading: the layers get their loaded Parameters, CPU reader weights the column-major
  layout `mohdify()` gives them, and the model stays an ordinary trainable, castable model
  (transformers' "quantized" flag is cleared: MoHD keeps weights in their dtype).
- `model.dequantize()` is `mohdify.demohdify(model)`.

Without `import mohdify`, transformers does not know "mohd": it warns and loads the dense model,
listing the MoHD entries as unexpected keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from typing import Any, Optional

from torch import nn
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from mohdify.codegen.cpu.layout import lay_out_reader_weight
from mohdify.passes import apply_plan, is_mohdified, mohd_branches, remove_mohd

from .config import MoHDConfig
from .errors import InputError
from .plan import Branch, Plan

__all__ = ["QUANT_METHOD", "FORMAT", "MoHDQuantizationConfig", "MoHDHfQuantizer", "record", "check_recordable",
           "forget",
           "saved_record"]

QUANT_METHOD = "mohd"
FORMAT = 1


@register_quantization_config(QUANT_METHOD)
class MoHDQuantizationConfig(QuantizationConfigMixin):
    """The `quantization_config` of a mohdified model: its MoHDConfig and Plan, as plain dicts.

    Args:
        config: MoHDConfig fields.
        plan: Plan fields (branches, skipped layers, hidden size, ...), without its config.
        format: the layout of this record (1).
    """

    def __init__(self, config: Optional[dict] = None, plan: Optional[dict] = None, format: int = FORMAT, **kwargs):
        self.quant_method = QUANT_METHOD
        self.format = format
        self.config = config
        self.plan = plan
        if format != FORMAT or not isinstance(config, dict) or not isinstance(plan, dict):
            raise InputError(f"quantization_config of quant_method 'mohd' needs format={FORMAT} and the dicts "
                             f"'config' and 'plan'; got format={format!r}, config {type(config).__name__}, "
                             f"plan {type(plan).__name__} (saved by another mohdify version?).")

    @classmethod
    def from_rewrite(cls, plan: Plan, config: MoHDConfig) -> MoHDQuantizationConfig:
        return cls(config=config.to_dict(), plan=_plan_dict(plan))

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "format": self.format, "config": self.config, "plan": self.plan}

    def mohd_config(self) -> MoHDConfig:
        return MoHDConfig(**self.config)

    def mohd_plan(self) -> Plan:
        return _plan_from(self.plan, self.mohd_config())


@register_quantizer(QUANT_METHOD)
class MoHDHfQuantizer(HfQuantizer):
    """Applies a saved MoHD plan to the model `from_pretrained` builds, before its weights load."""

    requires_calibration = True   # a "mohd" config describes saved MoHD weights; it never converts a dense model

    def validate_environment(self, *args, **kwargs) -> None:
        self.quantization_config.mohd_plan()   # a malformed record fails here, before the model is built

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files=None, **kwargs) -> None:
        plan = _rebase(self.quantization_config.mohd_plan(), model)
        apply_plan(model, plan, plan.config)
        try:
            _check_checkpoint(model, checkpoint_files)
        except InputError:
            remove_mohd(model)
            raise
        self.quantization_config.plan = _plan_dict(plan)   # names as this model class has them (AutoModel)
        model.mohd_plan = plan

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs) -> nn.Module:
        from .modules import MoHDLinear, MoHDReader
        for module in model.modules():
            if isinstance(module, MoHDLinear):   # the loader set new Parameters on the MoHD layers
                module.original.weight, module.original.bias = module.weight, module.bias
                if isinstance(module, MoHDReader):
                    lay_out_reader_weight(module.original)
        model.is_quantized = False   # MoHD keeps weights in their dtype: .half(), .float(), Trainer all work
        return model

    def _dequantize(self, model: nn.Module, dtype=None) -> nn.Module:
        if is_mohdified(model):
            remove_mohd(model)
        model.__dict__.pop("mohd_plan", None)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_qat_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


def check_recordable(hf_config: Any) -> None:
    """Refuse a model whose HF config already names another quantization method: MoHD records itself
    in that same entry."""
    existing = getattr(hf_config, "quantization_config", None)
    if existing is not None and saved_record(hf_config) is None:
        method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", "?")
        raise InputError(f"mohdify: the model's config has a quantization_config of quant_method {method!r}; "
                         "MoHD records its plan in that entry, so a model cannot carry both.")


def record(hf_config: Any, plan: Plan, config: MoHDConfig) -> None:
    """Write the rewrite into an HF config as its `quantization_config`."""
    check_recordable(hf_config)
    hf_config.quantization_config = MoHDQuantizationConfig.from_rewrite(plan, config)


def forget(model: nn.Module) -> None:
    """Remove the MoHD record from an HF model (its config entry and what loading attached)."""
    hf_config = getattr(model, "config", None)
    if hf_config is not None and saved_record(hf_config) is not None:
        del hf_config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None and isinstance(model.hf_quantizer, MoHDHfQuantizer):
        model.hf_quantizer = None
        for attr in ("quantization_method", "is_quantized"):
            model.__dict__.pop(attr, None)


def saved_record(hf_config: Any) -> Optional[MoHDQuantizationConfig]:
    """The MoHD record of an HF config (as saved in config.json or set by mohdify()), or None."""
    q = getattr(hf_config, "quantization_config", None)
    if isinstance(q, MoHDQuantizationConfig):
        return q
    if isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD:
        return MoHDQuantizationConfig.from_dict(q)
    return None


# ----------------------------------------------------------------------------- plan <-> dict
def _plan_dict(plan: Plan) -> dict:
    out = {f.name: getattr(plan, f.name) for f in fields(plan) if f.name != "config"}
    out["branches"] = [asdict(b) for b in plan.branches]
    out["skipped"] = [list(s) for s in plan.skipped]
    out["capture_failures"] = [list(s) for s in plan.capture_failures]
    return out


def _plan_from(record: dict, config: MoHDConfig) -> Plan:
    p = dict(record)
    branches = [Branch(**{**b, "reader_shapes": {k: tuple(v) for k, v in b["reader_shapes"].items()},
                          "writer_shape": tuple(b["writer_shape"])}) for b in p.pop("branches")]
    p["skipped"] = [tuple(s) for s in p.get("skipped", [])]
    p["capture_failures"] = [tuple(s) for s in p.get("capture_failures", [])]
    return Plan(branches=branches, config=config, **p)


def _rebase(plan: Plan, model: nn.Module) -> Plan:
    """The plan with its layer names as `model` has them: a plan saved from `LlamaForCausalLM`
    ("model.layers.0...") loaded into `LlamaModel` ("layers.0..."), or the other way round."""
    names = {n for n, _ in model.named_modules()}
    if all(b.writer in names for b in plan.branches):
        return plan
    prefix = getattr(model, "base_model_prefix", "") + "."
    if all(b.writer.startswith(prefix) and b.writer[len(prefix):] in names for b in plan.branches):
        rename = lambda n: n[len(prefix):] if n.startswith(prefix) else n  # noqa: E731
    elif all(prefix + b.writer in names for b in plan.branches):
        rename = lambda n: prefix + n  # noqa: E731
    else:
        missing = [b.writer for b in plan.branches if b.writer not in names][:3]
        raise InputError(f"the MoHD plan in this checkpoint's config.json names layers that "
                         f"{type(model).__name__} does not have ({missing}, ...): it was saved from another "
                         "model class; load it with the class it was saved from.")
    branches = [Branch(rename(b.name), [rename(r) for r in b.readers], rename(b.writer), b.input,
                       {rename(k): v for k, v in b.reader_shapes.items()}, b.writer_shape) for b in plan.branches]
    return Plan(plan.hidden_size, branches, [(rename(n), w) for n, w in plan.skipped], plan.frontend, plan.config,
                plan.model_name, plan.model_params, plan.capture_failures)


def _check_checkpoint(model: nn.Module, files: Optional[list[str]]) -> None:
    """Refuse a checkpoint that lacks the MoHD entries (routers, fusion, group ids) of the model the
    plan made: transformers would leave those Parameters uninitialised."""
    saved = _safetensors_keys(files or [])
    if saved is None:
        return   # .bin checkpoints: key names are not readable without loading them
    prefix = getattr(model, "base_model_prefix", "") + "."
    strip = lambda k: k[len(prefix):] if k.startswith(prefix) else k  # noqa: E731
    saved = {strip(k) for k in saved}
    ids = {id(b) for b in mohd_branches(model)}
    owners = [n for n, m in model.named_modules() if id(m) in ids]
    wanted = [k for k in model.state_dict(keep_vars=True) if any(k.startswith(o + ".") for o in owners)]
    missing = sorted(k for k in wanted if strip(k) not in saved)
    if missing:
        raise InputError(f"this checkpoint's config.json has a MoHD plan, but its weights lack the MoHD entries "
                         f"{missing[:4]} ({len(missing)} in all): the weights and config.json do not belong together.")


def _safetensors_keys(files: list[str]) -> Optional[set[str]]:
    if not files or not all(str(f).endswith(".safetensors") for f in files):
        return None
    from safetensors import safe_open
    keys: set[str] = set()
    for file in files:
        with safe_open(file, framework="pt") as f:
            keys.update(f.keys())
    return keys


def checkpoint_has_record(path: str) -> bool:
    """Whether the folder `path` holds a config.json with a MoHD quantization_config."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            q = json.load(f).get("quantization_config")
    except (OSError, ValueError):
        return False
    return isinstance(q, dict) and q.get("quant_method") == QUANT_METHOD
