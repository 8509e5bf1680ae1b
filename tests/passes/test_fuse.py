"""The mohd backend's fusion pass (mohdify/passes/fuse.py) on mohdified models and on hand-built graphs.

Zoo models are mohdified with random routers and fusion matrices (non-trivial routing), compiled
with backend="mohd" and compiler aot_eager: the forward equals the unfused compile bit for bit and
eager within fp32 tolerance, parameter gradients (router and fusion included) equal eager, and the
fused graph holds exactly the ops expected (one route per branch, read_multi with the branch's
reader weights in order, write_add per branch).
"""

import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from strategies import main_output, run
from torch import fx, nn
from torch._dynamo.utils import counters
from zoo import ZOO

import mohdify
from mohdify.backend import mohd_backend
from mohdify.codegen.write import write_add_naive
from mohdify.passes.fuse import fuse_graph

OPS = torch.ops.mohdify
# model -> (routes left, single reads left, [readers per read_multi, in graph order], fused counters).
# gpt2 and nanogpt have one reader per branch (fused c_attn, c_fc): nothing to merge there.
EXPECTED = {
    "llama": (4, 0, [["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]] * 2,
              {"reads_merged": 10, "read_multi": 4, "writes_fused": 4}),
    "gpt2": (4, 4, [], {"reads_merged": 0, "read_multi": 0, "writes_fused": 4}),
    "nanogpt": (4, 4, [], {"reads_merged": 0, "read_multi": 0, "writes_fused": 4}),
}


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _call(model, inputs):
    return main_output(run(model, inputs))


def _mohdified(name):
    model, inputs = ZOO[name].build()
    config = mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=2, router="learned", fusion="mix", scaling="norm")
    mohdify.mohdify(model, config, example_inputs=inputs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for b in mohdify.branches(model):
            b.router.copy_(torch.randn(b.router.shape, generator=g))
            b.fusion.add_(0.1 * torch.randn(b.fusion.shape, generator=g))
    return model, inputs


def _spy(graphs, options):
    """backend="mohd" that also keeps the graph it compiled (fused in place by the backend)."""
    def backend(gm, example_inputs):
        fn = mohd_backend(gm, example_inputs, options=options)
        graphs.append(gm.graph)
        return fn
    return backend


def _step(fn, model, inputs):
    model.zero_grad(set_to_none=True)
    out = _call(fn, inputs)
    (out.pow(2).mean() + mohdify.aux_loss(model)).backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_fused_model_equals_eager_forward_and_backward(name):
    model, inputs = _mohdified(name)
    routes, reads, groups, fused = EXPECTED[name]
    eager, eager_grads = _step(model, model, inputs)
    graphs = []
    got, got_grads = _step(torch.compile(model, backend=_spy(graphs, {"compiler": "aot_eager"}), fullgraph=True),
                           model, inputs)
    assert_close(got, eager, f"{name}: fused compile vs eager")
    assert got_grads.keys() == eager_grads.keys()
    assert any(n.endswith(".router") for n in got_grads) and any(n.endswith(".fusion") for n in got_grads)
    for n, g in eager_grads.items():
        assert_close(got_grads[n], g, f"{name}: fused compile grad of {n}")
    assert {k: counters["mohdify"][k] for k in fused} == fused

    (graph,) = graphs
    calls = [n for n in graph.nodes if n.op == "call_function"]
    assert sum(n.target == OPS.route.default for n in calls) == routes
    assert sum(n.target == OPS.read.default for n in calls) == reads
    assert [n for n in calls if n.target == OPS.write.default] == [], f"{name}: a write was left unfused"
    assert sum(n.target == OPS.write_add.default for n in calls) == 4
    multi = [[w.name for w in n.args[1]] for n in calls if n.target == OPS.read_multi.default]
    assert len(multi) == len(groups)
    for weights, readers in zip(multi, groups):
        assert len(weights) == len(readers) and all(r in w for w, r in zip(weights, readers)), (weights, readers)

    torch._dynamo.reset()
    unfused = torch.compile(model, backend="mohd", options={"compiler": "aot_eager", "fuse": False})
    with torch.no_grad():
        assert torch.equal(_call(unfused, inputs), got), f"{name}: the fusion pass changed forward numbers"


def test_gpt2_in_training_mode_keeps_the_random_dropout_unfused():
    """With dropout p=0.1 in training, the dropout between a write and its residual add is not the
    identity: the writes stay `mohdify::write` (the routes are still one per branch)."""
    model, inputs = _mohdified("gpt2")
    model.train()
    graphs = []
    torch.compile(model, backend=_spy(graphs, {"compiler": "eager"}), fullgraph=True)(**inputs)
    assert counters["mohdify"]["writes_fused"] == 0
    (graph,) = graphs
    writes = [n for n in graph.nodes if n.op == "call_function" and n.target == OPS.write.default]
    assert len(writes) == 4
    for w in writes:   # write -> view -> dropout(p=0.1, training=True) -> add, untouched
        (view,) = w.users
        (drop,) = view.users
        assert drop.target is F.dropout and drop.args[1:3] == (0.1, True), drop.format_node()


# ------------------------------------------------------------------------- hand-built graphs
def _run(graph: fx.Graph, *args):
    gm = fx.GraphModule(nn.Module(), graph)
    expected = gm(*args)
    report = fuse_graph(gm)
    return gm, report, expected, gm(*args)


def test_reads_group_by_input_mask_alpha_and_bias_presence():
    g = fx.Graph()
    x, mask, alpha, w1, w2, w3, w4, b1, b3 = (g.placeholder(n) for n in
                                             ("x", "mask", "alpha", "w1", "w2", "w3", "w4", "b1", "b3"))
    reads = [g.call_function(OPS.read.default, (x, w1, b1, mask, alpha)),
             g.call_function(OPS.read.default, (x, w2, None, mask, alpha)),
             g.call_function(OPS.read.default, (x, w3, b3, mask, alpha)),
             g.call_function(OPS.read.default, (x, w4, None, mask, None))]   # another alpha: its own group
    g.output(tuple(g.call_function(torch.relu, (r,)) for r in reads))
    gen = torch.Generator().manual_seed(0)
    args = [torch.randn(5, 64, generator=gen), torch.rand(5, 4, generator=gen) < 0.5, torch.rand(5, generator=gen)]
    args += [torch.randn(o, 64, generator=gen) for o in (8, 16, 24, 32)]
    args += [torch.randn(8, generator=gen), torch.randn(24, generator=gen)]
    gm, report, expected, got = _run(g, *args)
    assert (report.read_multi, report.reads_merged) == (1, 2)
    multi = [n for n in gm.graph.nodes if n.target == OPS.read_multi.default]
    assert [w.name for w in multi[0].args[1]] == ["w1", "w3"]
    assert sum(n.target == OPS.read.default for n in gm.graph.nodes) == 2
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_write_used_elsewhere_is_not_fused_and_write_add_op_is_write_plus_residual():
    g = fx.Graph()
    h, u, w, gates = (g.placeholder(n) for n in ("h", "u", "w", "gates"))
    o = g.call_function(OPS.write.default, (u, w, None, gates, None))
    g.output((g.call_function(operator.add, (h, o)), g.call_method("sum", (o,))))
    gen = torch.Generator().manual_seed(0)
    args = (torch.randn(5, 32, generator=gen), torch.randn(5, 16, generator=gen), torch.randn(32, 16, generator=gen),
            torch.rand(5, 2, generator=gen))
    gm, report, expected, got = _run(g, *args)
    assert report.writes_fused == 0 and torch.equal(got[0], expected[0])
    h_, u_, w_, gates_ = (t.clone().requires_grad_() for t in args)
    fused = OPS.write_add(u_, w_, None, gates_, None, h_)
    separate = OPS.write(u_, w_, None, gates_, None) + h_
    # the CPU kernel sums in its own order (codegen/cpu/native.c): the reference within fp32 rounding
    assert torch.equal(fused, separate)
    assert torch.allclose(fused, write_add_naive(u_, w_, None, gates_, None, h_), rtol=1e-5, atol=1e-5)
    grad = torch.randn(5, 32, generator=gen)
    for a, b, n in zip(torch.autograd.grad(fused, (u_, w_, gates_, h_), grad),
                       torch.autograd.grad(separate, (u_, w_, gates_, h_), grad), ("u", "weight", "gates", "residual")):
        if n == "gates":   # write reads z = out / gate from its saved output, write_add recomputes W u: rounding
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"write_add grad of {n} differs")
        else:
            assert torch.equal(a, b), f"write_add grad of {n} differs from write + add"
    result = torch.library.opcheck(OPS.write_add.default, (u_, w_, None, gates_, None, h_))
    assert set(result.values()) == {"SUCCESS"}, result


def test_fuse_option_must_be_a_bool():
    from mohdify.backend import backend_config
    from mohdify.errors import ConfigError
    assert backend_config({"fuse": False, "compiler": "eager"})[1] == "eager"
    with pytest.raises(ConfigError, match="option fuse must be True or False, got 'no'"):
        backend_config({"fuse": "no"})


def test_dense_graph_rewritten_by_the_backend_is_fused_too():
    model, inputs = ZOO["llama"].build()
    eager = copy.deepcopy(model)
    mohdify.mohdify(eager, mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=2, router="magnitude"),
                    example_inputs=inputs)
    compiled = torch.compile(model, backend="mohd", options={"num_groups": 4, "num_shared": 1, "top_k": 2,
                                                              "compiler": "aot_eager"})
    assert_close(_call(compiled, inputs), _call(eager, inputs), "dense llama, mohd backend, fused")
    c = counters["mohdify"]
    assert (c["dense_graphs"], c["branches_rewritten"]) == (1, 4)
    # the rewrite routes once per branch input already; q|k|v and gate|up merge, every write takes its add
    assert (c["reads_merged"], c["read_multi"], c["writes_fused"]) == (10, 4, 4)
