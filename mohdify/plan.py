"""Plan: what a MoHD rewrite finds and changes. The single source of truth for the rewrite and
for the report `explain()` prints."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .config import MoHDConfig
from .routers import router_kind

__all__ = ["Branch", "Plan", "untrained_router_note"]


@dataclass
class Branch:
    """One residual branch.

    Attributes:
        name: qualified name of the module that holds the branch (its readers' and writer's
            closest common parent); the branch's router is registered there.
        readers: qualified names of the linear layers that read the branch input.
        writer: qualified name of the linear layer that writes the residual stream.
        input: how the readers' input is derived from the residual stream h.
        reader_shapes: (in_features, out_features) of each reader.
        writer_shape: (in_features, out_features) of the writer.
    """

    name: str
    readers: list[str]
    writer: str
    input: str
    reader_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)
    writer_shape: tuple[int, int] = (0, 0)

    def linear_params(self) -> int:
        """Weights of the branch's readers and writer (biases excluded)."""
        return sum(i * o for i, o in self.reader_shapes.values()) + self.writer_shape[0] * self.writer_shape[1]

    def counts(self, config: MoHDConfig, hidden_size: int) -> dict[str, int]:
        """Parameters and per-token FLOPs of the branch's linear maps, total and activated."""
        delta = config.density
        dense = self.linear_params()
        active = round(dense * delta)
        kind = router_kind(config.router)
        extra = kind.extra_params(config, hidden_size)
        extra += config.num_groups ** 2 if config.fusion == "mix" else 0
        route_flops = kind.route_flops(config, hidden_size)
        fusion_flops = 2 * config.num_groups * hidden_size if config.fusion == "mix" else 0
        return {"params": dense + extra, "active_params": active + extra,
                "flops": 2 * dense, "active_flops": 2 * active + route_flops + fusion_flops}


@dataclass
class Plan:
    """Result of the analysis of a model: `explain()` returns it, `mohdify()` applies it.

    Attributes:
        hidden_size: D, the width of the residual stream.
        branches: the residual branches that are (or would be) rewritten.
        skipped: (qualified name, reason) of every linear layer or residual branch left dense.
        frontend: the capture front-end that produced the graph(s).
        config: the MoHDConfig the counts are computed for.
        model_params: all parameters of the model (before the rewrite).
        capture_failures: (front-end, why it failed) of front-ends tried before the one that worked.
    """

    hidden_size: int
    branches: list[Branch]
    skipped: list[tuple[str, str]]
    frontend: str
    config: MoHDConfig
    model_name: str = ""
    model_params: int = 0
    capture_failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def readers(self) -> list[str]:
        return [r for b in self.branches for r in b.readers]

    @property
    def writers(self) -> list[str]:
        return [b.writer for b in self.branches]

    def totals(self) -> dict[str, int]:
        keys = ("params", "active_params", "flops", "active_flops")
        sums = dict.fromkeys(keys, 0)
        for b in self.branches:
            for k, v in b.counts(self.config, self.hidden_size).items():
                sums[k] += v
        return sums

    def branch(self, name: str) -> Optional[Branch]:
        return next((b for b in self.branches if b.name == name or b.writer == name), None)

    def __str__(self) -> str:
        c = self.config
        group = self.hidden_size // c.num_groups if self.hidden_size % c.num_groups == 0 else "?"
        head = (f"MoHD plan for {self.model_name or 'model'}: hidden size D={self.hidden_size}, "
                f"{len(self.branches)} branches, captured with {self.frontend}\n"
                f"config: groups={c.num_groups} (G={group}), "
                f"shared={c.num_shared}, top_k={c.top_k}, density={c.density:.3f}, router={c.router}, "
                f"scaling={c.scaling}, fusion={c.fusion}\n")
        rows = [("branch", "readers", "writer", "input", "params", "active", "FLOPs/tok", "active FLOPs/tok")]
        for b in self.branches:
            n = b.counts(c, self.hidden_size)
            readers = ", ".join(_leaf(r, b.name) for r in b.readers)
            rows.append((b.name or "(root)", readers, _leaf(b.writer, b.name), b.input, _fmt(n["params"]),
                         _fmt(n["active_params"]), _fmt(n["flops"]), _fmt(n["active_flops"])))
        t = self.totals()
        rows.append(("total", "", "", "", _fmt(t["params"]), _fmt(t["active_params"]), _fmt(t["flops"]),
                     _fmt(t["active_flops"])))
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        out = head + "\n".join(lines)
        if self.model_params:
            share = t["params"] / self.model_params if self.model_params else 0.0
            out += (f"\nmodel parameters: {_fmt(self.model_params)}; in rewritten branches (with routers): "
                    f"{_fmt(t['params'])} ({share:.0%}); activated per token there: {_fmt(t['active_params'])}")
        if self.skipped:
            out += "\nleft dense:\n" + "\n".join(f"  {name}: {why}" for name, why in self.skipped)
        note = untrained_router_note(c)
        if note:
            out += f"\nnote: {note}"
        if self.capture_failures:
            out += "\nfront-ends that failed first:\n" + "\n".join(f"  {n}: {w}" for n, w in self.capture_failures)
        return out


def untrained_router_note(config: MoHDConfig) -> Optional[str]:
    """What an untrained router does, or None when it does not matter (see RouterKind.untrained_note)."""
    return router_kind(config.router).untrained_note(config)


def _leaf(name: str, parent: str) -> str:
    return name[len(parent) + 1:] if parent and name.startswith(parent + ".") else name


def _fmt(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
