"""Select: which residual branches are rewritten, and why every other linear layer stays dense.

The one rule `mohdify()`, `explain()` (through make_plan.py) and the backend (through rewrite.py) call.
Input: the GraphAnalysis of each captured graph (one for the backend, one per graph for `mohdify()`),
the hidden size, the model's LayerTable and an optional `keep(name)` (the user's filter_fn).
A branch is rewritten when its writer and at least one reader are linear layers called as modules,
its writer writes the hidden size, the writer runs after its readers on as many tokens as they read,
no layer of it belongs to another branch, and `keep` keeps it. Output: a Selection (the branches,
the reason for every layer left dense, and the graph matches of the branches chosen).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

from mohdify.plan import Branch

from .analyze import BranchMatch, GraphAnalysis
from .graph_names import node_value
from .layers import LayerTable

__all__ = ["Selection", "select_branches", "common_parent", "skip_reasons"]


@dataclass
class Selection:
    branches: dict[str, Branch] = field(default_factory=dict)                # writer -> branch
    skipped: dict[str, str] = field(default_factory=dict)                    # layer -> why left dense
    matches: dict[str, list[BranchMatch]] = field(default_factory=dict)      # writer -> its matches

    def rewrites(self, analysis: GraphAnalysis) -> list[tuple[BranchMatch, list]]:
        """(match, its reader LinearRefs kept) of the chosen branches found in `analysis`."""
        out = []
        for m in analysis.branches:
            branch = self.branches.get(m.writer.fqn)
            if branch is not None and m in self.matches.get(m.writer.fqn, []):
                out.append((m, [r for r in m.readers if r.layer and r.fqn in branch.readers]))
        return out


def common_parent(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    if common == parts[0] and len(names) == 1:
        common = common[:-1]
    return ".".join(common)


def select_branches(analyses: list[GraphAnalysis], hidden: int, table: LayerTable,
                    keep: Optional[Callable[[str], bool]] = None) -> Selection:
    """Choose the branches to rewrite among the analyses' matches; say why each other layer is not."""
    sel = Selection()
    owner: dict[str, str] = {}   # reader -> writer of its branch
    for a in analyses:
        for name, why in [*a.skipped, *product_reasons(a, table).items(), *skip_reasons(a).items()]:
            sel.skipped.setdefault(name, why)   # the analysis's specific reasons first
        for m in a.branches:
            why = _graph_refusal(a, m)
            if why is not None:
                sel.skipped[m.writer.fqn] = why
                continue
            if _add_branch(sel, owner, m, hidden, table, keep):
                sel.matches.setdefault(m.writer.fqn, []).append(m)
    in_plan = set(sel.branches) | {r for b in sel.branches.values() for r in b.readers}
    sel.skipped = {k: v for k, v in sel.skipped.items() if k not in in_plan}
    sel.matches = {w: ms for w, ms in sel.matches.items() if w in sel.branches}
    return sel


def _graph_refusal(a: GraphAnalysis, m: BranchMatch) -> Optional[str]:
    """Why a branch found in a graph cannot be rewritten as one routing there, or None."""
    order = a.view.order if a.view is not None else {}
    readers = [r for r in m.readers if r.layer]
    if readers and order and min(order[r.node] for r in readers) > order[m.writer.node]:
        return "its writer runs before its readers; left dense"
    hidden = m.writer.out_features
    if not all(_tokens_match(r.input, hidden, m.writer.input, m.writer.in_features) for r in readers):
        return "its writer writes a different number of tokens than its readers read; left dense"
    return None


