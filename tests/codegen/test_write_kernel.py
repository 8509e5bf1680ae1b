"""The fused writer (`write_triton`, `write_backward_triton`) against the reference, under the Triton
interpreter on CPU: shapes, gates (zero for inactive groups), fusion (none, identity, dense),
residual, dtypes, seeds and configs (including the split-over-I atomic path)."""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from kernel_cases import Case, cases, check, f64, mask_of, randn

from mohdify.codegen.launch_common import KernelConfig
from mohdify.codegen.write.backward import write_backward_triton
from mohdify.codegen.write.launch import write_triton
from mohdify.codegen.write.naive import write_backward_naive, write_naive

pytestmark = pytest.mark.interpreter   # Triton kernels on CPU tensors: TRITON_INTERPRET=1

DECODE = Case(seed=4, tokens=1, groups=4, group_size=64, other=96, dtype=torch.bfloat16, density=0.5,
              has_bias=True, has_extra=True, config=KernelConfig(16, 16, 32, split=3))
PREFILL_ODD = Case(seed=5, tokens=33, groups=8, group_size=16, other=45, dtype=torch.float16, density=0.3,
                   has_bias=False, has_extra=True, config=None)


def inputs(case: Case, fusion_kind: str):
    gen = case.gen()
    u = randn(gen, case.dtype, case.tokens, case.other)                       # [T, I]
    weight = randn(gen, case.dtype, case.dim, case.other) / math.sqrt(case.other)  # [D, I]
    bias = randn(gen, case.dtype, case.dim) if case.has_bias else None        # [D]
    gates = (torch.randn(case.tokens, case.groups, generator=gen) * mask_of(gen, case)).to(case.dtype)  # [T, N]
    fusion = None
    if case.has_extra:
        dense = torch.randn(case.groups, case.groups, generator=gen) / math.sqrt(case.groups)
        fusion = (torch.eye(case.groups) if fusion_kind == "identity" else dense).to(case.dtype)  # [N, N]
    return u, weight, bias, gates, fusion


@given(case=cases(writer=True), fusion_kind=st.sampled_from(["identity", "dense"]), with_residual=st.booleans())
@example(case=DECODE, fusion_kind="dense", with_residual=True)
@example(case=PREFILL_ODD, fusion_kind="identity", with_residual=False)
def test_write_forward_matches_reference(case, fusion_kind, with_residual):
    u, weight, bias, gates, fusion = inputs(case, fusion_kind)
    residual = randn(case.gen(), case.dtype, case.tokens, case.dim) if with_residual else None  # [T, D]
    o = write_triton(u, weight, bias, gates, fusion, residual=residual, config=case.config)  # [T, D]
    truth = write_naive(f64(u), f64(weight), f64(bias), f64(gates), f64(fusion))
    at_dtype = write_naive(u, weight, bias, gates, fusion)
    if residual is not None:
        truth, at_dtype = truth + f64(residual), at_dtype + residual
    check(o, truth, at_dtype, f"write o (fusion {fusion_kind if fusion is not None else None}, config {case.config})",
          case.dtype)


@given(case=cases(writer=True), fusion_kind=st.sampled_from(["identity", "dense"]))
@example(case=DECODE, fusion_kind="dense")
def test_write_backward_matches_reference(case, fusion_kind):
    u, weight, bias, gates, fusion = inputs(case, fusion_kind)
    grad = randn(case.gen(), case.dtype, case.tokens, case.dim)               # [T, D]
    got = write_backward_triton(grad, u, weight, bias, gates, fusion)
    truth = write_backward_naive(f64(grad), f64(u), f64(weight), f64(bias), f64(gates), f64(fusion))
    at_dtype = write_backward_naive(grad, u, weight, bias, gates, fusion)
    for name, g, t, a in zip(("grad_u", "grad_w", "grad_b", "grad_gates", "grad_fusion"), got, truth, at_dtype):
        check(g, t, a, f"write {name}", case.dtype)


@given(seed=st.integers(0, 2**31 - 1), tokens=st.integers(1, 24), split=st.integers(1, 3), mixed=st.booleans())
def test_write_never_touches_inactive_groups(seed, tokens, split, mixed):
    """Weight rows (and bias) of a group no token uses are NaN: loading them would return NaN."""
    gen = torch.Generator().manual_seed(seed)
    groups, group_size, inner = 4, 16, 40
    u = torch.randn(tokens, inner, generator=gen)                             # [T, I]
    weight = torch.randn(groups * group_size, inner, generator=gen)           # [D, I]
    bias = torch.randn(groups * group_size, generator=gen)                    # [D]
    gates = torch.rand(tokens, groups, generator=gen)                         # [T, N]
    gates[:, 3] = 0.0
    fusion = torch.randn(groups, groups, generator=gen) if mixed else None    # [N, N]
    bad_w, bad_b = weight.clone(), bias.clone()
    bad_w[3 * group_size:] = float("nan")                                     # group 3: inactive everywhere
    bad_b[3 * group_size:] = float("nan")
    o = write_triton(u, bad_w, bad_b, gates, fusion, config=KernelConfig(16, 16, 16, split=split))
    assert torch.isfinite(o).all(), f"write o has {(~torch.isfinite(o)).sum().item()} non-finite entries"
    truth = write_naive(f64(u), f64(weight), f64(bias), f64(gates), f64(fusion))
    check(o, truth, None, "write o (poisoned group 3)", torch.float32)
    if not mixed:
        assert torch.equal(o[:, 3 * group_size:], torch.zeros(tokens, group_size)), "inactive rows must be exactly 0"
