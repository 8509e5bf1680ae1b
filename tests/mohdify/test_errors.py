"""Bad input: a clear error naming what was passed and what is required; the model untouched."""

import copy

import pytest
import torch
from torch import nn
from zoo import ZOO

import mohdify
from mohdify import ConfigError, InputError, MoHDConfig, UnsupportedModelError


def _snapshot(model):
    return type(model), [(n, type(m)) for n, m in model.named_modules()], \
        {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, snap):
    cls, modules, state = snap
    assert type(model) is cls
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k in state:
        assert torch.equal(now[k], state[k]), f"{k} changed"


@pytest.mark.parametrize("kwargs, words", [
    ({"num_groups": 0}, ["num_groups", "positive", "0"]),
    ({"num_groups": -4}, ["num_groups", "-4"]),
    ({"num_shared": -1}, ["num_shared", ">= 0", "-1"]),
    ({"top_k": 0}, ["top_k", "positive", "0"]),
    ({"num_groups": 8, "num_shared": 2, "top_k": 7}, ["top_k", "8 - 2 = 6", "7"]),
    ({"num_groups": 4, "num_shared": 4, "top_k": 1}, ["num_shared", "smaller than num_groups=4", "4"]),
    ({"router": "hash"}, ["router", "'learned'", "'magnitude'", "'hash'"]),
    ({"scaling": "sqrt"}, ["scaling", "'density'", "'sqrt'"]),
    ({"fusion": "monarch"}, ["fusion", "'mix'", "'monarch'"]),
    ({"num_groups": 8.0}, ["num_groups", "int", "8.0"]),
    ({"aux_loss_coef": -1.0}, ["aux_loss_coef", ">= 0", "-1.0"]),
])
def test_bad_config_is_rejected_with_what_was_passed(kwargs, words):
    with pytest.raises(ConfigError) as info:
        MoHDConfig(**kwargs)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"


def test_groups_not_dividing_hidden_size_leaves_model_untouched():
    model, inputs = ZOO["llama"].build()   # D = 64
    snap = _snapshot(model)
    with pytest.raises(ConfigError) as info:
        mohdify.mohdify(model, MoHDConfig(num_groups=6, num_shared=2, top_k=2), example_inputs=inputs)
    assert "num_groups=6" in str(info.value) and "hidden size 64" in str(info.value)
    _assert_untouched(model, snap)


def test_config_of_wrong_type():
    model, inputs = ZOO["nanogpt"].build()
    snap = _snapshot(model)
    with pytest.raises(ConfigError, match="mohdify.MoHDConfig, got dict"):
        mohdify.mohdify(model, {"num_groups": 4}, example_inputs=inputs)
    _assert_untouched(model, snap)


@pytest.mark.parametrize("model", [
    nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)),
    nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten()),
], ids=["mlp-without-skips", "cnn"])
def test_model_without_residual_branches(model):
    x = torch.randn(2, 16) if isinstance(model[0], nn.Linear) else torch.randn(1, 3, 8, 8)
    snap = _snapshot(model)
    with pytest.raises(UnsupportedModelError) as info:
        mohdify.mohdify(model, MoHDConfig(num_groups=4, num_shared=1, top_k=1), example_inputs=(x,))
    msg = str(info.value)
    assert "Sequential has no residual branch" in msg and "residual stream" in msg
    _assert_untouched(model, snap)


def test_already_mohdified_model_is_rejected():
    model, inputs = ZOO["nanogpt"].build()
    cfg = MoHDConfig(num_groups=4, num_shared=1, top_k=1)
    mohdify.mohdify(model, cfg, example_inputs=inputs)
    snap = _snapshot(model)
    with pytest.raises(UnsupportedModelError, match="already mohdified .*4 MoHD branches.*demohdify"):
        mohdify.mohdify(model, cfg, example_inputs=inputs)
    _assert_untouched(model, snap)


@pytest.mark.parametrize("inputs, words", [
    (None, ["example_inputs is required", "tuple of positional arguments", "dict of keyword arguments"]),
    ("hello", ["example_inputs must be a tuple", "got str"]),
    ((3, 4), ["at least one tensor", "(int, int)"]),
    ({"input_idz": torch.zeros(2, 5, dtype=torch.long)}, ["LlamaForCausalLM failed on example_inputs",
                                                         "'input_idz': Tensor(2, 5):int64"]),
    ((torch.randn(2, 5),), ["LlamaForCausalLM failed on example_inputs", "Tensor(2, 5):float32"]),
], ids=["missing", "string", "no-tensor", "wrong-key", "wrong-dtype"])
def test_missing_or_wrong_example_inputs(inputs, words):
    model, _ = ZOO["llama"].build()
    snap = _snapshot(model)
    with pytest.raises(InputError) as info:
        mohdify.mohdify(model, MoHDConfig(num_groups=4, num_shared=1, top_k=1), example_inputs=inputs)
    for w in words:
        assert w in str(info.value), f"{w!r} not in {info.value}"
    _assert_untouched(model, snap)


def test_failed_apply_rolls_back(monkeypatch):
    model, inputs = ZOO["llama"].build()
    snap = _snapshot(model)
    from mohdify.passes import apply as apply_mod
    real, calls = apply_mod.MoHDWriter, []

    def failing_writer(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure in the third writer")
        return real(*args, **kwargs)

    monkeypatch.setattr(apply_mod, "MoHDWriter", failing_writer)
    with pytest.raises(RuntimeError, match="injected failure"):
        mohdify.mohdify(model, MoHDConfig(num_groups=4, num_shared=1, top_k=1), example_inputs=inputs)
    assert len(calls) == 3
    _assert_untouched(model, snap)
    assert not hasattr(model, "mohd_plan")


def test_demohdify_and_aux_loss_on_dense_model():
    model, _ = ZOO["nanogpt"].build()
    with pytest.raises(UnsupportedModelError, match="NanoGPT is not mohdified"):
        mohdify.demohdify(model)
    with pytest.raises(UnsupportedModelError, match="NanoGPT is not mohdified"):
        mohdify.aux_loss(model)
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got str"):
        mohdify.explain("model", (torch.zeros(1),))


def test_aux_loss_counts_only_training_passes():
    model, inputs = ZOO["nanogpt"].build()
    mohdify.mohdify(model, MoHDConfig(num_groups=4, num_shared=1, top_k=1), example_inputs=inputs)
    nothing = mohdify.aux_loss(model)            # no forward yet: nothing kept
    assert nothing.item() == 0.0 and not nothing.requires_grad
    model.eval()
    with torch.no_grad():
        model(*inputs)                           # inference keeps no balance loss, and says so
    with pytest.warns(UserWarning, match="the model is in eval mode"):
        assert mohdify.aux_loss(model).item() == 0.0
    model(*inputs)                               # autograd on in eval mode: nothing kept either
    with pytest.warns(UserWarning, match="the model is in eval mode"):
        assert mohdify.aux_loss(model).item() == 0.0
    model.train()
    with torch.no_grad():
        model(*inputs)                           # training mode: kept, also without autograd
    assert mohdify.aux_loss(model).requires_grad


def test_explain_does_not_touch_model_and_copies_behave():
    model, inputs = ZOO["gpt2"].build()
    twin = copy.deepcopy(model)
    snap = _snapshot(model)
    mohdify.explain(model, inputs)
    _assert_untouched(model, snap)
    assert torch.equal(model(**inputs).logits, twin(**inputs).logits)
