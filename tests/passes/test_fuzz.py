"""Fuzz: random Transformer-shaped models (tests/fuzz_models.py) through every capture front-end.

Each example checks, on a model whose readers and writers are known by construction: the exact
branches (holder, readers, writer), no false branch, the distractors left dense with a reason,
dense equivalence at delta = 1, finite outputs at delta < 1, and demohdify giving back the original
weights and outputs bit for bit.

Budget: FUZZ_EXAMPLES examples (default 50: under a minute on 2 cores); run many more with
`MOHDIFY_FUZZ_EXAMPLES=500 python -m pytest -q tests/passes/test_fuzz.py`.
"""

from __future__ import annotations

import copy
import importlib
import os
from contextlib import contextmanager

import pytest
import torch
from conftest import assert_close
from fuzz_models import LayerSpec, Spec, build, expected
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import mohdify
from mohdify.passes.make_plan import OUTSIDE_BLOCKS

capture_mod = importlib.import_module("mohdify.passes.capture")
FUZZ_EXAMPLES = int(os.environ.get("MOHDIFY_FUZZ_EXAMPLES", "50"))
HEAD = "reads the residual stream but feeds no residual branch"
GATE = "reads the branch input but only gates or routes the branch's output"
FRONTENDS = {"export": "torch.export", "dynamo": "dynamo", "blocks": "torch.export per block",
             "real": "real-value trace"}
INNER = "inner layer"


@st.composite
def layer_specs(draw) -> LayerSpec:
    residual = draw(st.sampled_from(["sequential", "parallel1", "parallel2"]))
    return LayerSpec(
        attn=draw(st.sampled_from(["separate", "fused", "mqa"])),
        mlp=draw(st.sampled_from(["plain", "gated", "fused", "sequential", "moe", "moe_loop"])),
        residual=residual,
        order=tuple(draw(st.permutations(["x", "a", "m"]))),
        add=draw(st.sampled_from(["+", "torch.add", "method", "inplace"])),
        scale=draw(st.sampled_from([1.0, 1.0, 0.5, 2.0])),
        cast=draw(st.booleans()),
        layer_scale=draw(st.booleans()),
        gate=draw(st.booleans()),
        xwt=draw(st.booleans()),
        data_if=draw(st.sampled_from([False, False, True])))


@st.composite
def specs(draw) -> Spec:
    d = draw(st.sampled_from([16, 24, 32]))
    norm = draw(st.sampled_from(["layer", "rms_f", "rms_up", "none"]))
    placements = ["pre", "post"] + (["sandwich"] if norm.startswith("rms") else [])
    n = 2   # a ModuleList of two blocks: the per-block front-end needs repeated blocks
    first = draw(layer_specs())
    same = draw(st.booleans())   # repeated blocks of one structure (a ModuleList of one class)
    layers = tuple([first] * n if same else [first] + [draw(layer_specs()) for _ in range(n - 1)])
    return Spec(d=d, heads=draw(st.sampled_from([2, 4])), norm=norm, placement=draw(st.sampled_from(placements)),
                layers=layers, names=(draw(st.sampled_from(["layers", "h", "blocks"])),
                                      draw(st.sampled_from(["attn", "self_attention", "mixer"])),
                                      draw(st.sampled_from(["mlp", "ffn", "feed_forward"]))),
                pooler=draw(st.booleans()), probe=draw(st.booleans()), tied=draw(st.booleans()),
                seed=draw(st.integers(0, 2**16)))


