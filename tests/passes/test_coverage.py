"""Issue 7: every residual branch of a Transformer-shaped model is found, or a true reason is given.

Each test is one case of the issue, on the smallest model that showed it (tests/coverage_models.py);
each failed before the fix (on 4708b48: 40 of 44), except the controls that already worked there
(`a + m + x`, `+=`). Checks go through the public API: plan.branches (exact readers and
writer), plan.skipped (exact reasons), dense equivalence at delta = 1, demohdify.
"""

from __future__ import annotations

import copy
import importlib
import logging
import warnings

import pytest
import torch
from conftest import assert_close
from coverage_models import (
    SUMS,
    AddForms,
    BreakBlock,
    BreakNet,
    CastStream,
    DeepNorm,
    IAdd,
    LoopBreakBlock,
    Net,
    Parallel,
    RMSBlock,
    Twice,
    WeightForms,
    branches_of,
)
from zoo import ZOO
from zoo_extra import EXTRA

import mohdify

capture_mod = importlib.import_module("mohdify.passes.capture")
DENSE = mohdify.MoHDConfig.dense(num_groups=4, num_shared=1)
HEAD = "reads the residual stream but feeds no residual branch (output head, pooler, classifier or a router); " \
       "never rewritten"


@pytest.fixture(params=["export", "dynamo"])
def frontend(request, monkeypatch):
    """Capture with torch.export, or with dynamo (whole-model export made to fail)."""
    if request.param == "dynamo":
        def no_export(model, args, kwargs, prefix=""):
            if not prefix:
                raise RuntimeError("export disabled by the test")
            return real(model, args, kwargs, prefix)
        real = capture_mod._export
        monkeypatch.setattr(capture_mod, "_export", no_export)
    return {"export": "torch.export", "dynamo": "dynamo"}[request.param]


def _x(seed=0):
    return (torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(seed)),)


def _plan_and_check(model, frontend_name, want, skipped=None):
    """mohdify at delta = 1: the plan's branches are `want`, the outputs unchanged, demohdify exact."""
    ref, x = copy.deepcopy(model), _x()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mohdify.mohdify(model, DENSE, example_inputs=x)
    plan = model.mohd_plan
    assert plan.frontend == frontend_name, plan.capture_failures
    assert {b.name: (b.readers, b.writer) for b in plan.branches} == want, plan
    if skipped is not None:
        assert dict(plan.skipped) == skipped, plan.skipped
    with torch.no_grad():
        assert_close(model(*x), ref(*x), f"{type(model.h[0]).__name__} mohdified at delta=1")
    mohdify.demohdify(model)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    return plan


@pytest.mark.parametrize("how", list(SUMS))
def test_parallel_branches_summed_in_any_order(how, frontend):
    """Case 1: x + attn(n(x)) + mlp(n(x)) in every order and spelling gives both branches."""
    torch.manual_seed(0)
    _plan_and_check(Net(lambda: Parallel(how)).eval(), frontend, branches_of("h.{i}"), {"head": HEAD})


def test_parallel_block_with_two_rmsnorms(frontend):
    torch.manual_seed(0)
    _plan_and_check(Net(lambda: Parallel("x + a + m", norms="two")).eval(), frontend, branches_of("h.{i}"))


def test_cohere_parallel_block_finds_the_mlp():
    model, inputs = EXTRA["cohere"].build()
    plan = mohdify.explain(model, inputs, DENSE)
    mlp = plan.branch("model.layers.1.mlp")
    assert mlp is not None and mlp.readers == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    assert mlp.input == "f(h) via model.layers.1.input_layernorm (CohereLayerNorm)"
    assert dict(plan.skipped) == {"lm_head": HEAD}


@pytest.mark.parametrize("model_cls", [DeepNorm, AddForms, IAdd, CastStream],
                         ids=["deepnorm", "add-forms", "iadd", "cast-stream"])
def test_stream_scaled_cast_or_added_in_place(model_cls, frontend):
    """Case 8: DeepNorm's alpha * h, residual.to(float32), h.add(f) / h.add_(f, alpha) / torch.add."""
    torch.manual_seed(0)
    want = branches_of("h.{i}", mlp=model_cls is not CastStream)
    if model_cls is CastStream:
        want = {f"h.{i}.mlp": ([f"h.{i}.mlp.up"], f"h.{i}.mlp.down") for i in range(2)}
    _plan_and_check(Net(model_cls).eval(), frontend, want, {"head": HEAD})


