"""Apply: rewrite a model in place according to a Plan, and undo it.

Module level (not a graph rewrite): each reader and writer is swapped for a MoHD module that holds
the very same weight and bias Parameters, and each branch gets a `MoHDBranch` registered as
`<branch module>.mohd` (`mohd_1`, ... if that name is taken); the plan never names a container
(nn.Sequential, ModuleList, ModuleDict: they would call or iterate a new child) as a branch module.
The model keeps its class.
Transactional: if any step fails, every swap already made is undone before the error propagates.
"""

from __future__ import annotations

from torch import nn

from mohdify.codegen.cpu import native
from mohdify.codegen.cpu.layout import lay_out_reader_weight, restore_row_major
from mohdify.config import MoHDConfig
from mohdify.modules import MoHDBranch, MoHDLinear, MoHDReader, MoHDWriter
from mohdify.plan import Plan

from .layers import is_linear_layer

__all__ = ["apply_plan", "remove_mohd", "mohd_branches", "is_mohdified"]

BRANCH_ATTR = "mohd"


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, leaf = name.rpartition(".")
    return (model.get_submodule(parent) if parent else model), leaf


def _free_attr(holder: nn.Module) -> str:
    attr, i = BRANCH_ATTR, 0
    while hasattr(holder, attr):
        i += 1
        attr = f"{BRANCH_ATTR}_{i}"
    return attr


def apply_plan(model: nn.Module, plan: Plan, config: MoHDConfig) -> list[MoHDBranch]:
    """Swap the plan's readers and writers for MoHD modules; all or nothing."""
    config.check_hidden_size(plan.hidden_size)
    undo: list[tuple[nn.Module, str, object]] = []   # (module, attribute, previous value or None)

    def swap(holder: nn.Module, attr: str, new: nn.Module) -> None:
        undo.append((holder, attr, holder._modules.get(attr)))
        setattr(holder, attr, new)

    made = []
    try:
        for b in plan.branches:
            writer = model.get_submodule(b.writer)
            for name in (*b.readers, b.writer):
                if not is_linear_layer(model.get_submodule(name)):
                    raise RuntimeError(f"{name} is a {type(model.get_submodule(name)).__name__}, not a linear "
                                       "layer: the model changed since the plan was made")
            branch = MoHDBranch(plan.hidden_size, config, name=b.name,
                                dtype=writer.weight.dtype, device=writer.weight.device).train(writer.training)
            holder = model.get_submodule(b.name) if b.name else model
            swap(holder, _free_attr(holder), branch)
            for name in b.readers:
                layer = model.get_submodule(name)
                reader = MoHDReader(layer, branch, transposed=not isinstance(layer, nn.Linear)).train(layer.training)
                swap(*_parent(model, name), reader)
            new_writer = MoHDWriter(writer, branch, transposed=not isinstance(writer, nn.Linear)).train(writer.training)
            swap(*_parent(model, b.writer), new_writer)
            made.append(branch)
    except BaseException:
        for holder, attr, old in reversed(undo):
            if old is None:
                delattr(holder, attr)
            else:
                setattr(holder, attr, old)
        raise
    for b in plan.branches:   # once every swap is made: CPU reader weights stored group-contiguous
        for name in b.readers:
            lay_out_reader_weight(model.get_submodule(name).original)
    if any(p.device.type == "cpu" for p in model.parameters()):
        native.library()      # built / loaded now, so a torch.compile trace sees the native kernels (grouped.py)
    return made


def mohd_branches(model: nn.Module) -> list[MoHDBranch]:
    """The MoHDBranch modules of a mohdified model, in module order."""
    return [m for m in model.modules() if isinstance(m, MoHDBranch)]


def is_mohdified(model: nn.Module) -> bool:
    return any(isinstance(m, (MoHDBranch, MoHDLinear)) for m in model.modules())


def remove_mohd(model: nn.Module) -> None:
    """Put the original layers back, with the Parameters the MoHD layers hold now (whatever replaced
    them since the rewrite: `load_state_dict(assign=True)`, `.to()`, parametrizations), and remove
    the branches (their routers and fusion matrices)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MoHDLinear):
            holder, attr = _parent(model, name)
            original = module.original
            original.weight = module.weight
            original.bias = module.bias
            restore_row_major(original)   # undo lay_out_reader_weight (codegen/cpu/layout.py)
            setattr(holder, attr, original)
    for name, module in list(model.named_modules()):
        if isinstance(module, MoHDBranch):
            holder, attr = _parent(model, name)
            delattr(holder, attr)