@contextmanager
def frontend(name: str):
    """Make capture use one front-end: "export", "dynamo" (whole-model export fails), "blocks"
    (whole-model export and dynamo fail, so the blocks are exported one by one) or "real" (all three
    fail: the ops of an eager run are recorded, passes/capture_real.py)."""
    real_export, real_dynamo = capture_mod._export, capture_mod._dynamo

    def block_export_only(model, args, kwargs, prefix=""):
        if not prefix or name == "real":
            raise RuntimeError("whole-model export disabled by the fuzz test")
        return real_export(model, args, kwargs, prefix)

    def no_dynamo(*args, **kwargs):
        raise RuntimeError("dynamo disabled by the fuzz test")
    if name != "export":
        capture_mod._export = block_export_only
    if name in ("blocks", "real"):
        capture_mod._dynamo = no_dynamo
    try:
        yield
    finally:
        capture_mod._export, capture_mod._dynamo = real_export, real_dynamo


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def check_model(spec: Spec, fe: str, groups: int, log=note) -> None:
    model, inputs = build(spec)
    want = expected(spec)
    ref = copy.deepcopy(model)
    before = _state(model)
    with torch.no_grad():
        dense_out = ref(*inputs)
    config = mohdify.MoHDConfig.dense(num_groups=groups, num_shared=1)
    with frontend(fe):
        mohdify.mohdify(model, config, example_inputs=inputs)
    plan = model.mohd_plan
    log(str(plan))
    # a data-dependent `if` in a block: export refuses it, dynamo skips the block's frame, per-block
    # export refuses it too; only the real-value trace sees the block's branches
    want_fe = FRONTENDS["real" if any(ls.data_if for ls in spec.layers) else fe]
    if any(ls.mlp == "moe_loop" for ls in spec.layers) and fe != "real":   # its skip: export refuses the model
        assert plan.frontend in {FRONTENDS[k] for k in ("dynamo", "blocks", "real")}, plan.capture_failures
        want_fe = plan.frontend
    assert plan.frontend == want_fe, plan.capture_failures
    got = {b.name: (b.readers, b.writer) for b in plan.branches}
    assert got == want.branches, f"found {got}\nwant  {want.branches}\nskipped {plan.skipped}"
    skipped = dict(plan.skipped)
    for layer in want.dense:
        assert layer in skipped, f"{layer} has no reason in plan.skipped: {plan.skipped}"
        if layer.endswith((".gate", ".router")):
            reason = GATE
        elif ".experts." in layer:   # Mixtral-style loop: w1 reads a subset of tokens, w2 is inner; skipped experts
            reason = (INNER if layer.endswith(".w2") else OUTSIDE_BLOCKS if want_fe.endswith("block") else HEAD,
                      "not called in the forward pass")
        elif layer.count(".") == 2:   # an MoE block: its experts are no linear writer
            reason = ("residual branch (MoE) whose output does not come from a linear writer",
                      "residual branch (MoELoop) whose output does not come from a linear writer",
                      "MoE multiplies activations by its parameter 'w_")
        else:
            reason = OUTSIDE_BLOCKS if want_fe.endswith("block") else HEAD
        assert skipped[layer].startswith(reason), f"{layer}: {skipped[layer]}"
    with torch.no_grad():
        out = model(*inputs)
    assert_close(out, dense_out, f"fuzz model ({fe}) mohdified at delta=1 vs dense")
    mohdify.demohdify(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(model(*inputs), dense_out), "demohdify: outputs differ from the original model"
    sparse = mohdify.MoHDConfig(num_groups=groups, num_shared=1, top_k=1, router="magnitude", scaling="norm")
    with frontend(fe):
        mohdify.mohdify(model, sparse, example_inputs=inputs)
    with torch.no_grad():
        out = model(*inputs)
    assert torch.isfinite(out).all(), f"non-finite outputs at delta {sparse.density}"
    assert {b.name: (b.readers, b.writer) for b in model.mohd_plan.branches} == want.branches
    mohdify.demohdify(model)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, print_blob=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec=specs(), fe=st.sampled_from(list(FRONTENDS)), groups=st.sampled_from([2, 4, 8]))
def test_fuzz_transformer_shaped_models(spec, fe, groups):
    note(f"spec={spec}, frontend={fe}, groups={groups}")
    check_model(spec, fe, groups)


def test_dynamo_graphs_that_split_every_branch_from_its_add_fall_through():
    """Found by the fuzz test at 200 examples: dynamo breaks the graph inside each block (a Mixtral-style
    expert loop; an in-place add), so every branch and its residual add land in different graphs and
    dynamo's graphs show no residual branch. The later front-ends capture it instead, with the reason."""
    loop = LayerSpec(attn="separate", mlp="moe_loop", residual="parallel1", order=("x", "a", "m"), add="+",
                     scale=2.0, cast=False, layer_scale=False, gate=False, xwt=True, data_if=False)
    seq = LayerSpec(attn="separate", mlp="sequential", residual="parallel1", order=("a", "m", "x"), add="inplace",
                    scale=2.0, cast=False, layer_scale=False, gate=True, xwt=True, data_if=False)
    spec = Spec(d=16, heads=2, norm="none", placement="post", layers=(loop, seq), names=("blocks", "mixer", "ffn"),
                pooler=False, probe=True, tied=True, seed=4822)
    check_model(spec, "dynamo", 8, log=print)
    model, inputs = build(spec)
    with frontend("dynamo"):
        plan = mohdify.explain(model, inputs, mohdify.MoHDConfig.dense(num_groups=8, num_shared=1))
    assert plan.frontend == FRONTENDS["real"]
    assert ("dynamo", "its graphs show no residual add beside the branch that feeds it (graph breaks split "
            "the blocks)") in plan.capture_failures, plan.capture_failures
    assert sorted(b.name for b in plan.branches) == ["blocks.0.mixer", "blocks.1", "blocks.1.mixer"]


def test_split_dynamo_graphs_with_no_later_front_end_say_why_each_failed(monkeypatch):
    """The model above, with every front-end after dynamo failing too: the error names dynamo's reason
    and each later front-end's, instead of dropping them."""
    loop = LayerSpec(attn="separate", mlp="moe_loop", residual="parallel1", order=("x", "a", "m"), add="+",
                     scale=2.0, cast=False, layer_scale=False, gate=False, xwt=True, data_if=False)
    spec = Spec(d=16, heads=2, norm="none", placement="post", layers=(loop,), names=("blocks", "mixer", "ffn"),
                pooler=False, probe=True, tied=True, seed=4822)
    model, inputs = build(spec)
    later = [fe for fe in capture_mod.FRONTENDS if capture_mod.FRONTENDS.index(fe) > 1]

    def failing(name):
        def run(*args):
            raise RuntimeError(f"{name} disabled by the test")
        return run
    monkeypatch.setattr(capture_mod, "FRONTENDS", capture_mod.FRONTENDS[:2] + [
        capture_mod.FrontEnd(fe.name, failing(fe.name)) for fe in later])
    with frontend("dynamo"), pytest.raises(mohdify.UnsupportedModelError) as err:
        mohdify.explain(model, inputs, mohdify.MoHDConfig.dense(num_groups=8, num_shared=1))
    text = str(err.value)
    assert "The capture front-ends after dynamo were tried too" in text, text
    for fe in later:
        assert f"{fe.name}: RuntimeError: {fe.name} disabled by the test" in text, text
