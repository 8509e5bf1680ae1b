"""The fused reader (`read_triton`, `read_backward_triton`) against the reference, under the Triton
interpreter on CPU: hypothesis draws shapes (odd T, groups of 16/32/64, N 2..8), masks, dtypes,
seeds and launch configs (including the split-over-groups atomic path)."""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from kernel_cases import Case, cases, check, f64, mask_of, randn

from mohdify.codegen.launch_common import KernelConfig
from mohdify.codegen.read.backward import read_backward_triton
from mohdify.codegen.read.launch import read_triton
from mohdify.codegen.read.naive import read_backward_naive, read_naive

pytestmark = pytest.mark.interpreter   # Triton kernels on CPU tensors: TRITON_INTERPRET=1

DECODE = Case(seed=1, tokens=1, groups=4, group_size=64, other=80, dtype=torch.bfloat16, density=0.5,
              has_bias=True, has_extra=True, config=KernelConfig(16, 32, 16, split=3))
PREFILL_ODD = Case(seed=2, tokens=33, groups=8, group_size=16, other=37, dtype=torch.float16, density=0.6,
                   has_bias=False, has_extra=True, config=None)


def inputs(case: Case):
    gen = case.gen()
    x = randn(gen, case.dtype, case.tokens, case.dim)                         # [T, D]
    weight = randn(gen, case.dtype, case.other, case.dim) / math.sqrt(case.dim)  # [O, D]
    bias = randn(gen, case.dtype, case.other) if case.has_bias else None      # [O]
    mask = mask_of(gen, case)                                                 # [T, N]
    alpha = (torch.rand(case.tokens, generator=gen) + 0.5).to(case.dtype) if case.has_extra else None  # [T]
    return x, weight, bias, mask, alpha


@given(case=cases(writer=False))
@example(case=DECODE)
@example(case=PREFILL_ODD)
def test_read_forward_matches_reference(case):
    x, weight, bias, mask, alpha = inputs(case)
    y = read_triton(x, weight, bias, mask, alpha, config=case.config)         # [T, O]
    truth = read_naive(f64(x), f64(weight), f64(bias), mask, f64(alpha))
    check(y, truth, read_naive(x, weight, bias, mask, alpha), f"read y (config {case.config})", case.dtype)


@given(case=cases(writer=False))
@example(case=DECODE)
def test_read_backward_matches_reference(case):
    x, weight, bias, mask, alpha = inputs(case)
    grad = randn(case.gen(), case.dtype, case.tokens, case.other)             # [T, O]
    got = read_backward_triton(grad, x, weight, bias is not None, mask, alpha)
    truth = read_backward_naive(f64(grad), f64(x), f64(weight), bias is not None, mask, f64(alpha))
    at_dtype = read_backward_naive(grad, x, weight, bias is not None, mask, alpha)
    for name, g, t, a in zip(("grad_x", "grad_w", "grad_b", "grad_alpha"), got, truth, at_dtype):
        check(g, t, a, f"read {name}", case.dtype)


@given(seed=st.integers(0, 2**31 - 1), tokens=st.integers(1, 24), split=st.integers(1, 3))
def test_read_never_touches_inactive_groups(seed, tokens, split):
    """Weight columns of groups no token uses are NaN: a kernel that loaded them would return NaN."""
    gen = torch.Generator().manual_seed(seed)
    groups, group_size, out = 4, 32, 24
    x = torch.randn(tokens, groups * group_size, generator=gen)               # [T, D]
    weight = torch.randn(out, groups * group_size, generator=gen)             # [O, D]
    mask = torch.rand(tokens, groups, generator=gen) < 0.5                    # [T, N]
    mask[:, 1] = False
    mask[0, 2] = True
    poisoned = weight.clone()
    poisoned[:, group_size:2 * group_size] = float("nan")                    # group 1: inactive everywhere
    y = read_triton(x, poisoned, None, mask, None, config=KernelConfig(16, 16, 16, split=split))
    assert torch.isfinite(y).all(), f"read y has {(~torch.isfinite(y)).sum().item()} non-finite entries"
    check(y, read_naive(f64(x), f64(weight), None, mask, None), None, "read y (poisoned group 1)", torch.float32)


def test_read_takes_transposed_and_strided_inputs():
    """GPT-2's Conv1D hands the reader weight.t() (non-contiguous): strides are honoured."""
    gen = torch.Generator().manual_seed(3)
    conv_weight = torch.randn(64, 40, generator=gen)                          # [D, O] as Conv1D stores it
    x = torch.randn(5, 128, generator=gen)[:, ::2]                            # [T, D] with stride 2
    mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    y = read_triton(x, conv_weight.t(), None, mask, None)
    check(y, read_naive(f64(x), f64(conv_weight.t()), None, mask, None), None, "read y (weight.t())", torch.float32)
    assert torch.equal(y[1], torch.zeros(40)), "token 1 has no active group: its output must be exactly 0"
