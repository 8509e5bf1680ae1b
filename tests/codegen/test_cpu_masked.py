"""The eager masked path of CPU training (codegen/cpu/masked.py): when it runs (asserted through the
PATHS counter), and that a mohdified model's forward, balance loss and gradients through it equal
the custom-op path (forward bit for bit) and the float64 reference autograd (read_naive /
write_naive differentiated by plain autograd); token counts 0, 1, few, many; odd group sizes;
fp32 and bf16; eager and torch.compile(backend="mohd")."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import randomize_branches
from zoo import NanoGPT, _ids

import mohdify
import mohdify.modules as modules
from mohdify.codegen import read_naive, write_naive
from mohdify.codegen.cpu import native
from mohdify.codegen.cpu import routing as native_routing
from mohdify.codegen.cpu.backward import PATHS
from mohdify.codegen.cpu.masked import masked_pays, times_groups


def _model(groups: int, shared: int, top_k: int, scaling: str, fusion: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = NanoGPT(d=48)                                                     # D 48
    config = mohdify.MoHDConfig(num_groups=groups, num_shared=shared, top_k=top_k, router="learned",
                                scaling=scaling, fusion=fusion)
    mohdify.mohdify(model, config, example_inputs=(_ids(),))
    randomize_branches(model, seed=3, permute_groups=True)
    return model.train()


def _grads(model, ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits, and the gradients of loss + balance loss w.r.t. every parameter."""
    model.zero_grad(set_to_none=True)
    logits = model(ids)
    loss = logits.float().pow(2).mean() + mohdify.aux_loss(model)
    loss.backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.fixture
def ops_path(monkeypatch):
    """Force the custom-op path (the masked path never pays)."""
    monkeypatch.setattr(modules, "masked_pays", lambda *a: False)


def _reference_path(monkeypatch):
    """The reference: read_naive / write_naive as plain autograd functions, no masked path."""
    monkeypatch.setattr(modules, "masked_pays", lambda *a: False)
    monkeypatch.setattr(modules, "read_op", read_naive)
    monkeypatch.setattr(modules, "write_op", write_naive)


def test_masked_pays_follows_the_crossover_table(monkeypatch):
    x = torch.zeros(2048, 128)
    assert masked_pays(x, 8, 0.5)                                             # G 8: no grouped row
    assert masked_pays(x.bfloat16(), 32, 0.25)                                # bf16: always dense
    # G 32 at delta 0.5: the native kernels' table groups it; the torch loops' table does not
    assert masked_pays(torch.zeros(512, 512), 32, 0.5) is (native.library() is None)
    assert not masked_pays(torch.zeros(512, 512), 32, 0.25)                   # grouped pays
    assert not masked_pays(torch.zeros(16, 128), 8, 0.5)                      # decode: the kernels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not masked_pays(x, 8, 0.5)
    monkeypatch.setenv("MOHDIFY_NATIVE", "0")
    native.reset()
    try:
        assert masked_pays(torch.zeros(512, 512), 32, 0.5)                    # no library: G 32 above 30% active
        assert not masked_pays(torch.zeros(512, 512), 32, 0.25)
    finally:
        monkeypatch.delenv("MOHDIFY_NATIVE")
        native.reset()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_times_groups_is_exact(dtype):
    x = torch.randn(37, 15, dtype=dtype)
    gates = torch.rand(37, 5, dtype=dtype) * (torch.rand(37, 5) < 0.5)
    assert torch.equal(times_groups(x, gates), x * gates.repeat_interleave(3, dim=1))
    mask = torch.rand(37, 5) < 0.5
    assert torch.equal(times_groups(x, mask), x * mask.repeat_interleave(3, dim=1).to(dtype))
    assert times_groups(x[:0], mask[:0]).shape == (0, 15)


