"""An independent reference for MoHD (MOHD_SPEC.md, invariant 2), written from the spec alone.

Nothing here calls mohdify.modules or mohdify.codegen to compute. It works in three steps:
1. `RoutingRecorder` watches a mohdified model run and records, per call, what each reader was
   routed with (its input x, the mask, alpha, the gates) and the gates each writer received.
2. `check_routing` recomputes every recorded routing from its x with the spec's formulas
   (top-k of softmax(W_r x) or of the group energies, ties to the lower index; gates; alpha).
3. `masked_reference` runs the ORIGINAL dense model with hooks: each reader's input becomes
   alpha * (x masked to the active groups), each writer's output (W u + b) is gated per group,
   fused with (M kron I_G) and zero on inactive groups, using the recorded decisions.

Shape legend: T = tokens, D = hidden size, N = groups, G = D / N, N_s / N_r = shared / routed groups.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from typing import Any, Optional

import torch
from torch import Tensor, nn


def branch_of(model: nn.Module, reader_or_writer: str) -> nn.Module:
    """The MoHDBranch a rewritten layer routes with (its `branch` reference)."""
    return model.get_submodule(reader_or_writer).branch


def randomize_branches(model: nn.Module, seed: int, permute_groups: bool) -> None:
    """Non-trivial routing: random router weights (logits of std ~1.5), fusion = I + noise, and
    optionally a random set of shared groups (as calibration would pick)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in model.mohd_plan.branches:
            branch = branch_of(model, b.writer)
            n, d = branch.config.num_groups, branch.hidden_size
            if branch.router is not None:
                branch.router.copy_(torch.randn(branch.router.shape, generator=gen) * 1.5 / math.sqrt(d))
            if branch.fusion is not None:
                branch.fusion.copy_(torch.eye(n) + 0.3 * torch.randn(n, n, generator=gen))
            if permute_groups:
                perm = torch.randperm(n, generator=gen)
                n_s = branch.config.num_shared
                branch.shared_idx.copy_(perm[:n_s].sort().values)
                branch.routed_idx.copy_(perm[n_s:].sort().values)


class RoutingRecorder:
    """Context manager recording the routing of every reader and writer call of a mohdified model.

    `reads[reader]`: list of dicts (x `[T, D]`, mask `[T, N]`, alpha `[T]` or None, gates `[T, N]`);
    `writes[writer]`: list of the gates `[T, N]` of the routing the writer consumed.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.plan = model.mohd_plan
        self.reads: dict[str, list[dict]] = defaultdict(list)
        self.writes: dict[str, list[Tensor]] = defaultdict(list)
        self._last: dict[int, dict] = {}
        self._handles: list = []
        self._branches: list[nn.Module] = []

    def _wrap_route(self, branch: nn.Module) -> None:
        original = branch.route

        def route(x: Tensor):
            routing = original(x)
            self._last[id(branch)] = dict(x=x.detach().clone(), mask=routing.mask.clone(),
                                          alpha=None if routing.scale is None else routing.scale.detach().clone(),
                                          gates=routing.gates.detach().clone())
            return routing

        branch.route = route   # an instance attribute shadows the method until __exit__
        self._branches.append(branch)

    def __enter__(self) -> RoutingRecorder:
        for b in self.plan.branches:
            branch = branch_of(self.model, b.writer)
            self._wrap_route(branch)
            key = id(branch)
            for name in b.readers:
                def after_read(module, args, out, name=name, key=key):
                    self.reads[name].append(self._last[key])   # readers of one input share its routing
                self._handles.append(self.model.get_submodule(name).register_forward_hook(after_read))

            def before_write(module, args, name=b.writer, key=key):
                self.writes[name].append(self._last[key]["gates"])
            self._handles.append(self.model.get_submodule(b.writer).register_forward_pre_hook(before_write))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for branch in self._branches:
            del branch.route


def spec_routing(x: Tensor, router: Optional[Tensor], shared_idx: Tensor, routed_idx: Tensor,
                 config) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor]:
    """The spec's routing of `x` `[T, D]` in float64: (mask `[T, N]`, gates `[T, N]`, alpha `[T]` or
    None, scores `[T, N_r]`). Ties go to the lower routed column."""
    num_tokens, d = x.shape
    n, k = config.num_groups, config.top_k
    xd = x.double()                                                            # [T, D]
    xg = xd.reshape(num_tokens, n, d // n)                                     # [T, N, G]
    if router is not None:
        scores = torch.softmax(xd @ router.double().t(), dim=-1)               # [T, N_r]
    else:
        scores = (xg[:, routed_idx] ** 2).sum(-1)                              # [T, N_r]
    mask = torch.zeros(num_tokens, n, dtype=torch.bool)                        # [T, N]
    gates = torch.zeros(num_tokens, n, dtype=torch.float64)                    # [T, N]
    mask[:, shared_idx] = True
    gates[:, shared_idx] = 1.0
    for t in range(num_tokens):
        row = scores[t].tolist()
        chosen = sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]
        total = sum(row[i] for i in chosen)
        for i in chosen:
            group = int(routed_idx[i])
            mask[t, group] = True
            gates[t, group] = k * row[i] / total if router is not None else 1.0
    if config.scaling == "none":
        alpha = None
    elif config.scaling == "density":
        alpha = torch.full((num_tokens,), 1.0 / config.density, dtype=torch.float64)  # [T]
    else:
        kept = (xg * mask[:, :, None]).reshape(num_tokens, d)                  # [T, D]
        full, part = xd.norm(dim=-1), kept.norm(dim=-1)                        # [T], [T]
        alpha = torch.where(part > 0, full / part.clamp_min(1e-300), torch.ones_like(full))  # [T]
    return mask, gates, alpha, scores


def check_routing(model: nn.Module, rec: RoutingRecorder, tie_tol: float = 1e-6) -> int:
    """Assert every recorded routing follows the spec; return how many calls were checked.

    A token whose recorded top-k differs from the float64 one is accepted only on a near tie:
    every group in the difference scores within `tie_tol` (relative) of the k-th best score.
    """
    checked = 0
    for b in rec.plan.branches:
        branch = branch_of(model, b.writer)
        config = branch.config
        router = None if branch.router is None else branch.router.detach()
        calls = [c for r in b.readers for c in rec.reads[r]]
        for i, c in enumerate(calls):
            where = f"branch {b.name} call {i}"
            mask, gates, alpha, scores = spec_routing(c["x"], router, branch.shared_idx, branch.routed_idx, config)
            bad = (mask != c["mask"]).any(-1).nonzero().flatten().tolist()
            for t in bad:
                row = scores[t]
                kth = row.sort(descending=True).values[config.top_k - 1]
                diff = (mask[t] ^ c["mask"][t])[branch.routed_idx]             # [N_r]
                gap = (row[diff] - kth).abs().max().item()
                assert gap <= tie_tol * max(kth.abs().item(), 1e-30), (
                    f"{where}: token {t} routed to {c['mask'][t].nonzero().flatten().tolist()}, spec says "
                    f"{mask[t].nonzero().flatten().tolist()} (scores {row.tolist()})")
            ok = torch.tensor([t not in bad for t in range(mask.shape[0])])
            assert c["mask"].dtype == torch.bool and c["mask"].shape == mask.shape, where
            err = (c["gates"][ok].double() - gates[ok]).abs().max().item() if ok.any() else 0.0
            assert err <= 1e-5, f"{where}: gates differ from the spec by {err:.3e}"
            assert (c["gates"][~c["mask"]] == 0).all(), f"{where}: nonzero gate on an inactive group"
            if alpha is None:
                assert c["alpha"] is None, f"{where}: scaling 'none' but alpha = {c['alpha']}"
            else:
                a_err = (c["alpha"][ok].double() - alpha[ok]).abs().max().item() if ok.any() else 0.0
                assert a_err <= 1e-5 * alpha.abs().max().item(), f"{where}: alpha differs by {a_err:.3e}"
            checked += 1
    return checked


def check_writes(rec: RoutingRecorder) -> None:
    """Each writer call received the gates of its branch's latest reader call (routing reaches it)."""
    for b in rec.plan.branches:
        reads = [c for r in b.readers for c in rec.reads[r]]
        writes = rec.writes[b.writer]
        assert writes, f"writer {b.writer} never ran"
        for i, gates in enumerate(writes):
            assert any(torch.equal(gates, c["gates"]) for c in reads), (
                f"writer {b.writer} call {i}: its gates match no routing computed by its readers {b.readers}")


