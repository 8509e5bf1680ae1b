"""Residual-sum terms that depend on the stream but come from no linear writer (e.g. MoE experts,
which hold stacked expert weights and see only the tokens routed to them): the analysis reports
each as a skipped branch, named after the outermost module that computed it, and marks its sum.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from torch import fx

from .graph_names import join_name, module_path
from .graphview import GraphView, canonical, cls_name, innermost_module, is_add, is_shape_only, last_dim, numel
from .sums import stream_chain, stream_parent, stream_source, sum_root, sum_terms

if TYPE_CHECKING:
    from .analyze import GraphAnalysis

__all__ = ["report_unwritten_terms"]


def _split(update: fx.Node, view: GraphView) -> list[fx.Node]:
    """Split a term of a residual sum into its summands, looking through adds and shape-only ops."""
    out, todo, seen = [], [update], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if is_add(n):
            todo.extend(view.inputs(n))
        elif is_shape_only(n):
            todo.extend(view.inputs(n)[:1])
        elif (scaled := stream_parent(view, n)) is not None:   # a LayerScale, a router weight
            todo.append(scaled)
        else:
            out.append(n)
    return out


def report_unwritten_terms(view: GraphView, analysis: GraphAnalysis, owns: dict, prefix: str) -> None:
    """Report residual-sum terms that depend on h but come from no writer (e.g. MoE experts)."""
    known = {b.stream for b in analysis.branches} | {b.add for b in analysis.branches}
    known |= {canonical(n) for n in known}
    roots = list(dict.fromkeys(b.add for b in analysis.branches))
    roots += [n for n in view.order if is_add(n) and n not in roots and last_dim(n) == analysis.hidden_size
              and sum_root(view, n) is n]
    for root in roots:
        terms = sum_terms(view, root)
        size = numel(root)

        def on_stream(s: fx.Node, size: Optional[int] = size) -> bool:
            return (s in known or canonical(s) in known) and numel(s) == size
        streams = {t: h for t in terms if (h := stream_source(view, t, on_stream)) is not None}
        if not streams and len(terms) > 1:   # a stream no branch has read yet (post-norm, before an MoE)
            for t in terms:
                others = [o for o in terms if o is not t]

                def feeds_all(s: fx.Node, size: Optional[int] = size, others=others) -> bool:
                    return numel(s) == size and all(s in view.ancestors(o) for o in others)
                if (h := stream_source(view, t, feeds_all)) is not None:
                    streams = {t: h}
                    break
        if not streams or len(streams) == len(terms):
            continue
        h = next(iter(streams.values()))
        sources = stream_chain(view, h)
        writers = owns.get(root, [])
        covered = set().union(*(own for _, own in writers)) if writers else set()
        for term in (t for t in terms if t not in streams):
            for part in _split(term, view):
                if part in covered or not sources & view.ancestors(part) or \
                        any(b.node in view.ancestors(part) for b in analysis.blocked):   # reported with its writer
                    continue
                owner, cls = _term_owner(part, h, [w.fqn for w, _ in writers], prefix)
                analysis.dense_sums.append(root)
                analysis.skipped.append((owner or part.name, (
                    f"residual branch ({cls or 'unknown module'}) whose output does not come from a linear writer "
                    "(e.g. MoE experts, which hold stacked expert weights and see only the tokens routed to them); "
                    "left dense")))


def _term_owner(term: fx.Node, h: fx.Node, writers: list[str], prefix: str) -> tuple[str, str]:
    """The outermost module that computed `term` from h and holds no writer of the same add."""
    stack = term.meta.get("nn_module_stack") or {}
    hstack = h.meta.get("nn_module_stack") or {}
    for key, (path, cls) in stack.items():
        if key in hstack:
            continue
        name = join_name(prefix, module_path(path))
        if not any(w == name or w.startswith(name + ".") for w in writers):
            return name, cls_name(cls)
    return innermost_module(term, prefix)
