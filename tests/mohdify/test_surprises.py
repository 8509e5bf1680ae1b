"""No silent surprises (mohdify/guards.py): a compiled wrapper of a demohdified model runs it dense,
the backend's default rewrite is a Python warning, a filter_fn of the wrong arity is refused, and
the untrained-router warning comes once per process."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import assert_close
from zoo import ZOO

import mohdify
from mohdify.guards import reset_warn_once

MAGNITUDE = mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1, router="magnitude")


def _out(result):
    return result if isinstance(result, torch.Tensor) else result[0]


def _user_warnings(record, words):
    return [str(w.message) for w in record if issubclass(w.category, UserWarning) and words in str(w.message)]


def test_compiled_wrapper_of_a_demohdified_model_runs_it_dense(fresh_dynamo):
    from torch._dynamo.utils import counters
    reset_warn_once()
    model, inputs = ZOO["nanogpt"].build()
    model.eval()
    mohdify.mohdify(model, MAGNITUDE, example_inputs=inputs)
    compiled = torch.compile(model, backend="mohd", options={"compiler": "eager"})
    with torch.no_grad():
        sparse = _out(compiled(*inputs))
        mohdify.demohdify(model)
        dense = _out(model(*inputs))
        assert (sparse - dense).abs().max() > 1e-2      # the MoHD model did differ from the dense one
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            again = _out(compiled(*inputs))
    assert_close(again, dense, "compiled wrapper after demohdify")
    assert counters["mohdify"]["demohdified_graphs"] == 1 and counters["mohdify"]["branches_rewritten"] == 0
    assert len(_user_warnings(record, "made dense again")) == 1
    assert not _user_warnings(record, "got no options")


def test_demohdified_model_with_options_is_rewritten_as_asked(fresh_dynamo):
    from torch._dynamo.utils import counters
    model, inputs = ZOO["nanogpt"].build()
    mohdify.mohdify(model, MAGNITUDE, example_inputs=inputs)
    mohdify.demohdify(model)
    with torch.no_grad():
        torch.compile(model, backend="mohd", options={"num_groups": 4, "num_shared": 1, "top_k": 3,
                                                      "compiler": "eager"})(*inputs)
    assert counters["mohdify"]["branches_rewritten"] == 4 and counters["mohdify"]["demohdified_graphs"] == 0


def test_backend_default_rewrite_is_a_python_warning_once(fresh_dynamo):
    from mohdify import backend
    reset_warn_once()
    backend._warn_defaults.cache_clear()
    model, inputs = ZOO["nanogpt"].build()
    with warnings.catch_warnings(record=True) as record, torch.no_grad():
        warnings.simplefilter("always")
        compiled = torch.compile(model, backend="mohd", options={"compiler": "eager"})
        compiled(*inputs)
        compiled(*inputs)
        torch.compile(copy.deepcopy(model), backend="mohd", options={"compiler": "eager"})(*inputs)
    got = _user_warnings(record, "got no options")
    assert len(got) == 1 and "density 0.500" in got[0] and "outputs change" in got[0], got


@pytest.mark.parametrize("bad", [lambda module: True, lambda module, name, extra: True, "h.0"])
def test_filter_fn_of_the_wrong_kind_is_refused_before_anything_runs(bad):
    model, inputs = ZOO["nanogpt"].build()
    before = copy.deepcopy(model.state_dict())
    for call in (lambda: mohdify.explain(model, inputs, MAGNITUDE, filter_fn=bad),
                 lambda: mohdify.mohdify(model, MAGNITUDE, example_inputs=inputs, filter_fn=bad)):
        with pytest.raises(mohdify.ConfigError, match=r"filter_fn must (take two arguments|be a function)"):
            call()
    assert not mohdify.passes.is_mohdified(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_filter_fn_taking_more_optional_arguments_works():
    model, inputs = ZOO["nanogpt"].build()
    plan = mohdify.explain(model, inputs, MAGNITUDE, filter_fn=lambda m, name, *rest, **kw: "mlp" in name)
    assert [b.name for b in plan.branches] == ["h.0.mlp", "h.1.mlp"]


def test_untrained_router_warning_comes_once_per_process():
    reset_warn_once()
    model, inputs = ZOO["nanogpt"].build()
    sparse = mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        mohdify.explain(model, inputs, sparse)
        mohdify.explain(model, inputs, sparse)
        mohdify.mohdify(model, sparse, example_inputs=inputs)
    got = _user_warnings(record, "starts untrained")
    assert len(got) == 1 and got[0].startswith("mohdify.explain(): "), got
    mohdify.demohdify(model)
    with warnings.catch_warnings(record=True) as record:   # another setting: its own warning
        warnings.simplefilter("always")
        mohdify.explain(model, inputs, mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=2))
    assert len(_user_warnings(record, "starts untrained")) == 1