def masked_reference(dense: nn.Module, model: nn.Module, rec: RoutingRecorder, inputs: Any) -> Any:
    """Run the dense model with its readers' inputs masked and scaled and its writers' outputs gated,
    fused and masked, replaying the decisions `rec` recorded on the mohdified `model`."""
    reads = {name: deque(calls) for name, calls in rec.reads.items()}
    writes = {name: deque(calls) for name, calls in rec.writes.items()}
    handles = []

    def pre_read(module, args, name):
        call = reads[name].popleft()
        x = args[0]
        x2 = x.reshape(-1, x.shape[-1])                                        # [T, D]
        t, d = x2.shape
        err = (x2 - call["x"]).abs().max().item()
        assert err <= 1e-4 * max(1.0, call["x"].abs().max().item()), (
            f"reader {name}: the dense model's input differs from the routed x by {err:.3e}")
        n = call["mask"].shape[1]
        keep = call["mask"].repeat_interleave(d // n, dim=1).to(x.dtype)       # [T, D]
        xm = x2 * keep                                                         # [T, D]
        if call["alpha"] is not None:
            xm = xm * call["alpha"][:, None]                                   # [T, D]
        return (xm.reshape(x.shape), *args[1:])

    def post_write(module, args, out, name, fusion):
        gates = writes[name].popleft()                                         # [T, N]
        z = out.reshape(-1, out.shape[-1])                                     # [T, D]
        t, d = z.shape
        n = gates.shape[1]
        o = (z.reshape(t, n, d // n) * gates[:, :, None]).reshape(t, d)        # [T, D]
        if fusion is not None:
            o = o @ torch.kron(fusion, torch.eye(d // n, dtype=fusion.dtype)).t()  # [T, D]
        return o.reshape(out.shape)

    for b in rec.plan.branches:
        branch = branch_of(model, b.writer)
        fusion = None if branch.fusion is None else branch.fusion.detach().clone()
        for name in b.readers:
            handles.append(dense.get_submodule(name).register_forward_pre_hook(
                lambda m, a, name=name: pre_read(m, a, name)))
        handles.append(dense.get_submodule(b.writer).register_forward_hook(
            lambda m, a, o, name=b.writer, fusion=fusion: post_write(m, a, o, name, fusion)))
    try:
        out = dense(**inputs) if isinstance(inputs, dict) else dense(*inputs)
    finally:
        for h in handles:
            h.remove()
    left = {k: len(v) for k, v in {**reads, **writes}.items() if v}
    assert not left, f"the mohdified model made calls the dense model did not: {left}"
    return out
