"""What a capture front-end returns: the captured graphs of a model and how they were captured.

Kept apart from capture.py so that a front-end in a module of its own imports these types without
importing the list of front-ends (see `capture.FRONTENDS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import fx

__all__ = ["CapturedGraph", "Capture"]


@dataclass
class CapturedGraph:
    """One captured graph. `prefix` is the qualified name of the captured submodule ("" = model)."""

    graph: fx.Graph
    frontend: str
    prefix: str = ""
    params: dict[str, str] = field(default_factory=dict)   # placeholder name -> parameter's qualified name


@dataclass
class Capture:
    graphs: list[CapturedGraph]
    frontend: str
    failures: list[tuple[str, str]] = field(default_factory=list)   # (front-end, why it failed)
    # (module name, class name, why) of forwards that ran but that no captured graph shows (dynamo
    # skipped the frame after a graph break it could not resume from, e.g. inside a loop)
    unseen: list[tuple[str, str, str]] = field(default_factory=list)
    called: list[str] = field(default_factory=list)   # modules whose forward ran (eagerly, once)