def _tokens_match(x: fx.Node, x_width: int, u: fx.Node, u_width: int) -> bool:
    """Whether the writer input u carries as many tokens as the reader input x (provably)."""
    xv, uv = node_value(x), node_value(u)
    if not isinstance(xv, torch.Tensor) or not isinstance(uv, torch.Tensor):
        return False
    return bool(statically_known_true(xv.numel() // x_width == uv.numel() // u_width))


def _add_branch(sel: Selection, owner: dict, match: BranchMatch, hidden: int, table: LayerTable, keep) -> bool:
    """Add the branch of `match` to the selection, or record why not; True if it is (now) chosen."""
    branches, skipped = sel.branches, sel.skipped
    writer = match.writer.fqn
    if match.writer.out_features != hidden:
        skipped.setdefault(writer, f"writes width {match.writer.out_features}, not the hidden size {hidden}")
        return False
    if not match.writer.layer:
        for r in match.readers:
            if r.layer:
                skipped.setdefault(r.fqn, f"reads the input of a residual branch whose writer ({writer}) is a weight "
                                          "product, not a linear layer called as a module; the branch is left dense")
        return False   # the writer's own reason comes from product_reasons
    products = [r.where if r.where.startswith(r.fqn + ".") else r.fqn for r in match.readers if not r.layer]
    readers = list(dict.fromkeys(r.fqn for r in match.readers if r.layer))
    if not readers:
        skipped[writer] = (f"every reader of its branch ({', '.join(dict.fromkeys(products))}) is a weight product "
                           "(x @ W, einsum or F.linear on a weight or a slice of it), "
                           "not a linear layer called as a module; left dense")
        return False

    def refuse(why: str, layers=readers) -> bool:
        skipped[writer] = why
        for r in layers:
            if r != writer:
                skipped.setdefault(r, f"reads the input of the branch written by {writer}, which is left dense: {why}")
        return False

    roles = [r for r in readers if r in branches] + ([writer] if writer in owner else [])
    if roles:
        return refuse(f"{roles} would be both a reader and a writer (the layer is used in two places that are not "
                      "one branch); left dense")
    if writer in branches:
        if branches[writer].readers != readers:
            return refuse("called in several places with different readers; left dense",
                          readers + branches.pop(writer).readers)
        return True
    if keep is not None:
        if not keep(writer):
            skipped[writer] = "writer excluded by filter_fn; its branch is left dense"
            for r in readers:
                skipped.setdefault(r, "its branch's writer is excluded by filter_fn")
            return False
        kept = [r for r in readers if keep(r)]
        for r in readers:
            if r not in kept:
                skipped[r] = "excluded by filter_fn (stays a dense reader)"
        if not kept:
            skipped[writer] = "every reader of its branch is excluded by filter_fn; left dense"
            return False
        readers = kept
    clash = [r for r in readers if r in owner or r == writer]
    if clash:
        return refuse(f"shares reader(s) {clash} with another branch; left dense",
                      [r for r in readers if r not in clash])
    for r in readers:
        owner[r] = writer
    name = table.holder(common_parent(readers + [writer]))
    branches[writer] = Branch(name=name, readers=readers, writer=writer, input=match.input_desc,
                              reader_shapes={r: table.linears[r] for r in readers},
                              writer_shape=table.linears[writer])
    return True


def skip_reasons(analysis: GraphAnalysis) -> dict[str, str]:
    """Why each linear layer of a graph that is not a reader or writer stays dense."""
    used = {r.fqn for b in analysis.branches for r in b.readers} | {b.writer.fqn for b in analysis.branches}
    writers = {b.writer.node for b in analysis.branches}
    adds = {b.add for b in analysis.branches} | set(analysis.dense_sums)
    linear_nodes = {lin.node for lin in analysis.linears}
    blocked = {b.node: b.fqn for b in analysis.blocked}
    hidden = analysis.hidden_size
    reasons = {}
    for lin in analysis.linears:
        if lin.fqn in used or lin.fqn in reasons:
            continue
        if lin.in_features != hidden:
            reasons[lin.fqn] = (f"inner layer (in_features={lin.in_features}, out_features={lin.out_features}, "
                                f"hidden size {hidden}): neither a reader nor a writer")
            continue
        reached = _reach(analysis.view, lin.node, linear_nodes, writers | adds | set(blocked))
        if reached & set(blocked) and not reached & writers:
            names = sorted({blocked[n] for n in reached & set(blocked)})
            reasons[lin.fqn] = (f"reads the input of a residual branch whose writer ({', '.join(names)}) is left "
                                "dense (its output reaches the residual add through an op that does not keep "
                                "zeros); left dense")
        elif reached & writers:
            reasons[lin.fqn] = ("reads a stream other than its branch's input (e.g. cross-attention k/v "
                                "reading the encoder output); left dense")
        elif reached & adds:
            reasons[lin.fqn] = ("reads the branch input but only gates or routes the branch's output (e.g. an "
                                "MoE shared-expert gate or router); it is not part of a reader/writer pair; left dense")
        else:
            reasons[lin.fqn] = ("reads the residual stream but feeds no residual branch "
                                "(output head, pooler, classifier or a router); never rewritten")
    return reasons


def _reach(view, start: fx.Node, linear_nodes: set, targets: set, limit: int = 2000) -> set:
    """The nodes of `targets` reached from `start` without passing through another linear layer."""
    users = view.users if view is not None else (lambda n: list(n.users))
    seen, todo, hit = {start}, users(start), set()
    while todo and len(seen) < limit:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in targets:
            hit.add(n)
            continue
        if n not in linear_nodes:
            todo.extend(users(n))
    return hit


def product_reasons(analysis: GraphAnalysis, table: LayerTable) -> dict[str, str]:
    """Why each weight product that is not a linear layer's own call (LinearRef.layer False) stays dense."""
    out = {}
    for lin in analysis.linears:
        if lin.layer or lin.fqn in out:
            continue
        if lin.fqn in table.linears:
            out[lin.fqn] = (f"its weight is multiplied outside the layer's own forward (in {lin.where}: x @ W, "
                            "einsum or F.linear on the weight or a slice of it), so a MoHD layer in its place would "
                            "never be called; left dense")
        else:
            owner = table.classes.get(lin.fqn, "the model")
            attr = lin.where.rpartition(".")[2]
            out[lin.fqn] = (f"{owner} multiplies activations by its parameter {attr!r} but is not an nn.Linear "
                            "(an MoE router, a tied embedding head, or weights kept as bare nn.Parameters); "
                            "MoHD swaps nn.Linear layers only; left dense")
    return out
