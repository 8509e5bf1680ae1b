"""The real-value capture front-end (passes/capture_real.py): it finds the branches the other
front-ends miss behind data-dependent Python control flow, says so in the plan, and on ordinary
models finds what torch.export finds."""

from __future__ import annotations

import importlib

import pytest
import torch
from torch import nn
from zoo import ZOO

import mohdify

capture_mod = importlib.import_module("mohdify.passes.capture")
DENSE = mohdify.MoHDConfig.dense(num_groups=4, num_shared=1)


class Blk(nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.norm, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, 64), nn.Linear(64, d)


class SkipsOnValue(nn.Module):
    """The residual adds live in a loop with a data-dependent `if` (as padding checks do)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Blk(), Blk()])
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        for b in self.blocks:
            if x.abs().amax() > 0:
                x = x + b.down(torch.relu(b.up(b.norm(x))))
        return self.head(x)


def test_branches_behind_a_data_dependent_if_are_found_and_the_plan_says_how():
    model = SkipsOnValue().eval()
    x = torch.randn(2, 3, 32)
    plan = mohdify.explain(model, (x,), DENSE)
    assert plan.frontend == "real-value trace"
    assert {b.name: (b.readers, b.writer) for b in plan.branches} == {
        f"blocks.{i}": ([f"blocks.{i}.up"], f"blocks.{i}.down") for i in range(2)}
    assert [b.input for b in plan.branches] == [f"f(h) via blocks.{i}.norm (LayerNorm)" for i in range(2)]
    failed = dict(plan.capture_failures)
    assert set(failed) == {"torch.export (non-strict)", "dynamo", "torch.export per block"}
    assert "captured with real-value trace" in str(plan)
    with torch.no_grad():
        before = model(x)
        mohdify.mohdify(model, DENSE, example_inputs=(x,))
        assert torch.allclose(model(x), before, atol=1e-6)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_real_value_trace_finds_what_export_finds(name, monkeypatch):
    model, inputs = ZOO[name].build()
    want = mohdify.explain(model, inputs, DENSE)

    def refuse(*args, **kwargs):
        raise RuntimeError("disabled by the test")
    monkeypatch.setattr(capture_mod, "_export", refuse)
    monkeypatch.setattr(capture_mod, "_dynamo", refuse)
    got = mohdify.explain(model, inputs, DENSE)
    assert got.frontend == "real-value trace" and want.frontend == "torch.export"
    assert [(b.name, b.readers, b.writer) for b in got.branches] == [(b.name, b.readers, b.writer)
                                                                    for b in want.branches]
    assert sorted(n for n, _ in got.skipped) == sorted(n for n, _ in want.skipped)
