"""The backend on a dense model rewrites the branches mohdify() rewrites, and computes the same logits.

One rule chooses the branches (passes/select.py) for mohdify(), explain() and the backend. Each
architecture of the zoo (tests/zoo.py, tests/zoo_families.py) is compiled dense with
backend="mohd" and options equal to a magnitude-router MoHDConfig, and compared with mohdify() of a
copy under that config: the same branches (names, readers, writer) and the same logits at delta 0.5.
Besides the zoo: nn.Linear subclasses whose forward is `x @ self.weight.T + self.bias` (dynamo
inlines them into weight products; export sees module calls), a model dynamo hands over in two graphs
(a graph break between blocks: each graph is rewritten), and the one case the backend truly cannot
do, a graph break inside a branch: it leaves that branch dense with a Python warning naming it.
The compiler is "eager" (the rewritten graph runs as is): what is checked is the rewrite.
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from conftest import assert_close
from residual_form_models import XWT
from strategies import main_output, run
from torch import nn
from torch._dynamo.utils import counters
from zoo import ZOO
from zoo_families import EXTRA

import mohdify

pytestmark = pytest.mark.usefixtures("fresh_dynamo")
OPTIONS = {"num_groups": 4, "num_shared": 1, "top_k": 1, "scaling": "norm"}   # delta 1/2; 4 divides 32, 48, 64
CONFIG = mohdify.MoHDConfig(router="magnitude", **OPTIONS)


def _backend(model, inputs, caplog):
    """(branches the backend logged, its logits, the mohd warnings) of the dense model compiled."""
    caplog.set_level(logging.INFO, logger="mohdify")
    caplog.clear()
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = main_output(run(torch.compile(model, backend="mohd", options={**OPTIONS, "compiler": "eager"}), inputs))
    branches = {r.args[2]: (r.args[0], list(r.args[1])) for r in caplog.records
                if r.name == "mohdify" and r.msg.startswith("mohd backend: branch")}
    return branches, out, [str(w.message) for w in caught if str(w.message).startswith("mohd backend:")]


def _mohdify(model, inputs):
    eager = mohdify.mohdify(copy.deepcopy(model), CONFIG, example_inputs=inputs)
    with torch.no_grad():
        return {b.writer: (b.name, b.readers) for b in eager.mohd_plan.branches}, main_output(run(eager, inputs))


def _agree(name, model, inputs, caplog, expected=None):
    """expected: {branch: (readers, writer)} as the zoo states it."""
    model.eval()
    want, logits = _mohdify(model, inputs)
    got, out, warned = _backend(model, inputs, caplog)
    if expected is not None:
        assert want == {w: (b, r) for b, (r, w) in expected.items()}, f"{name}: mohdify() found {want}"
    assert got == want, f"{name}: the backend rewrote {got}, mohdify() {want}"
    assert not warned, f"{name}: {warned}"
    assert counters["mohdify"]["branches_rewritten"] == len(want)
    assert_close(out, logits, f"{name}: backend (dense model, magnitude options) vs mohdify() logits")
    return out


@pytest.mark.parametrize("name", [*ZOO, *EXTRA])
def test_zoo_architecture(name, caplog):
    z = {**ZOO, **EXTRA}[name]
    model, inputs = z.build()
    _agree(name, model, inputs, caplog, z.branches)


D = 32


class XWTBlock(nn.Module):
    """Attention and MLP of XWT layers (nn.Linear whose forward is `x @ self.weight.T + self.bias`:
    dynamo inlines it into a matmul of a view of W)."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.q, self.k, self.v, self.o = XWT(D, D), XWT(D, D), XWT(D, D), XWT(D, D)
        self.up, self.down = XWT(D, 2 * D), XWT(2 * D, D)

    def forward(self, x):
        h = self.ln1(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2) / D ** 0.5, -1) @ self.v(h)
        x = x + self.o(a)
        return x + self.down(torch.relu(self.up(self.ln2(x))))


class Blocks(nn.Module):
    def __init__(self, block, brk=None):
        super().__init__()
        self.h = nn.ModuleList(block() for _ in range(2))
        self.head = nn.Linear(D, 5)
        self.brk = brk

    def forward(self, x):   # unrolled: a graph break inside a loop makes dynamo skip the whole frame
        x = self.h[0](x)
        if self.brk:
            torch._dynamo.graph_break()
        return self.head(self.h[1](x))


def _x():
    return (torch.randn(2, 5, D, generator=torch.Generator().manual_seed(0)),)


def test_linear_subclasses_whose_forward_is_a_weight_product(caplog):
    """The held-out case: mohdify() rewrote 4 branches of it and the backend 0, before one rule chose."""
    torch.manual_seed(0)
    model = Blocks(XWTBlock)
    want = {**{f"h.{i}.o": (f"h.{i}", [f"h.{i}.q", f"h.{i}.k", f"h.{i}.v"]) for i in range(2)},
            **{f"h.{i}.down": (f"h.{i}", [f"h.{i}.up"]) for i in range(2)}}
    assert {b.writer: (b.name, b.readers) for b in mohdify.explain(model, _x(), CONFIG).branches} == want
    _agree("XWT blocks", model, _x(), caplog)
    assert counters["mohdify"]["branches_rewritten"] == 4


class MLPBlock(nn.Module):
    def __init__(self, brk=False):
        super().__init__()
        self.ln, self.up, self.down, self.brk = nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D), brk

    def forward(self, x):
        u = torch.relu(self.up(self.ln(x)))
        if self.brk:
            torch._dynamo.graph_break()   # splits this branch: up in one graph, down in the next
        return x + self.down(u)


def test_graph_break_between_blocks_gives_two_graphs_each_rewritten(caplog):
    torch.manual_seed(0)
    model = Blocks(MLPBlock, brk=True)
    _agree("two graphs", model, _x(), caplog, {f"h.{i}": ([f"h.{i}.up"], f"h.{i}.down") for i in range(2)})
    assert counters["mohdify"]["graphs"] == 2


def test_branch_split_across_two_graphs_is_left_dense_with_a_warning(caplog):
    """The case the backend truly cannot do: dynamo ends a graph inside the branch (between its reader
    and its writer), and a backend sees one graph at a time. mohdify() rewrites it; the backend warns."""
    torch.manual_seed(0)
    model = Blocks(lambda: MLPBlock(brk=True)).eval()
    want, _ = _mohdify(model, _x())
    assert want == {f"h.{i}.down": (f"h.{i}", [f"h.{i}.up"]) for i in range(2)}
    got, out, warned = _backend(model, _x(), caplog)
    assert got == {}
    # dynamo resumes inside the block's frame, so the graph names the writer relative to the block, and
    # both blocks run that one graph: one warning for the writer `down`
    assert warned and all(w.startswith("mohd backend: down left dense: dynamo split its residual branch across "
                                       "two graphs at a graph break") for w in warned), warned
    with torch.no_grad():
        assert_close(out, model(*_x()), "split branches left dense: the dense output")
