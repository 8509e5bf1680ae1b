"""mohdify: Mixture of Hidden Dimensions (MoHD) for existing PyTorch Transformers.

    plan = mohdify.explain(model, example_inputs)             # what would be rewritten, and why
    model = mohdify.mohdify(model, MoHDConfig(...), example_inputs=example_inputs)
    loss = task_loss + mohdify.aux_loss(model)
    fast = torch.compile(model, backend="mohd")
    dense = mohdify.demohdify(model)
"""

from .api import aux_loss, branches, demohdify, explain, graph, mohdify, trace_routing
from .calibrate import calibrate
from .config import MoHDConfig
from .distributed import contiguous
from .errors import CaptureError, ConfigError, InputError, MohdifyError, UnsupportedModelError
from .expand import expand, expand_config, expansion_mohd_config
from .flow import Flow, flow, flow_from_activations
from .plan import Branch, Plan
from .saving import HAS_TRANSFORMERS, from_pretrained

if HAS_TRANSFORMERS:   # registers quant_method "mohd": transformers' from_pretrained loads MoHD models
    from . import hf_quantizer  # noqa: F401

__version__ = "0.1.0"

__all__ = [
    "MoHDConfig", "Plan", "Branch", "explain", "mohdify", "demohdify", "aux_loss", "graph", "branches", "calibrate",
    "from_pretrained", "trace_routing", "expand", "expand_config", "expansion_mohd_config", "flow", "Flow",
    "flow_from_activations", "contiguous",
    "MohdifyError", "ConfigError", "InputError", "CaptureError", "UnsupportedModelError",
]