@pytest.mark.parametrize("kind", ["f", "up"])
def test_rmsnorm_forms_and_sequential_mlp(kind, frontend):
    """Case 8 (F.rms_norm, fp32-upcast RMSNorm) and case 2: an nn.Sequential MLP is named after the
    block that holds it (no container calls the branch), and the model runs after mohdify."""
    torch.manual_seed(0)
    want = {}
    for i in range(2):
        want[f"h.{i}.attn"] = ([f"h.{i}.attn.{r}" for r in "qkv"], f"h.{i}.attn.o")
        want[f"h.{i}"] = ([f"h.{i}.mlp.0"], f"h.{i}.mlp.2")
    model = Net(lambda: RMSBlock(kind)).eval()
    plan = _plan_and_check(model, frontend, want, {"head": HEAD})
    table = str(plan)
    assert "mlp.0" in table and "mlp.2" in table


def test_sequential_mlp_runs_after_mohdify():
    torch.manual_seed(0)
    model = Net(lambda: RMSBlock("up")).eval()
    mohdify.mohdify(model, mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1, router="magnitude"),
                    example_inputs=_x())
    in_containers = [name for c_name, c in model.named_modules() if isinstance(c, torch.nn.Sequential)
                     for name, m in c.named_children() if any(m is b for b in mohdify.branches(model))]
    assert not in_containers and len(model.h[0].mlp) == 3
    with torch.no_grad():
        assert torch.isfinite(model(*_x(1))).all()


def test_block_applied_twice_with_x_at_w_t_has_no_false_branch(frontend):
    """Case 8: linears written x @ W.T + b in a block applied twice: the bias of q is not the stream."""
    torch.manual_seed(0)
    _plan_and_check(Net(Twice).eval(), frontend, branches_of("h.{i}", mlp=False), {"head": HEAD})


def test_weight_products_outside_a_layer_get_true_reasons():
    """F.linear on a slice, W @ x / einsum with a Linear's weight, a bare Parameter: found, left dense,
    each with the reason that is true for it."""
    torch.manual_seed(0)
    model = Net(WeightForms).eval()
    plan = mohdify.explain(model, _x(), DENSE)
    assert plan.branches == []
    skipped = dict(plan.skipped)
    outside = ("its weight is multiplied outside the layer's own forward (in h.0: x @ W, einsum or F.linear on the "
               "weight or a slice of it), so a MoHD layer in its place would never be called; left dense")
    assert skipped["h.0.qkv"] == outside and skipped["h.0.o"] == outside
    assert skipped["h.0"].startswith("WeightForms multiplies activations by its parameter 'w_in' but is not an "
                                     "nn.Linear")
    assert skipped["h.0.fc2"].startswith("every reader of its branch (h.0.w_in) is a weight product")
    assert skipped["head"] == HEAD
    with pytest.raises(mohdify.UnsupportedModelError, match="h.0.qkv: its weight is multiplied outside"):
        mohdify.mohdify(model, DENSE, example_inputs=_x())


def test_mamba_reasons_are_true():
    """Case 3: with residual_in_fp32 the mixer is a branch; dt_proj's weight is used in a matmul."""
    model, inputs = EXTRA["mamba"].build()
    plan = mohdify.explain(model, inputs, DENSE)
    skipped = dict(plan.skipped)
    for i in range(2):
        assert skipped[f"backbone.layers.{i}.mixer.dt_proj"].startswith(
            f"its weight is multiplied outside the layer's own forward (in backbone.layers.{i}.mixer")
        assert skipped[f"backbone.layers.{i}.mixer.x_proj"].startswith("inner layer (in_features=128")
    assert plan.branch("backbone.layers.0.mixer").input == "f(h) via backbone.layers.0.norm (MambaRMSNorm)"


