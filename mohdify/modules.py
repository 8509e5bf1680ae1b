"""The modules a MoHD rewrite puts into a model.

A residual branch gets one `MoHDBranch` (its router, its fusion matrix, its shared/routed group
ids). Its readers become `MoHDReader`s and its writer a `MoHDWriter`; both keep the original
weight and bias Parameters (same objects, same state-dict keys), so the rewrite is reversible.

Routing is one value per branch application (`mohdify.routing.Routing`): the first reader of an
application computes it with `MoHDBranch.route`, the other readers of the same input reuse it and
the writer consumes it, through a per-thread slot (`mohdify.routing.SLOTS`), never through module
attributes. After a forward nothing computed in it stays on a module, except the balance losses
of training-mode applications, summed until `mohdify.aux_loss` takes them (see `BalanceLog`).

Readers and writers call the MoHD ops, except on CPU for many tokens where the crossover table says
dense for every op: then they run the reference's ops on a masked input made once per application
(`mohdify.codegen.cpu.masked`, kept in the slot with the routing).

Shape legend: T = tokens, D = hidden size, N = groups, G = D / N, N_s / N_r = shared / routed
groups, k = top_k.
"""

from __future__ import annotations

import threading
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from mohdify.codegen import read as read_op
from mohdify.codegen import read_naive, write_naive
from mohdify.codegen import write as write_op
from mohdify.codegen.contracts import transformed
from mohdify.codegen.cpu.masked import masked_pays, read_masked, times_groups, write_masked

from .config import MoHDConfig
from .routers import router_kind
from .routing import SLOTS, Routing, route_tokens

__all__ = ["MoHDBranch", "MoHDLinear", "MoHDReader", "MoHDWriter", "BalanceLog"]


class BalanceLog:
    """The sum of a branch's balance losses kept since `aux_loss` last took it.

    A running sum (a tensor attribute), not a list: traced by torch.compile, appending to a list made
    dynamo guard on its length, so every forward that kept a loss before `aux_loss` took them
    recompiled, up to the recompile limit. A tensor attribute gives two compiled variants at most
    (nothing kept yet / something kept).

    Not model state: a copy (`copy.deepcopy`, pickling, `torch.save`) starts empty, so copies never
    carry a step's autograd graph. Bounded in eager passes: past `limit` losses never taken (the user
    never calls aux_loss), the kept ones are dropped, with one warning. Eager adds are safe from
    several threads.
    """

    def __init__(self, limit: int = 1024):
        self.total: Optional[Tensor] = None   # the sum of the kept losses (a 0-d tensor) or None
        self.count = 0                        # losses in `total` added by eager passes (for the bound)
        self.limit = limit
        self.warned = False
        self._lock = threading.Lock()

    def add(self, loss: Tensor, name: str) -> None:
        if torch.compiler.is_compiling():
            self.total = loss if self.total is None else self.total + loss
            return
        with self._lock:
            dropped = self.count >= self.limit
            if dropped:
                self.total, self.count = None, 0
            self.total = loss if self.total is None else self.total + loss
            self.count += 1
            warn, self.warned = dropped and not self.warned, self.warned or dropped
        if warn:
            warnings.warn(f"MoHD branch {name!r} has kept {self.limit} balance losses that mohdify.aux_loss() "
                          "never took; they are dropped. Add mohdify.aux_loss(model) to the training loss, or "
                          "call model.eval() for passes that do not train.", stacklevel=3)

    def take(self) -> Optional[Tensor]:
        """The sum kept so far (None if nothing), and the log is empty again."""
        with self._lock:
            total, self.total, self.count = self.total, None, 0
        return total

    def __deepcopy__(self, memo) -> BalanceLog:
        return BalanceLog(self.limit)

    def __getstate__(self) -> dict:
        return {"limit": self.limit}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["limit"])


