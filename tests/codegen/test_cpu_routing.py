"""The native routing of many tokens (codegen/cpu/routing.c through routing.py, `mohdify::route_gates`).

Against the reference (route_naive's stable descending sort, then the gates and shares as the torch
path computes them) over random probabilities with ties, NaN and infinities (hypothesis); the
probabilities' gradient against float64 autograd of the gates' formula; `route_tokens` takes it
exactly where `takes` says (many fp32 CPU tokens, not decode, not export, not without the library)
and then equals the torch path (mask, gates, balance loss, gradients); a compiled training step calls it."""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import mohdify.codegen  # noqa: F401  (registers torch.ops.mohdify.*)
from mohdify.codegen import route_naive
from mohdify.codegen.cpu import native
from mohdify.codegen.cpu import routing as native_routing
from mohdify.routing import balance_loss, route_tokens

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the native kernels are off")
OPS = torch.ops.mohdify


def _case(gen, tokens, routed, shared, special):
    """Probabilities `[T, N_r]` (ties from rounding; NaN / inf / -inf in some rows when `special`) and
    shared / routed group ids in a shuffled order."""
    probs = torch.softmax(torch.randn(tokens, routed, generator=gen), -1)
    probs = (probs * 8).round() / 8                                           # many ties
    if special and tokens > 2:
        rows = torch.randint(0, tokens, (3,), generator=gen)
        cols = torch.randint(0, routed, (3,), generator=gen)
        probs[rows, cols] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    ids = torch.randperm(shared + routed, generator=gen)
    return probs, ids[:shared].clone(), ids[shared:].clone()


def _reference(probs, shared_idx, routed_idx, top_k):
    mask, topk = route_naive(probs, shared_idx, routed_idx, top_k)            # [T, N], [T, k]
    chosen = probs.gather(1, topk)                                            # [T, k]
    g = top_k * chosen / chosen.sum(-1, keepdim=True)
    gates = mask.float().scatter(1, routed_idx[topk], g)                      # [T, N]
    counts = torch.zeros_like(probs).scatter(1, topk, 1.0).sum(0)             # [N_r]
    return mask, gates, counts, topk


@given(st.integers(0, 300), st.integers(1, 40), st.integers(0, 5), st.integers(1, 40), st.booleans(),
       st.integers(0, 2**16))
@example(2048, 12, 4, 4, False, 3)        # the train_lm / benchmark shape
@example(50, 1, 0, 1, True, 0)            # one routed group, no shared one
@example(0, 12, 4, 4, False, 0)           # no tokens
def test_route_gates_matches_the_reference(tokens, routed, shared, top_k, special, seed):
    top_k = min(top_k, routed)
    gen = torch.Generator().manual_seed(seed)
    probs, shared_idx, routed_idx = _case(gen, tokens, routed, shared, special)
    mask, gates, counts, sums = OPS.route_gates(probs, shared_idx, routed_idx, top_k)
    want_mask, want_gates, want_counts, topk = _reference(probs, shared_idx, routed_idx, top_k)
    assert torch.equal(mask, want_mask)
    assert torch.equal(counts, want_counts)
    torch.testing.assert_close(gates, want_gates, rtol=1e-6, atol=0, equal_nan=True)
    torch.testing.assert_close(sums, probs.gather(1, topk).sum(-1), rtol=1e-6, atol=0, equal_nan=True)


@given(st.integers(1, 200), st.integers(2, 24), st.integers(0, 4), st.integers(1, 24), st.integers(0, 2**16))
def test_route_gates_gradient_matches_float64(tokens, routed, shared, top_k, seed):
    top_k = min(top_k, routed)
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(tokens, routed, generator=gen), -1).requires_grad_()
    ids = torch.randperm(shared + routed, generator=gen)
    shared_idx, routed_idx = ids[:shared].clone(), ids[shared:].clone()
    weight = torch.randn(tokens, shared + routed, generator=gen)             # dL/dgates
    _, gates, _, _ = OPS.route_gates(probs, shared_idx, routed_idx, top_k)
    (gates * weight).sum().backward()
    _, topk = route_naive(probs.detach(), shared_idx, routed_idx, top_k)
    p64 = probs.detach().double().requires_grad_()
    chosen = p64.gather(1, topk)
    g = top_k * chosen / chosen.sum(-1, keepdim=True)
    (g * weight.double().gather(1, routed_idx[topk])).sum().backward()
    torch.testing.assert_close(probs.grad.double(), p64.grad, rtol=1e-4, atol=1e-5)   # fp32: dg - mean cancels
    assert (probs.grad[torch.zeros_like(probs, dtype=torch.bool).scatter(1, topk, True).logical_not()] == 0).all()