# (groups, shared, top_k): G 8 and the odd G 3; scaling and fusion both ways
CASES = [(6, 1, 2, "norm", "mix"), (16, 3, 5, "none", "none"), (16, 2, 6, "density", "mix")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"N{c[0]}-{c[3]}-{c[4]}")
@pytest.mark.parametrize("batch", [4, 24])                                   # 128 and 768 tokens
def test_masked_path_equals_ops_and_float64_reference(case, batch, monkeypatch):
    groups, shared, top_k, scaling, fusion = case
    model = _model(groups, shared, top_k, scaling, fusion)
    ids = _ids(batch=batch, seq=32, seed=1)
    PATHS.clear()
    logits, grads = _grads(model, ids)
    assert PATHS == {"read:masked": 4, "write:masked": 4}, dict(PATHS)      # 2 layers: c_attn, c_fc readers
    with monkeypatch.context() as m:
        m.setattr(modules, "masked_pays", lambda *a: False)
        PATHS.clear()
        logits_ops, grads_ops = _grads(model, ids)
        assert "read:masked" not in PATHS and PATHS["read_backward:dense"] == 4, dict(PATHS)
    assert torch.equal(logits, logits_ops), "forward: masked path vs custom ops"
    for name, g in grads_ops.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-6, msg=f"grad {name}: masked vs ops")
    ref = copy.deepcopy(model).double()
    with monkeypatch.context() as m:
        _reference_path(m)
        logits_ref, grads_ref = _grads(ref, ids)
    torch.testing.assert_close(logits.double(), logits_ref, rtol=1e-4, atol=1e-5)
    assert grads.keys() == grads_ref.keys()
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads[name].double(), g, rtol=1e-3, atol=1e-5, msg=f"grad {name} vs float64")
    assert any(n.endswith("router") for n in grads), "the routers get gradients"


def test_masked_path_bf16_equals_ops(ops_path):
    model = _model(16, 3, 5, "norm", "mix").bfloat16()
    ids = _ids(batch=4, seq=32, seed=1)
    logits_ops, grads_ops = _grads(model, ids)
    ops_path_off = pytest.MonkeyPatch()
    ops_path_off.setattr(modules, "masked_pays", masked_pays)
    try:
        PATHS.clear()
        logits, grads = _grads(model, ids)
        assert PATHS == {"read:masked": 4, "write:masked": 4}, dict(PATHS)
    finally:
        ops_path_off.undo()
    assert torch.equal(logits, logits_ops)
    for name, g in grads_ops.items():
        torch.testing.assert_close(grads[name], g, rtol=2e-2, atol=2e-3, msg=f"bf16 grad {name}")


@pytest.mark.parametrize("batch, seq", [(2, 0), (1, 1), (2, 8)])           # 0, 1, 16 tokens: the kernels
def test_few_tokens_keep_the_kernels(batch, seq):
    model = _model(6, 1, 2, "none", "none")
    PATHS.clear()
    if seq == 0:
        model.eval()
        with torch.no_grad():
            assert model(_ids(batch=2, seq=1)[:, :0]).shape == (2, 0, 96)
    else:
        _grads(model, _ids(batch=batch, seq=seq, seed=2))
        assert PATHS["read_backward:grouped"] == 4 and PATHS["write_backward:grouped"] == 4, dict(PATHS)
    assert "read:masked" not in PATHS and "write:masked" not in PATHS, dict(PATHS)


def test_compiled_training_traces_the_masked_path_and_agrees(fresh_dynamo):
    """torch.compile(backend="mohd"): the graph holds the routing op (the native `route_gates` for these
    64 tokens when the library is built) and plain linears (no read / write op, so no kernel runs forward
    or backward), equals eager, and compiles once: the eager path counter (PATHS) is not touched while
    tracing, so its value (here left as the last eager step set it) guards nothing; before, every
    training step recompiled."""
    from torch._dynamo.utils import counters
    model = _model(6, 1, 2, "norm", "none")
    ids = _ids(batch=4, seq=32, seed=1)
    logits, grads = _grads(model, ids)
    compiled = torch.compile(model, backend="mohd", fullgraph=True)
    PATHS.clear()
    counters["mohdify"].clear()
    routed = native_routing.calls["route_gates"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(3):
            before = dict(PATHS)
            logits_c, grads_c = _grads(compiled, ids)
            assert PATHS == before, f"step {step}: {dict(PATHS)}"              # no kernel ran, nothing counted
            PATHS["read:masked"] += 1                                      # an eager caller's count between steps
    assert counters["mohdify"]["mohdified_graphs"] == 1 and counters["mohdify"]["read_multi"] == 0, counters["mohdify"]
    if native.library() is not None:
        assert native_routing.calls["route_gates"] == routed + 3 * 4, native_routing.calls   # 3 steps, 4 branches
    torch.testing.assert_close(logits_c, logits, rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[f"_orig_mod.{name}"], g, rtol=1e-4, atol=1e-6, msg=f"compiled grad {name}")


def test_export_keeps_the_ops():
    model = _model(6, 1, 2, "none", "none").eval()
    exported = torch.export.export(model, (_ids(batch=4, seq=32, seed=1),))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"mohdify.read.default", "mohdify.write.default"} <= targets, sorted(targets)
