"""`read_multi_triton` (all readers of one input in one launch per 4 weights) against the reference,
under the Triton interpreter on CPU, and the `mohdify::read_multi` op on CPU (reference, opcheck).

Hypothesis draws the number of weights (1..6: one launch, and two launches past 4), each weight's
out_features and bias, alpha, dtype, mask density and launch configs (split-over-groups path)."""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from kernel_cases import DTYPES, check, f64

from mohdify.codegen.launch_common import KernelConfig
from mohdify.codegen.read.launch import read_multi_triton
from mohdify.codegen.read.multi import read_multi_naive
from mohdify.codegen.read.naive import read_naive

pytestmark = pytest.mark.interpreter   # Triton kernels on CPU tensors: TRITON_INTERPRET=1


@st.composite
def multi_cases(draw):
    outs = draw(st.lists(st.integers(1, 48), min_size=1, max_size=6))
    config = None
    if draw(st.booleans()):
        config = KernelConfig(block_m=draw(st.sampled_from([16, 32])), block_n=draw(st.sampled_from([16, 32])),
                              block_k=16, split=draw(st.integers(1, 3)))
    return dict(seed=draw(st.integers(0, 2**31 - 1)), tokens=draw(st.sampled_from([1, 5, 17, 33])),
                groups=draw(st.integers(2, 4)), group_size=draw(st.sampled_from([16, 32])), outs=outs,
                biases=[draw(st.booleans()) for _ in outs], has_alpha=draw(st.booleans()),
                dtype=draw(st.sampled_from(DTYPES)), density=draw(st.sampled_from([0.0, 0.5, 1.0])), config=config)


def make(c):
    gen = torch.Generator().manual_seed(c["seed"])
    dim, dtype = c["groups"] * c["group_size"], c["dtype"]
    x = torch.randn(c["tokens"], dim, generator=gen).to(dtype)                                  # [T, D]
    weights = [(torch.randn(o, dim, generator=gen) / math.sqrt(dim)).to(dtype) for o in c["outs"]]  # [O_i, D]
    biases = [torch.randn(o, generator=gen).to(dtype) if b else None for o, b in zip(c["outs"], c["biases"])]
    mask = torch.rand(c["tokens"], c["groups"], generator=gen) < c["density"]                   # [T, N]
    alpha = (torch.rand(c["tokens"], generator=gen) + 0.5).to(dtype) if c["has_alpha"] else None  # [T]
    return x, weights, biases, mask, alpha


QKV_DECODE = dict(seed=3, tokens=1, groups=4, group_size=32, outs=[64, 32, 32], biases=[True, False, True],
                  has_alpha=True, dtype=torch.bfloat16, density=0.5, config=KernelConfig(16, 16, 16, split=3))


@given(c=multi_cases())
@example(c=QKV_DECODE)
def test_read_multi_matches_reference_per_weight(c):
    x, weights, biases, mask, alpha = make(c)
    ys = read_multi_triton(x, weights, biases, mask, alpha, config=c["config"])
    assert len(ys) == len(weights)
    truth = read_multi_naive(f64(x), [f64(w) for w in weights], [f64(b) for b in biases], mask, f64(alpha))
    at_dtype = read_multi_naive(x, weights, biases, mask, alpha)
    for i, (y, t, a) in enumerate(zip(ys, truth, at_dtype)):
        check(y, t, a, f"read_multi y[{i}] of {len(weights)} (outs {c['outs']}, config {c['config']})", c["dtype"])


def test_read_multi_never_touches_inactive_groups_of_any_weight():
    """Columns of group 1 (inactive for every token) are NaN in every weight: loading them gives NaN."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 128, generator=gen)                                    # [T, D]
    weights = [torch.randn(o, 128, generator=gen) for o in (40, 24, 24, 8, 16)]  # 5: two launches
    mask = torch.rand(6, 4, generator=gen) < 0.6                              # [T, N]
    mask[:, 1] = False
    poisoned = [w.clone() for w in weights]
    for w in poisoned:
        w[:, 32:64] = float("nan")
    ys = read_multi_triton(x, poisoned, [None] * 5, mask, None, config=KernelConfig(16, 16, 16, split=2))
    for i, (y, w) in enumerate(zip(ys, weights)):
        assert torch.isfinite(y).all(), f"read_multi y[{i}] has non-finite entries"
        check(y, read_naive(f64(x), f64(w), None, mask, None), None, f"read_multi y[{i}] (poisoned group 1)",
              torch.float32)


def test_read_multi_op_on_cpu_is_the_reference_forward_and_backward():
    x, weights, biases, mask, alpha = make(dict(QKV_DECODE, dtype=torch.float32, tokens=5, biases=[True] * 3))
    leaves = [t.requires_grad_() for t in (x, *weights, *biases, alpha)]
    ys = torch.ops.mohdify.read_multi(x, weights, biases, mask, alpha)
    separate = [torch.ops.mohdify.read(x, w, b, mask, alpha) for w, b in zip(weights, biases)]
    for i, (y, s) in enumerate(zip(ys, separate)):
        assert torch.equal(y, s), f"CPU read_multi output {i} must be the separate read"
    grads = [torch.randn_like(y) for y in ys]
    got = torch.autograd.grad(ys, leaves, grads)
    want = torch.autograd.grad(separate, leaves, grads)
    names = ["x", "w0", "w1", "w2", "b0", "b1", "b2", "alpha"]
    for n, g, r in zip(names, got, want):
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6, msg=lambda m, n=n: f"read_multi grad of {n}: {m}")
    for args in [(x, weights, biases, mask, alpha), (x, weights, [None] * 3, mask, None)]:
        result = torch.library.opcheck(torch.ops.mohdify.read_multi.default, args)
        assert set(result.values()) == {"SUCCESS"}, f"opcheck mohdify::read_multi: {result}"
