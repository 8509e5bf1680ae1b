"""torch.compile(model, backend="mohd"): registration, the dense-graph rewrite, mohdified graphs.

Most checks compile with options={"compiler": "aot_eager"} (the same rewritten graph, handed to AOT
autograd without inductor); two tests run inductor itself (10-40 s each on CPU).
"""

import copy
import json
import logging
import os
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close
from strategies import main_output, run
from torch import nn
from torch._dynamo.exc import BackendCompilerFailed
from torch._dynamo.utils import counters
from zoo import ZOO, _ids

import mohdify
from mohdify.backend import backend_config
from mohdify.errors import ConfigError

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _call(model, inputs):
    return main_output(run(model, inputs))


def _branches_logged(caplog) -> dict:
    """{branch: (readers, writer)} from the backend's per-branch log records."""
    return {r.args[0]: (list(r.args[1]), r.args[2]) for r in caplog.records
            if r.name == "mohdify" and r.msg.startswith("mohd backend: branch")}


def _compile(model, options, **kw):
    return torch.compile(model, backend="mohd", fullgraph=True, options=dict(options), **kw)


# ------------------------------------------------------------------------- registration
def test_entry_point_declares_the_backend():
    eps = {ep.name: ep.value for ep in entry_points(group="torch_dynamo_backends")}
    assert eps.get("mohd") == "mohdify.backend:mohd_backend"


FRESH = textwrap.dedent("""
    import json, sys, torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln, self.up, self.down = nn.LayerNorm(16), nn.Linear(16, 32), nn.Linear(32, 16)

        def forward(self, h):
            return h + self.down(torch.relu(self.up(self.ln(h))))

    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).eval()
    x = torch.randn(2, 5, 16)
    before = "mohdify" in sys.modules
    with torch.no_grad():
        ref = model(x)
        out = torch.compile(model, backend="mohd", fullgraph=True,
                            options={"num_groups": 4, "num_shared": 1, "top_k": 3, "compiler": "aot_eager"})(x)
    from torch._dynamo.utils import counters
    print(json.dumps({"imported_before": before, "err": (out - ref).abs().max().item(),
                      "counts": dict(counters["mohdify"])}))
""")


