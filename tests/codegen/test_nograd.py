"""The ops' twins without autograd (codegen/nograd.py) and the backend's post-grad pass that uses them.

Inference and training graphs compiled with backend "mohd" call the `_nograd` twins (read from
inductor's generated code), with the numbers of the eager ops (forward, and gradients in training);
the twins equal their ops on every kernel path; a twin called eagerly on tensors that need grad
gives them no gradient, with torch's warning, instead of a wrong one."""

import re

import pytest
import torch
from test_cpu_kernels import reader_case, writer_case
from torch._inductor.utils import run_and_get_code

import mohdify.codegen  # noqa: F401  (registers torch.ops.mohdify.*)
from mohdify.codegen.nograd import NOGRAD_OPS, retarget

OPS = torch.ops.mohdify
DTYPES = [torch.float32, torch.bfloat16]


def _mohd_calls(codes: list[str]) -> set[str]:
    return set(re.findall(r"torch\.ops\.mohdify\.(\w+)", "\n".join(codes)))


def _branch(w, b, mask, alpha, w2, b2, gates):
    def branch(x, u, residual):
        q = OPS.read(x, w, b, mask, alpha)                                    # merged with k: read_multi
        k = OPS.read(x, w, b, mask, alpha)
        single = OPS.read(x * 2, w, None, mask, None)                         # stays a read
        mixed = OPS.write(u * (q + k + single).sum(), w2, b2, gates, None)
        return OPS.write(u, w2, b2, gates, None) + residual + mixed           # write + add: write_add
    return branch


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_compiled_inference_calls_the_twins(fresh_dynamo, tokens, dtype):
    """Every reader / writer call of the compiled graph is a twin; the result is the eager one
    (T = 1 and 5: native decode kernels; T = 40: the torch path)."""
    x, w, b, mask, alpha = reader_case(tokens, 8, 8, 24, dtype, density=0.4, seed=1)
    u, w2, b2, gates, _, residual = writer_case(tokens, 8, 8, 24, dtype, density=0.4, seed=2)
    branch = _branch(w, b, mask, alpha, w2, b2, gates)
    with torch.no_grad():
        want = branch(x, u, residual)
        got, codes = run_and_get_code(torch.compile(branch, backend="mohd", fullgraph=True), x, u, residual)
    calls = _mohd_calls(codes)
    assert {"read_nograd", "read_multi_nograd", "write_add_nograd"} <= calls, calls
    assert all(name.endswith("_nograd") for name in calls), f"ops with autograd left in: {calls}"
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, want, atol=tol * want.abs().max().item(), rtol=0)


def test_compiled_training_uses_twins_and_keeps_the_gradients(fresh_dynamo):
    """A training graph: the forward calls the twins, the backward its own backward ops; the
    gradients of x, u and the weights equal eager autograd through the ops with autograd."""
    x, w, b, mask, alpha = reader_case(6, 8, 8, 24, torch.float32, density=0.4, seed=3)
    u, w2, b2, gates, _, residual = writer_case(6, 8, 8, 24, torch.float32, density=0.4, seed=4)
    w, w2 = w.clone().requires_grad_(), w2.clone().requires_grad_()
    branch = _branch(w, b, mask, alpha, w2, b2, gates)

    def grads(fn):
        xs, us = x.clone().requires_grad_(), u.clone().requires_grad_()
        fn(xs, us, residual).square().sum().backward()
        out = [t.grad.clone() for t in (xs, us, w, w2)]
        w.grad = w2.grad = None
        return out

    want = grads(branch)
    compiled = torch.compile(branch, backend="mohd", fullgraph=True)
    got, codes = run_and_get_code(lambda: grads(compiled))
    calls = _mohd_calls(codes)
    assert {"read_multi_nograd", "write_add_nograd"} <= calls, calls
    assert not calls & {"read", "read_multi", "write", "write_add"}, f"ops with autograd left in: {calls}"
    assert {"read_backward", "write_backward"} <= calls, calls
    for name, g, r in zip(("x", "u", "W_read", "W_write"), got, want):
        torch.testing.assert_close(g, r, atol=1e-4 * r.abs().max().item(), rtol=0, msg=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [0, 1, 3, 17])
def test_twins_equal_their_ops(tokens, dtype):
    """Same kernels: bit for bit the op's output, on the native and the torch paths, T = 0 included."""
    x, w, b, mask, alpha = reader_case(tokens, 5, 7, 13, dtype, density=0.5, seed=5)
    u, w2, b2, gates, _, residual = writer_case(tokens, 5, 7, 13, dtype, density=0.5, seed=6)
    with torch.no_grad():
        pairs = [(OPS.read(x, w, b, mask, alpha), OPS.read_nograd(x, w, b, mask, alpha)),
                 (OPS.write(u, w2, b2, gates, None), OPS.write_nograd(u, w2, b2, gates, None)),
                 (OPS.write_add(u, w2, b2, gates, None, residual),
                  OPS.write_add_nograd(u, w2, b2, gates, None, residual))]
        pairs += list(zip(OPS.read_multi(x, [w, w[:4]], [b, None], mask, alpha),
                          OPS.read_multi_nograd(x, [w, w[:4]], [b, None], mask, alpha)))
    for i, (a, c) in enumerate(pairs):
        assert torch.equal(a, c), f"pair {i}: the twin differs from its op"


def test_twin_called_with_grad_gives_no_gradient_and_warns():
    """Eager use outside a compiled graph: torch's fallback warns, naming the twin, and no gradient
    (rather than a wrong one) reaches the weight."""
    x, w, b, mask, alpha = reader_case(2, 4, 8, 6, torch.float32, seed=7)
    w = w.clone().requires_grad_()
    with pytest.warns(UserWarning, match="read_nograd: an autograd kernel was not registered"):
        OPS.read_nograd(x, w, b, mask, alpha).sum().backward()
    assert w.grad is None


def test_retarget_counts_and_leaves_other_ops():
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    node = graph.call_function(OPS.read.default, (x, x, None, x, None))
    other = graph.call_function(torch.ops.aten.relu.default, (node,))
    graph.output(other)
    assert retarget(graph) == 1
    assert node.target is NOGRAD_OPS[OPS.read.default] and other.target is torch.ops.aten.relu.default
