"""Activation flow (the paper's observation, as a tool): how the energy of the residual-branch inputs is
spread over the hidden dimensions, layer by layer.

    report = mohdify.flow(model, [{"input_ids": ids} for ids in batches])
    print(report)                       # per branch: concentration, shared / token-specific dims, group load
    report.plot("flow/")                # heat map dims x branches, concentration curves, frequency, group load

For each residual branch (found by `explain` for a dense model, or the MoHD branches of a mohdified one)
the input of its first reader x [T, D] is recorded with a forward hook. Per dim d:
    energy[d]    = mean over tokens of x[t, d]^2
    frequency[d] = share of tokens whose top `top_fraction` x D dims (by |x[t]|) contain d
A dim is "shared" when frequency >= shared_threshold (active for most tokens), "token-specific" when
0 < frequency < top_fraction (active for fewer tokens than a uniform spread would give), "silent" when 0.
Concentration: share of the energy in the top 10/25/50% of dims, and of the contiguous groups of D / N.
Tokens where an `attention_mask` of the batch is 0 are left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .config import MoHDConfig
from .errors import ConfigError, InputError

__all__ = ["Flow", "flow", "flow_from_activations"]

FRACTIONS = (0.1, 0.25, 0.5)


@dataclass
class Flow:
    """Per-branch statistics of the readers' inputs. Tensors are [branches, D] or [branches, N]."""

    branches: list[str]
    energy: Tensor                    # [B, D] mean x^2 over tokens
    frequency: Tensor                 # [B, D] share of tokens with the dim in their top set
    tokens: int
    num_groups: int
    top_fraction: float
    shared_threshold: float = 0.5
    load: Optional[Tensor] = None     # [B, N] share of tokens each group was active for (mohdified models)
    extra: dict = field(default_factory=dict)

    @property
    def group_energy(self) -> Tensor:
        """[B, N] mean energy of each contiguous group of D / N dims."""
        b, d = self.energy.shape
        return self.energy.view(b, self.num_groups, d // self.num_groups).sum(-1)

    @staticmethod
    def _top_share(values: Tensor, fraction: float) -> Tensor:
        """[B] share of each row's total in its ceil(fraction x width) largest entries."""
        k = max(1, math.ceil(fraction * values.shape[1] - 1e-9))
        top = values.sort(dim=1, descending=True).values[:, :k].sum(1)
        return top / values.sum(1).clamp_min(1e-30)

    def concentration(self, fractions=FRACTIONS) -> dict[str, dict[float, Tensor]]:
        """{"dims": {f: [B] energy share of the top f of dims}, "groups": {f: [B] ... of groups}}."""
        return {"dims": {f: self._top_share(self.energy, f) for f in fractions},
                "groups": {f: self._top_share(self.group_energy, f) for f in fractions}}

    def shared_dims(self) -> Tensor:
        """[B, D] bool: dims in the top set of at least shared_threshold of the tokens."""
        return self.frequency >= self.shared_threshold

    def specific_dims(self) -> Tensor:
        """[B, D] bool: dims in the top set of some tokens, but of fewer than top_fraction of them."""
        return (self.frequency > 0) & (self.frequency < self.top_fraction)

    def summary(self) -> list[dict]:
        """One row per branch (JSON-friendly)."""
        conc = self.concentration()
        freq_total = self.frequency.sum(1).clamp_min(1e-30)
        rows = []
        for i, name in enumerate(self.branches):
            shared, specific = self.shared_dims()[i], self.specific_dims()[i]
            row = {"branch": name,
                   **{f"energy_top{int(f * 100)}%_dims": round(conc["dims"][f][i].item(), 4) for f in FRACTIONS},
                   **{f"energy_top{int(f * 100)}%_groups": round(conc["groups"][f][i].item(), 4) for f in FRACTIONS},
                   "shared_dims": int(shared.sum()), "specific_dims": int(specific.sum()),
                   "silent_dims": int((self.frequency[i] == 0).sum()),
                   "top_set_share_of_shared_dims": round((self.frequency[i][shared].sum() / freq_total[i]).item(), 4)}
            if self.load is not None:
                row["group_load"] = [round(x, 4) for x in self.load[i].tolist()]
            rows.append(row)
        return rows

    def __str__(self) -> str:
        d = self.energy.shape[1]
        head = (f"activation flow over {self.tokens} tokens, D={d}, {self.num_groups} groups, top set = "
                f"{self.top_fraction:.0%} of dims, shared = in the top set of >= {self.shared_threshold:.0%} "
                "of tokens\n")
        cols = ("branch", "top10% dims", "top25% dims", "top50% dims", "top25% groups", "shared", "specific", "silent")
        rows = [cols]
        for r in self.summary():
            rows.append((r["branch"], f"{r['energy_top10%_dims']:.3f}", f"{r['energy_top25%_dims']:.3f}",
                         f"{r['energy_top50%_dims']:.3f}", f"{r['energy_top25%_groups']:.3f}", str(r["shared_dims"]),
                         str(r["specific_dims"]), str(r["silent_dims"])))
        widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
        return head + "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows)

    def plot(self, folder: str | Path, title: str = "") -> list[Path]:
        """Write flow_heatmap.png, flow_concentration.png, flow_frequency.png (and flow_load.png for a
        mohdified model) into `folder`; returns their paths."""
        from ._flow_plots import plot_flow
        return plot_flow(self, Path(folder), title)


class _Accumulator:
    def __init__(self, dim: int, top_fraction: float):
        self.energy = torch.zeros(dim, dtype=torch.float64)
        self.count = torch.zeros(dim, dtype=torch.float64)
        self.tokens = 0
        self.k = max(1, math.ceil(top_fraction * dim - 1e-9))
        self.load: Optional[Tensor] = None

    def add(self, x: Tensor, gates: Optional[Tensor] = None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double().cpu()                 # [T, D]
        self.energy += x.pow(2).sum(0)
        top = x.abs().topk(self.k, dim=1).indices                               # [T, k]
        self.count += torch.zeros_like(x).scatter_(1, top, 1.0).sum(0)
        self.tokens += x.shape[0]
        if gates is not None:
            active = (gates.detach().reshape(x.shape[0], -1) != 0).double().sum(0).cpu()
            self.load = active if self.load is None else self.load + active


def flow_from_activations(inputs: dict[str, Iterable[Tensor]], *, num_groups: int = 16, top_fraction: float = 0.1,
                          shared_threshold: float = 0.5) -> Flow:
    """Flow statistics from recorded branch inputs: {branch name: tensors [..., D]} (all of one D)."""
    accs = {}
    for name, xs in inputs.items():
        for x in xs:
            acc = accs.setdefault(name, _Accumulator(x.shape[-1], top_fraction))
            acc.add(x)
    return _finish(accs, num_groups, top_fraction, shared_threshold)


def _finish(accs: dict, num_groups: int, top_fraction: float, shared_threshold: float) -> Flow:
    if not accs or any(a.tokens == 0 for a in accs.values()):
        raise InputError("flow: no token reached a branch; pass at least one batch the model runs on.")
    dims = {a.energy.numel() for a in accs.values()}
    if len(dims) != 1:
        raise InputError(f"flow: branch inputs have different widths {sorted(dims)}; one residual stream is required.")
    d = dims.pop()
    if d % num_groups:
        raise ConfigError(f"flow: num_groups={num_groups} must divide the hidden size {d}.")
    names = list(accs)
    energy = torch.stack([accs[n].energy / accs[n].tokens for n in names])
    freq = torch.stack([accs[n].count / accs[n].tokens for n in names])
    load = None
    if all(accs[n].load is not None for n in names):
        load = torch.stack([accs[n].load / accs[n].tokens for n in names])
    return Flow(names, energy, freq, accs[names[0]].tokens, num_groups, top_fraction, shared_threshold, load)


def _reader_modules(model: nn.Module, first_batch: Any) -> dict[str, nn.Module]:
    """{branch name: the module whose input is the branch input} for a dense or mohdified model."""
    from .api import branches, explain
    from .modules import MoHDReader
    if branches(model):
        first = {}
        for module in model.modules():
            if isinstance(module, MoHDReader):
                first.setdefault(module.branch.name, module)
        return first
    plan = explain(model, first_batch, MoHDConfig.dense(num_groups=1, num_shared=0, router="magnitude"))
    return {b.name: model.get_submodule(b.readers[0]) for b in plan.branches}


def flow(model: nn.Module, batches: Iterable[Any], *, num_groups: int = 16, top_fraction: float = 0.1,
         shared_threshold: float = 0.5) -> Flow:
    """Run `batches` (tuples of positional arguments or dicts of keyword arguments) through `model`
    without gradients and measure the activation flow of every residual branch's input.

    Args:
        num_groups: N for the group statistics (for a mohdified model, use its own num_groups).
        top_fraction: a token's "top set" is its ceil(top_fraction x D) dims of largest |x|.
        shared_threshold: a dim is shared when it is in the top set of at least this share of tokens.
    """
    from mohdify.passes.inputs import run_batches
    if not 0 < top_fraction <= 1 or not 0 < shared_threshold <= 1:
        raise ConfigError(f"flow: top_fraction and shared_threshold must be in (0, 1], got {top_fraction}, "
                          f"{shared_threshold}.")
    batches = list(batches)
    if not batches:
        raise InputError("flow: batches is empty; pass at least one batch of example inputs.")
    readers = _reader_modules(model, batches[0])
    accs = {name: None for name in readers}
    mask: list[Optional[Tensor]] = [None]

    def hook(name):
        def record(module, args, output):
            x = args[0]
            branch = getattr(module, "branch", None)
            routing = branch.pending_routing() if branch is not None else None   # this application's
            gates = routing.gates if routing is not None else None
            m = mask[0]
            if m is not None and tuple(m.shape) == tuple(x.shape[:-1]):
                keep = m.reshape(-1).bool()
                x = x.reshape(-1, x.shape[-1])[keep]
                gates = gates[keep] if gates is not None else None
            if accs[name] is None:
                accs[name] = _Accumulator(x.shape[-1], top_fraction)
            accs[name].add(x, gates)
        return record

    def batch_mask(batch):
        mask[0] = batch.get("attention_mask") if isinstance(batch, dict) else None

    run_batches(model, batches, [m.register_forward_hook(hook(n)) for n, m in readers.items()], batch_mask)
    return _finish({n: a for n, a in accs.items() if a is not None} or {"": _Accumulator(1, 1.0)},
                   num_groups, top_fraction, shared_threshold)