def test_backend_works_in_a_fresh_process_without_importing_mohdify():
    env = {**os.environ, "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["imported_before"] is False
    assert result["counts"]["branches_rewritten"] == 2 and result["counts"]["readers_rewritten"] == 2
    assert result["err"] <= 1e-5, f"fresh-process compiled model at delta 1: max abs error {result['err']:.3e}"


# ------------------------------------------------------------------------- options
def test_options_become_a_magnitude_config():
    config, compiler = backend_config({"num_groups": 8, "num_shared": 2, "top_k": 2, "scaling": "none"})
    assert config == mohdify.MoHDConfig(num_groups=8, num_shared=2, top_k=2, router="magnitude",
                                        scaling="none", fusion="none")
    assert compiler == "inductor"
    assert backend_config(None)[0] == mohdify.MoHDConfig(router="magnitude")
    assert backend_config({"compiler": "aot_eager", "router": "magnitude"})[1] == "aot_eager"


@pytest.mark.parametrize("options, needle", [
    ({"router": "learned"}, "router='learned'.*Call mohdify.mohdify\\(model, MoHDConfig"),
    ({"fusion": "mix"}, "fusion='mix'.*Call mohdify.mohdify\\(model, MoHDConfig"),
    ({"num_group": 8}, r"unknown option\(s\) \['num_group'\]"),
    ({"aux_loss_coef": 0.1}, r"unknown option\(s\) \['aux_loss_coef'\]"),
    ({"compiler": "tvm"}, "compiler must be one of .*got 'tvm'"),
    ({"num_groups": 8, "num_shared": 2, "top_k": 7}, "top_k must be <= .* got 7"),
    ({"scaling": "l2"}, "scaling must be one of .*got 'l2'"),
    ([("num_groups", 8)], "options=...\\) must be a dict, got list"),
])
def test_bad_options_raise(options, needle):
    with pytest.raises(ConfigError, match=needle):
        backend_config(options)


def test_groups_that_do_not_divide_the_hidden_size_fail_the_compile():
    model, inputs = ZOO["nanogpt"].build()
    compiled = _compile(model, {"num_groups": 5, "num_shared": 1, "top_k": 1, "compiler": "eager"})
    with pytest.raises(BackendCompilerFailed) as info, torch.no_grad():
        _call(compiled, inputs)
    assert isinstance(info.value.inner_exception, ConfigError)
    assert "num_groups=5 must divide the model's hidden size 48" in str(info.value)


# ------------------------------------------------------------------------- dense models
CASES = {   # model -> (options at delta < 1)
    "llama": {"num_groups": 8, "num_shared": 2, "top_k": 2, "scaling": "norm"},
    "gpt2": {"num_groups": 4, "num_shared": 1, "top_k": 1, "scaling": "density"},
    "nanogpt": {"num_groups": 6, "num_shared": 2, "top_k": 2, "scaling": "none"},
    "bert": {"num_groups": 8, "num_shared": 1, "top_k": 3, "scaling": "norm"},
}


@pytest.mark.parametrize("name", list(CASES))
def test_dense_model_is_rewritten_and_equals_eager(name, caplog):
    caplog.set_level(logging.INFO, logger="mohdify")
    z = ZOO[name]
    model, inputs = z.build()
    sparse = CASES[name]
    dense = {**sparse, "top_k": sparse["num_groups"] - sparse["num_shared"]}
    with torch.no_grad():
        expected_dense = _call(model, inputs)
        got_dense = _call(_compile(model, {**dense, "compiler": "aot_eager"}), inputs)
    assert_close(got_dense, expected_dense, f"{name} compiled at delta 1 vs eager dense")
    n_readers = sum(len(r) for r, _ in z.branches.values())
    assert counters["mohdify"]["branches_rewritten"] == len(z.branches)
    assert counters["mohdify"]["readers_rewritten"] == n_readers
    assert counters["mohdify"]["writers_rewritten"] == len(z.branches)
    assert counters["mohdify"]["graphs"] == 1 and counters["mohdify"]["graphs_without_branch"] == 0
    assert _branches_logged(caplog) == z.branches

    torch._dynamo.reset()
    counters.clear()
    caplog.clear()
    eager = mohdify.mohdify(copy.deepcopy(model), mohdify.MoHDConfig(router="magnitude", **sparse),
                            example_inputs=inputs)
    with torch.no_grad():
        expected = _call(eager, inputs)
        got = _call(_compile(model, {**sparse, "compiler": "aot_eager"}), inputs)
    assert_close(got, expected, f"{name} compiled at delta {mohdify.MoHDConfig(**sparse).density:.3f} vs "
                 "eager magnitude-mohdified")
    assert (expected - expected_dense).abs().max() > 1e-3, f"{name}: delta < 1 left the output unchanged"
    assert counters["mohdify"]["branches_rewritten"] == len(z.branches)
    c = mohdify.MoHDConfig(**sparse)
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("mohd backend: rewrote")]
    assert len(summary) == 1 and (f"groups={c.num_groups}, shared={c.num_shared}, top_k={c.top_k}" in summary[0])
    skipped = {r.args[0]: r.args[1] for r in caplog.records if r.msg.startswith("mohd backend: left dense")}
    for layer in z.never:
        assert "never rewritten" in skipped[layer], f"{name}: {layer} must be reported as left dense"


def test_dense_llama_with_inductor_equals_eager_mohdified():
    model, inputs = ZOO["llama"].build()
    options = CASES["llama"]
    eager = mohdify.mohdify(copy.deepcopy(model), mohdify.MoHDConfig(router="magnitude", **options),
                            example_inputs=inputs)
    with torch.no_grad():
        got = _call(_compile(model, options), inputs)
        expected = _call(eager, inputs)
    assert_close(got, expected, "llama inductor-compiled (mohd backend, delta 0.5) vs eager mohdified")
    assert counters["mohdify"]["branches_rewritten"] == 4 and counters["mohdify"]["readers_rewritten"] == 10


def test_new_sequence_lengths_and_backward_match_eager_mohdified():
    model, inputs = ZOO["nanogpt"].build()
    options = CASES["nanogpt"]
    eager = mohdify.mohdify(copy.deepcopy(model), mohdify.MoHDConfig(router="magnitude", **options),
                            example_inputs=inputs)
    compiled = _compile(model, {**options, "compiler": "aot_eager"})
    with torch.no_grad():
        for seq in (7, 11, 13):   # the second length recompiles with dynamic shapes
            ids = _ids(seq=seq, seed=seq)
            assert_close(compiled(ids), eager(ids), f"nanogpt seq {seq}")
    ids = _ids(seq=9, seed=3)
    compiled(ids).square().mean().backward()
    eager(ids).square().mean().backward()
    grads = dict(eager.named_parameters())
    for n, p in model.named_parameters():
        assert_close(p.grad, grads[n].grad, f"grad of {n}")


class _BrokenBlocks(nn.Module):
    """Two residual MLP blocks with a graph break between them, then a dense head."""

    def __init__(self, d=16):
        super().__init__()
        self.blocks = nn.ModuleList(nn.ModuleDict({"ln": nn.LayerNorm(d), "up": nn.Linear(d, 2 * d),
                                                   "down": nn.Linear(2 * d, d)}) for _ in range(2))

    @staticmethod
    def block(b, h):
        return h + b["down"](torch.relu(b["up"](b["ln"](h))))

    def forward(self, h):
        h = self.block(self.blocks[0], h)
        torch._dynamo.graph_break()   # not in a loop: dynamo skips frames that break inside loops
        return self.block(self.blocks[1], h)