def test_dynamo_skipped_frame_is_named_and_traced_with_real_values():
    """Case 8: the residual adds are in a frame dynamo skips (graph break in a loop): the plan says
    which, and the real-value trace (passes/capture_real.py) finds the branches there."""
    torch.manual_seed(0)
    plan = mohdify.explain(BreakNet(lambda: BreakBlock(True)).eval(), _x(), DENSE)
    assert plan.frontend == "real-value trace"
    assert {b.name: (b.readers, b.writer) for b in plan.branches} == branches_of("h.{i}")
    why = dict(plan.capture_failures)["dynamo"]
    assert why.startswith("skipped the frames of ['(model)', 'h.0', 'h.1']") and "Data-dependent branching" in why, why
    assert why.endswith("traced with real values instead")


def test_capture_does_not_depend_on_what_was_captured_before():
    """Case 8: dynamo skipped BreakBlock.forward for the first model; the second (same class, no
    break) must still be captured whole."""
    torch.manual_seed(0)
    first = mohdify.explain(BreakNet(lambda: BreakBlock(False)).eval(), _x(), DENSE)
    assert mohdify.explain(BreakNet(lambda: BreakBlock(True)).eval(), _x(), DENSE).frontend == "real-value trace"
    plan = mohdify.explain(BreakNet(lambda: BreakBlock(False)).eval(), _x(), DENSE)
    assert plan.frontend == first.frontend and plan.capture_failures == first.capture_failures
    assert {b.name: (b.readers, b.writer) for b in plan.branches} == branches_of("h.{i}")


def test_untrained_learned_router_warns_once():
    """Case 5: explain() and mohdify() say what an untrained learned router does, once per process."""
    from mohdify.guards import reset_warn_once
    reset_warn_once()
    model, inputs = ZOO["nanogpt"].build()
    sparse = mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1)
    with pytest.warns(UserWarning, match=r"^mohdify\.explain\(\): router='learned' starts untrained") as got:
        plan = mohdify.explain(model, inputs, sparse)
    assert len([w for w in got if "starts untrained" in str(w.message)]) == 1
    assert "every token gets the same 1 of the 3 routed groups" in str(got[0].message)
    assert "router='magnitude'" in str(got[0].message) and "\nnote: router='learned' starts untrained" in str(plan)
    reset_warn_once()
    with pytest.warns(UserWarning) as got:
        mohdify.mohdify(model, sparse, example_inputs=inputs)
    assert [str(w.message)[:19] for w in got if "starts untrained" in str(w.message)] == ["mohdify.mohdify(): "]
    mohdify.demohdify(model)
    for quiet in (DENSE, mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1, router="magnitude")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mohdify.explain(model, inputs, quiet)


def test_already_mohdified_error_names_the_function_called():
    """Case 7: mohdify() on a mohdified model does not talk about explain()."""
    model, inputs = ZOO["nanogpt"].build()
    mohdify.mohdify(model, DENSE, example_inputs=inputs)
    for fn, call in (("mohdify", lambda: mohdify.mohdify(model, DENSE, example_inputs=inputs)),
                     ("explain", lambda: mohdify.explain(model, inputs, DENSE))):
        with pytest.raises(mohdify.UnsupportedModelError) as err:
            call()
        msg = str(err.value)
        assert msg.startswith(f"{fn}() got a model that is already mohdified (NanoGPT has 4 MoHD branches)"), msg
        assert msg.count("()") == 2 and "demohdify(model)" in msg


def test_backend_without_options_warns_once(fresh_dynamo, caplog):
    """Case 4: torch.compile(dense, backend="mohd") with no MoHD options changes outputs: say so, once."""
    from mohdify import backend
    backend._warn_defaults.cache_clear()
    model, inputs = ZOO["nanogpt"].build()
    with caplog.at_level(logging.WARNING, logger="mohdify"), torch.no_grad():
        compiled = torch.compile(model, backend="mohd", options={"compiler": "eager"})
        compiled(*inputs)
        compiled(*inputs)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "got no options" in r.getMessage()]
    assert len(warned) == 1, [r.getMessage() for r in caplog.records]
    msg = warned[0].getMessage()
    for words in ("magnitude routing", "num_groups=16, num_shared=4, top_k=4", "density 0.500", "outputs change",
                  "options={'num_groups'", "backend='inductor') to leave MoHD out"):
        assert words in msg, msg
    caplog.clear()
    torch._dynamo.reset()
    with caplog.at_level(logging.WARNING, logger="mohdify"), torch.no_grad():
        torch.compile(copy.deepcopy(model), backend="mohd",
                      options={"num_groups": 4, "num_shared": 1, "top_k": 3, "compiler": "eager"})(*inputs)
    assert not [r for r in caplog.records if "got no options" in r.getMessage()]


