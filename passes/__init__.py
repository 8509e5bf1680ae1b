"""Graph passes of mohdify, in pipeline order:

1. capture  (capture.py): model + example inputs -> FX graphs (torch.export, dynamo, per block);
2. analyse  (analyze.py): FX graph -> residual branches, their readers and writer (networkx);
3. plan     (find.py):    analyses of all graphs -> one Plan keyed by module names;
4. apply    (apply.py):   Plan -> the model rewritten in place, reversibly;
5. rewrite  (rewrite.py): for the torch.compile backend, the same analysis on a dynamo graph
                          of a dense model, rewritten to magnitude-routed MoHD ops;
6. fuse     (fuse.py):    for the backend, a mohdified model's graph with one routing, one
                          reader launch and one writer + residual add per branch.
"""

from .analyze import BranchMatch, GraphAnalysis, LinearRef, analyze_graph
from .apply import apply_plan, is_mohdified, mohd_branches, remove_mohd
from .capture import Capture, CapturedGraph, capture
from .find import find_plan
from .inputs import normalize_inputs
from .layers import is_linear_layer

__all__ = [
    "BranchMatch", "GraphAnalysis", "LinearRef", "analyze_graph", "apply_plan", "is_mohdified", "mohd_branches",
    "remove_mohd", "Capture", "CapturedGraph", "capture", "normalize_inputs", "find_plan", "is_linear_layer",
]
