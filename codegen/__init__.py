"""MoHD ops. Each folder holds one op: `naive.py` (the pure-torch reference, the ground truth)
and `op.py` (its `torch.library.custom_op` registration, with a fake and a backward).

Importing this package registers `torch.ops.mohdify.route`, `.read`, `.read_multi`, `.write` and
`.write_add` (`read_multi` and `write_add`: the fused forms the torch.compile backend puts in, passes/fuse.py),
and their `_nograd` twins (nograd.py: no autograd kernel, for the graphs inductor compiles), and
`.route_gates` (cpu/routing.py: the native routing of many tokens, a branch's route in training graphs).
"""

from . import autocast, nograd  # noqa: F401 - autocast rules for the ops; their twins without autograd
from .cpu import routing as _cpu_routing  # noqa: F401 - registers mohdify::route_gates
from .read import read, read_naive
from .route import route, route_naive
from .write import write, write_naive

__all__ = ["route", "read", "write", "route_naive", "read_naive", "write_naive"]