def test_readers_of_a_refused_writer_say_so():
    """A reason is true for its layer: up2 feeds a branch (its writer is refused), not 'no branch'."""
    from zoo_extra import LayerNormOut
    torch.manual_seed(0)
    skipped = dict(mohdify.explain(LayerNormOut().eval(), (torch.randn(2, 5, 32),), DENSE).skipped)
    assert sorted(skipped) == ["down2", "out", "up2"], skipped
    assert skipped["up2"] == ("reads the input of a residual branch whose writer (down2) is left dense (its output "
                              "reaches the residual add through an op that does not keep zeros); left dense")
    assert skipped["out"] == HEAD


def test_frames_dynamo_skips_fall_back_to_blocks_that_see_them():
    """Dynamo skips each block's frame (graph break in its loop); exported one by one, the blocks show
    their residual adds, so capture uses them and says why."""
    torch.manual_seed(0)
    model = BreakNet(LoopBreakBlock).eval()
    ref = copy.deepcopy(model)
    mohdify.mohdify(model, DENSE, example_inputs=_x())
    plan = model.mohd_plan
    assert plan.frontend == "torch.export per block"
    assert [f for f, _ in plan.capture_failures] == ["torch.export (non-strict)", "dynamo"]
    assert plan.capture_failures[1][1].startswith("skipped the frame of h.0, h.1 ("), plan.capture_failures
    assert plan.capture_failures[1][1].endswith("; the blocks are exported one by one")
    assert {b.name: (b.readers, b.writer) for b in plan.branches} == branches_of("h.{i}")
    with torch.no_grad():
        assert_close(model(*_x(1)), ref(*_x(1)), "per-block fallback after dynamo skipped the blocks, delta=1")


def test_errors_name_the_function_called():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    for fn, call in (("explain", lambda: mohdify.explain(model, (torch.randn(2, 16),), DENSE)),
                     ("mohdify", lambda: mohdify.mohdify(model, DENSE, example_inputs=(torch.randn(2, 16),)))):
        with pytest.raises(mohdify.UnsupportedModelError, match=rf"^{fn}\(\): Sequential has no residual branch"):
            call()
    with pytest.raises(mohdify.InputError, match=r"^mohdify\(\): Sequential failed on example_inputs"):
        mohdify.mohdify(model, DENSE, example_inputs=(torch.randn(2, 5),))


@pytest.mark.parametrize("name", ["cohere", "deepseek_v3", "mamba", "whisper_encoder"])
def test_new_architectures_give_one_plan_with_every_frontend(name, monkeypatch):
    """The same branches and reasons with torch.export, dynamo and export block by block (layers
    outside the blocks are then in no graph, and say so)."""
    from mohdify.passes.find import OUTSIDE_BLOCKS
    model, inputs = EXTRA[name].build()
    want = mohdify.explain(model, inputs, DENSE)
    real_export = capture_mod._export

    def block_export_only(model, args, kwargs, prefix=""):
        if not prefix:
            raise RuntimeError("whole-model export disabled by the test")
        return real_export(model, args, kwargs, prefix)
    monkeypatch.setattr(capture_mod, "_export", block_export_only)
    plans = {"dynamo": mohdify.explain(model, inputs, DENSE)}
    monkeypatch.setattr(capture_mod, "_dynamo", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no dynamo")))
    plans["torch.export per block"] = mohdify.explain(model, inputs, DENSE)
    blocks = {b.name.rsplit(".", 1)[0] for b in want.branches}
    for frontend, plan in plans.items():
        assert plan.frontend == frontend
        assert [(b.name, b.readers, b.writer) for b in plan.branches] == \
            [(b.name, b.readers, b.writer) for b in want.branches], frontend
        expected = dict(want.skipped)
        if frontend == "torch.export per block":
            expected = {k: (v if any(k.startswith(p + ".") for p in blocks) else OUTSIDE_BLOCKS)
                        for k, v in expected.items()}
        assert dict(plan.skipped) == expected, frontend