def test_bad_routed_count_is_refused():
    probs = torch.full((20, 3), 1 / 3)
    with pytest.raises(ValueError, match=r"^mohdify::route_gates: 3 routed groups and top_k 4: required 1 <= top_k"):
        OPS.route_gates(probs, torch.tensor([3]), torch.arange(3), 4)


def _route(x, router, native_on, monkeypatch):
    if not native_on:
        monkeypatch.setattr(native_routing, "takes", lambda *a: False)
    try:
        return route_tokens(x, "learned", router, torch.arange(2), torch.arange(2, 8), 3, "norm", 0.5, balance=True)
    finally:
        monkeypatch.undo()


@pytest.mark.parametrize("tokens", [17, 300])
def test_route_tokens_takes_it_and_equals_the_torch_path(tokens, monkeypatch):
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 64, generator=gen, requires_grad=True)
    router = (torch.randn(6, 64, generator=gen) / 8).requires_grad_()
    upstream = torch.randn(tokens, 8, generator=gen)
    results = []
    for native_on in (True, False):
        calls = dict(native_routing.calls)
        r = _route(x, router, native_on, monkeypatch)
        ((r.gates * upstream).sum() + 5 * r.balance + r.scale.sum()).backward()
        took = native_routing.calls["route_gates"] - calls.get("route_gates", 0)
        took_bw = native_routing.calls["route_gates_backward"] - calls.get("route_gates_backward", 0)
        assert (took, took_bw) == ((1, 1) if native_on else (0, 0))
        results.append((r, x.grad.clone(), router.grad.clone()))
        x.grad, router.grad = None, None
    (a, ax, aw), (b, bx, bw) = results
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.gates, b.gates, rtol=1e-6, atol=0)
    torch.testing.assert_close(a.balance, b.balance, rtol=1e-6, atol=0)
    torch.testing.assert_close(ax, bx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(aw, bw, rtol=1e-4, atol=1e-5)


def test_route_tokens_balance_is_the_public_formula():
    gen = torch.Generator().manual_seed(1)
    x, router = torch.randn(100, 64, generator=gen), torch.randn(6, 64, generator=gen) / 8
    r = route_tokens(x, "learned", router, torch.arange(2), torch.arange(2, 8), 3, "none", 0.5, balance=True)
    probs = torch.softmax(x @ router.t(), -1)
    _, topk = route_naive(probs, torch.arange(2), torch.arange(2, 8), 3)
    torch.testing.assert_close(r.balance, balance_loss(probs, topk), rtol=1e-6, atol=0)


def test_where_it_is_not_taken(monkeypatch):
    probs = torch.softmax(torch.randn(300, 12), -1)
    assert native_routing.takes(probs, 4)
    assert not native_routing.takes(probs[:16], 4)                            # decode-sized: the graph's own code
    assert not native_routing.takes(probs.double(), 4) and not native_routing.takes(probs.bfloat16(), 4)
    assert not native_routing.takes(probs, 13)
    assert not native_routing.takes(torch.softmax(torch.randn(300, 1025), -1), 4)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert not native_routing.takes(probs, 4)                                 # export keeps mohdify::route


def test_library_off_takes_the_torch_path(monkeypatch):
    monkeypatch.setenv("MOHDIFY_NATIVE", "0")
    native.reset()
    try:
        probs = torch.softmax(torch.randn(300, 12), -1)
        assert not native_routing.takes(probs, 4)
        calls = dict(native_routing.calls)
        r = route_tokens(torch.randn(300, 128), "learned", torch.randn(12, 128) / 11, torch.arange(4),
                         torch.arange(4, 16), 4, "none", 0.5)
        assert dict(native_routing.calls) == calls and r.mask.sum(1).eq(8).all()
    finally:
        monkeypatch.delenv("MOHDIFY_NATIVE")
        native.reset()


def test_export_graph_keeps_the_route_op():
    from torch import nn

    import mohdify

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(64, 128), nn.Linear(128, 64)

        def forward(self, x):
            return x + self.down(torch.relu(self.up(x)))

    model = Block()
    mohdify.mohdify(model, mohdify.MoHDConfig(num_groups=8, num_shared=2, top_k=2, router="learned"),
                    example_inputs=(torch.randn(1, 4, 64),))
    for p in model.parameters():
        if p.shape == (6, 64):
            torch.nn.init.normal_(p, std=1 / math.sqrt(64))
    exported = torch.export.export(model.eval(), (torch.randn(2, 40, 64),))
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert "mohdify.route.default" in targets and "mohdify.route_gates.default" not in targets, sorted(targets)