class MoHDBranch(nn.Module):
    """Router, fusion matrix and group ids of one residual branch.

    Parameters: `router` `[N_r, D]` (learned router, zero-initialised) and `fusion` `[N, N]`
    (fusion="mix", identity-initialised). Buffers: `shared_idx` `[N_s]`, `routed_idx` `[N_r]`.
    """

    def __init__(self, hidden_size: int, config: MoHDConfig, *, name: str = "",
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.group_size = config.check_hidden_size(hidden_size)
        self.config = config
        self.name = name
        n, n_s = config.num_groups, config.num_shared
        self.register_buffer("shared_idx", torch.arange(n_s, device=device))
        self.register_buffer("routed_idx", torch.arange(n_s, n, device=device))
        self.router = router_kind(config.router).parameter(config.num_routed, hidden_size, dtype, device)
        self.fusion = None
        if config.fusion == "mix":
            self.fusion = nn.Parameter(torch.eye(n, dtype=dtype, device=device))
        self.balance_log = BalanceLog()

    def extra_repr(self) -> str:
        c = self.config
        return (f"{self.name or 'branch'}: D={self.hidden_size}, groups={c.num_groups}x{self.group_size}, "
                f"shared={c.num_shared}, top_k={c.top_k}, router={c.router}, scaling={c.scaling}, fusion={c.fusion}")

    def computes_balance(self) -> bool:
        """Whether an application computes its balance loss: a learned router that requires grad, in
        training mode (with autograd on, or off: the forward of reentrant checkpointing), outside
        inference mode. Eval-mode passes keep nothing, with autograd on too (attribution, input
        gradients): the loss is a training loss, and kept it would hold each pass's graph until
        `aux_loss` took it."""
        if not router_kind(self.config.router).has_balance_loss or not self.router.requires_grad:
            return False
        if not self.training:
            return False
        return torch.compiler.is_compiling() or not torch.is_inference_mode_enabled()

    @staticmethod
    def in_backward() -> bool:
        """Whether this forward is a recomputation inside a backward pass (activation checkpointing):
        it computes what the forward computed (checkpointing checks that) but keeps no loss."""
        return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1

    def route(self, x: Tensor) -> Routing:
        """The routing of the branch input `x` `[T, D]` (see `mohdify.routing.route_tokens`)."""
        c = self.config
        return route_tokens(x, c.router, self.router, self.shared_idx, self.routed_idx, c.top_k, c.scaling, c.density,
                            balance=self.computes_balance())

    def routing_for(self, x: Tensor) -> tuple[Tensor, Routing, Optional[Tensor]]:
        """A reader's view: (`x` as `[T, D]`, the routing of this application, the masked input `[T, D]`
        when the application runs the eager masked path (codegen/cpu/masked.py) else None), computed by
        the first reader of `x` and reused by the others."""
        slots = SLOTS.slots
        held = slots.get(id(self))
        if held is not None and held[0] is x:
            return held[1], held[2], held[3]
        x2 = x.reshape(-1, x.shape[-1])                                       # [T, D]
        routing = self.route(x2)
        xm = None
        if masked_pays(x2, self.group_size, self.config.density):
            xm = times_groups(x2, routing.mask)                            # [T, D]
        slots[id(self)] = (x, x2, routing, xm)
        return x2, routing, xm

    def pending_routing(self) -> Optional[Routing]:
        """The routing of this thread's application in flight (its readers ran, its writer has not),
        or None: for hooks that watch routing (a reader's forward hook, a writer's pre-hook)."""
        held = SLOTS.slots.get(id(self))
        return None if held is None else held[2]

    def drop_routing(self) -> None:
        """Forget this thread's application in flight, if any (a pass that raised before the writer)."""
        SLOTS.slots.pop(id(self), None)

    def take_routing(self) -> tuple[Routing, bool]:
        """The writer's view: (the routing of this application, removed from the slot; whether the
        application runs the masked path, decided once by its first reader)."""
        held = SLOTS.slots.pop(id(self), None)
        if held is None:
            raise RuntimeError(
                f"MoHD writer of branch {self.name!r} ran before any of its readers: the branch has no "
                "routing for this application. Readers must run before their writer.")
        routing = held[2]
        if routing.balance is not None and not self.in_backward():
            self.balance_log.add(routing.balance, self.name)
        return routing, held[3] is not None


class MoHDLinear(nn.Module):
    """Shared base: holds the original layer's Parameters and a reference to its branch."""

    def __init__(self, original: nn.Module, branch: MoHDBranch, *, transposed: bool):
        super().__init__()
        self.weight = original.weight
        self.bias = original.bias
        self.transposed = transposed   # GPT-2 Conv1D stores weight as [in, out]
        in_f, out_f = self.weight.shape[::-1] if not transposed else self.weight.shape
        self.in_features, self.out_features = int(in_f), int(out_f)
        # Plain references, not submodules: the branch is registered once, elsewhere in the model,
        # and the original layer is kept only to be put back by demohdify().
        object.__setattr__(self, "branch", branch)
        object.__setattr__(self, "original", original)

    def linear_weight(self) -> Tensor:
        """The weight as `[out_features, in_features]`."""
        return self.weight.t() if self.transposed else self.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, branch={self.branch.name}"


class MoHDReader(MoHDLinear):
    """A linear reading the branch input: y = alpha * W[:, A] x[A] + b."""

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        x2, routing, xm = self.branch.routing_for(x)                          # [T, D]
        weight = self.linear_weight()
        if xm is not None and weight.dtype == xm.dtype:
            y = read_masked(xm, weight, self.bias, routing.scale)             # [T, O]
        elif transformed(x2):                                                 # torch.func: the reference
            y = read_naive(x2, weight, self.bias, routing.mask, routing.scale)
        else:
            y = read_op(x2, weight, self.bias, routing.mask, routing.scale)   # [T, O]
        return y.view(*lead, self.out_features)


class MoHDWriter(MoHDLinear):
    """A linear writing the residual stream: only the rows of active groups, gated and fused."""

    def forward(self, u: Tensor) -> Tensor:
        routing, masked = self.branch.take_routing()
        gates = routing.gates                                                 # [T, N]
        lead = u.shape[:-1]
        u2 = u.reshape(-1, u.shape[-1])                                       # [T, I]
        if u2.shape[0] != gates.shape[0]:
            raise RuntimeError(
                f"MoHD writer of branch {self.branch.name!r} got {u2.shape[0]} tokens, but its readers "
                f"routed {gates.shape[0]}: a branch must write the tokens it read.")
        weight, fusion = self.linear_weight(), self.branch.fusion
        if masked and weight.dtype == u2.dtype:
            o = write_masked(u2, weight, self.bias, gates, fusion)            # [T, D]
        elif transformed(u2):                                                 # torch.func: the reference
            o = write_naive(u2, weight, self.bias, gates, fusion)
        else:
            o = write_op(u2, weight, self.bias, gates, fusion)                # [T, D]
        return o.view(*lead, self.out_features)
