"""Graph passes of mohdify, in pipeline order:

1. capture  (capture.py):   model + example inputs -> FX graphs (the FRONTENDS list: torch.export,
                            dynamo, per block); inputs.py checks and runs the inputs;
2. analyse  (analyze.py):   FX graph -> residual branches, their readers and writer (networkx), with
                            the linear maps resolve.py recognises and the op tables of targets.py;
                            sums.py reads residual sums, unwritten.py reports terms from no writer;
3. select   (select.py):    the one rule choosing the branches to rewrite, and why others stay dense;
4. plan     (make_plan.py): analyses of all graphs -> one Plan keyed by module names;
5. apply    (apply.py):     Plan -> the model rewritten in place, reversibly;
6. rewrite  (rewrite.py):   for the torch.compile backend, the same analysis and selection on a
                            dynamo graph of a dense model, rewritten to magnitude-routed MoHD ops;
7. fuse     (fuse.py):      for the backend, a mohdified model's graph with one routing, one
                            reader launch and one writer + residual add per branch.
Helpers: layers.py (the LayerTable of a model or a dynamo graph), graphview.py (the networkx view
and op predicates), graph_names.py (node values and module names), captured.py (capture types).
"""

from .analyze import BranchMatch, GraphAnalysis, LinearRef, analyze_graph
from .apply import apply_plan, is_mohdified, mohd_branches, remove_mohd
from .capture import Capture, CapturedGraph, capture
from .inputs import normalize_inputs
from .layers import is_linear_layer
from .make_plan import find_plan

__all__ = [
    "BranchMatch", "GraphAnalysis", "LinearRef", "analyze_graph", "apply_plan", "is_mohdified", "mohd_branches",
    "remove_mohd", "Capture", "CapturedGraph", "capture", "normalize_inputs", "find_plan", "is_linear_layer",
]