def test_graph_pieces_after_a_break_are_each_rewritten(caplog):
    caplog.set_level(logging.INFO, logger="mohdify")
    torch.manual_seed(0)
    model = _BrokenBlocks().eval()
    x = torch.randn(3, 4, 16)
    with torch.no_grad():
        got = torch.compile(model, backend="mohd", options={"num_groups": 4, "num_shared": 1, "top_k": 3,
                                                            "compiler": "aot_eager"})(x)
        assert_close(got, model(x), "graph-broken model at delta 1")
    assert counters["mohdify"]["graphs"] == 2 and counters["mohdify"]["branches_rewritten"] == 2
    assert _branches_logged(caplog) == {f"blocks.{i}": ([f"blocks.{i}.up"], f"blocks.{i}.down") for i in range(2)}


class _Functional(nn.Module):
    """A residual MLP written with F.linear on raw Parameters of the root module (no nn.Linear)."""

    def __init__(self, d=16):
        super().__init__()
        self.w_up = nn.Parameter(torch.randn(2 * d, d) / d ** 0.5)
        self.w_down = nn.Parameter(torch.randn(d, 2 * d) / d ** 0.5)

    def forward(self, h):
        x = F.layer_norm(h, h.shape[-1:])
        return h + F.linear(torch.relu(F.linear(x, self.w_up)), self.w_down)


def test_functional_linears_on_bare_parameters_stay_dense_as_in_mohdify(caplog):
    """F.linear on bare Parameters is no linear layer: mohdify() cannot swap it, and the backend, which
    follows the same rule (passes/select.py), leaves it dense too and says why."""
    caplog.set_level(logging.INFO, logger="mohdify")
    torch.manual_seed(0)
    model = _Functional().eval()
    x = torch.randn(3, 5, 16)
    options = {"num_groups": 4, "num_shared": 1, "top_k": 1, "scaling": "density"}
    with torch.no_grad():
        got = _compile(model, {**options, "compiler": "eager"})(x)
        assert_close(got, model(x), "functional model compiled: unchanged")
    assert _branches_logged(caplog) == {}
    skipped = {r.args[0]: r.args[1] for r in caplog.records if r.msg.startswith("mohd backend: left dense")}
    assert skipped["w_down"].startswith("the model multiplies activations by its parameter 'w_down' but is not "
                                        "an nn.Linear"), skipped
    with pytest.raises(mohdify.errors.UnsupportedModelError):
        mohdify.mohdify(model, mohdify.MoHDConfig(router="magnitude", **options), example_inputs=(x,))


def test_graph_without_branch_is_reported_not_silent(caplog):
    caplog.set_level(logging.INFO, logger="mohdify")
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        assert_close(_compile(model, {"num_groups": 4, "num_shared": 1, "top_k": 1, "compiler": "eager"})(x),
                     model(x), "model without residual branches")
    assert counters["mohdify"]["graphs_without_branch"] == 1 and counters["mohdify"]["branches_rewritten"] == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("mohd backend: no residual branch in this graph (2 linear-layer calls, ")
    assert warnings[0].endswith("it is compiled unchanged, with no MoHD")


# ------------------------------------------------------------------------- mohdified models
def test_mohdified_model_compiles_with_inductor_and_equals_eager(caplog):
    caplog.set_level(logging.INFO, logger="mohdify")
    model, inputs = ZOO["nanogpt"].build()
    config = mohdify.MoHDConfig(num_groups=6, num_shared=2, top_k=2, router="learned", fusion="mix", scaling="norm")
    mohdify.mohdify(model, config, example_inputs=inputs)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # non-trivial routing: random router weights and fusion matrices
        for b in mohdify.branches(model):
            b.router.copy_(torch.randn(b.router.shape, generator=g))
            b.fusion.add_(0.1 * torch.randn(b.fusion.shape, generator=g))
        expected = _call(model, inputs)
        got = _call(torch.compile(model, backend="mohd", fullgraph=True), inputs)
    assert_close(got, expected, "mohdified nanogpt: inductor (mohd backend) vs eager")
    assert counters["mohdify"]["mohdified_graphs"] == 1 and counters["mohdify"]["dense_graphs"] == 0
    assert counters["mohdify"]["branches_rewritten"] == 0
    # 4 branches with one reader each: 4 route + 4 read + 4 write ops
    assert [r.getMessage() for r in caplog.records if "MoHD ops" in r.getMessage()] == [
        "mohd backend: graph with 12 MoHD ops (a mohdified model), compiled with inductor"]
