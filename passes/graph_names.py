"""Names in captured graphs: a node's fake value and the qualified module names its metadata holds.

Export names modules "model.layers.0.mlp"; dynamo spells the same module in source paths such as
"L['self'].model.layers[0].mlp": `module_path` gives both the one qualified name `named_modules()` uses.
"""

from __future__ import annotations

import re

from torch import fx

__all__ = ["node_value", "module_path", "join_name"]


def node_value(node: fx.Node):
    """The fake/example value of a node (export: meta['val']; dynamo: meta['example_value'])."""
    return node.meta.get("val", node.meta.get("example_value"))


# The root module in a dynamo source path: L['self'] (forward compiled directly), L['mod'] /
# L['model'] (wrapped), L['args'][0] (HF 5.x decorators wrap forward as `wrapper(*args, **kwargs)`).
_DYNAMO_PREFIX = re.compile(r"^(L\['(self|mod|model|fn)'\]|L\['args'\]\[0\]|self(?=\.|$))\.?")


def module_path(path: str) -> str:
    """Normalize an nn_module_stack path from export or dynamo to a qualified module name.

    export: "model.layers.0.mlp"; dynamo: "L['self'].model.layers[0].mlp",
    "L['args'][0]._modules['model']._modules['layers']['0']" and similar forms.
    """
    path = _DYNAMO_PREFIX.sub("", path)
    path = re.sub(r"\._modules\['([^']*)'\]", r".\1", path)
    path = re.sub(r"^_modules\['([^']*)'\]", r"\1", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']*)'\]", r".\1", path)
    return path.strip(".")


def join_name(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name
