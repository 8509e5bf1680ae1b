"""`mohdify::<op>_nograd`: the reader and writer ops without an autograd formula, for compiled graphs.

A `torch.library.custom_op` with a registered backward passes through a Python autograd kernel on
every call, also under `no_grad` (about 20 us of a ~35 us dispatch on CPU, measured in
codegen/README.md). Inside an inductor graph that hop is never needed: AOT autograd has already
traced the backward through the ops' formulas into its own graph (calls of `read_backward` /
`write_backward`), and it runs the forward graph without recording autograd, in training as in
inference. So the torch.compile backend (mohdify/backend.py) hands inductor `nograd_pass()`, a
post-grad pass that retargets `read`, `read_multi`, `write` and `write_add` to these twins: the
same schema, the same kernels per device (the native CPU decode kernels, Triton on CUDA) and the
same fake, registered directly on the CPU / CUDA dispatch keys (no Python autograd kernel).
Called eagerly with tensors that need grad, a twin gives them no gradient (torch's fallback warns
"an autograd kernel was not registered", naming the twin), never a wrong one.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import fx

from .cpu.read import read_cpu, read_multi_cpu
from .cpu.write import write_add_cpu, write_cpu
from .read import multi as _read_multi
from .read.fused import read_cuda
from .write import residual as _write_add
from .write.fused import write_cuda

__all__ = ["NOGRAD_OPS", "retarget", "nograd_pass"]

# op name -> kernel per device type (the ones the op with autograd registers)
_KERNELS = {
    "read": {"cpu": read_cpu, "cuda": read_cuda},
    "read_multi": {"cpu": read_multi_cpu, "cuda": _read_multi._read_multi_cuda},
    "write": {"cpu": write_cpu, "cuda": write_cuda},
    "write_add": {"cpu": write_add_cpu, "cuda": _write_add._write_add_cuda},
}
_LIB = torch.library.Library("mohdify", "FRAGMENT")


def _define(name: str) -> tuple[torch._ops.OpOverload, torch._ops.OpOverload]:
    op = getattr(torch.ops.mohdify, name).default
    schema = str(op._schema).replace(f"mohdify::{name}(", f"{name}_nograd(", 1)   # same arguments and returns
    _LIB.define(schema)
    for device, kernel in _KERNELS[name].items():
        _LIB.impl(f"{name}_nograd", kernel, device.upper())
    # the fake: the op's own (called on fake tensors it dispatches to the op's registered fake)
    torch.library.register_fake(f"mohdify::{name}_nograd", lambda *args, _op=op: _op(*args), lib=_LIB)
    return op, getattr(torch.ops.mohdify, f"{name}_nograd").default


NOGRAD_OPS = dict(_define(name) for name in _KERNELS)     # op overload -> its twin without autograd


def retarget(graph: fx.Graph) -> int:
    """Every MoHD reader / writer call of `graph` becomes its `_nograd` twin; returns how many."""
    count = 0
    for node in graph.nodes:
        if node.op == "call_function" and (twin := NOGRAD_OPS.get(node.target)) is not None:
            node.target = twin
            count += 1
    return count


@functools.cache
def nograd_pass():
    """`retarget` as an inductor post-grad custom pass (built on first use: importing inductor is slow)."""
    from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

    class NoGradPass(CustomGraphPass):
        def __call__(self, graph: fx.Graph) -> None:
            retarget(graph)

        def uuid(self) -> Optional[bytes]:
            return get_hash_for_files((__file__,))

    return NoGradPass()
