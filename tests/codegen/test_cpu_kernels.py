"""The CPU kernels (codegen/cpu) against the reference: odd shapes (T = 0, 1, odd, past the decode /
prefill boundary; group sizes not multiples of anything; odd O and I), every option (bias, alpha,
fusion, gates, residual), fp32 and bf16, both weight layouts, forward and backward through the ops;
inactive groups' weights are never read (NaN there leaves the output finite); the path choice.

Truth is the reference in float64 on the same inputs (tests/codegen/kernel_cases.check: fp32 tight,
bf16 within twice plain torch's own bf16 error)."""

import math

import pytest
import torch
from kernel_cases import check, f64

import mohdify.codegen  # noqa: F401  (registers torch.ops.mohdify.*)
from mohdify.codegen.cpu import plan as cpu_plan
from mohdify.codegen.cpu.layout import is_column_major, lay_out_reader_weight, restore_row_major
from mohdify.codegen.cpu.read import read_cpu, read_multi_cpu
from mohdify.codegen.cpu.write import write_add_cpu, write_cpu
from mohdify.codegen.read.naive import read_backward_naive, read_naive
from mohdify.codegen.write.naive import write_backward_naive, write_naive

OPS = torch.ops.mohdify
DTYPES = [torch.float32, torch.bfloat16]
# (tokens, groups, group size, O or I): T = 0 and 1, odd T on both sides of DECODE_MAX_TOKENS = 16,
# group sizes 3 / 5 / 24, odd widths.
SHAPES = [(0, 4, 8, 7), (1, 16, 3, 37), (1, 4, 24, 50), (3, 5, 5, 11), (16, 8, 8, 33), (17, 8, 8, 33),
          (41, 6, 5, 19), (130, 8, 4, 23)]


def active(gen, tokens, groups, shared, density):
    """[T, N] bool: groups [0, shared) always on, the others on with probability `density`."""
    mask = torch.rand(tokens, groups, generator=gen) < density                # [T, N]
    mask[:, :shared] = True
    return mask


def reader_case(tokens, groups, group_size, out, dtype, *, density=0.3, column_major=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dim = groups * group_size
    x = torch.randn(tokens, dim, generator=gen).to(dtype)                     # [T, D]
    w = (torch.randn(out, dim, generator=gen) / math.sqrt(dim)).to(dtype)     # [O, D]
    if column_major:
        w = w.t().contiguous().t()                                            # strides (1, O)
    b = torch.randn(out, generator=gen).to(dtype)                             # [O]
    mask = active(gen, tokens, groups, 1, density)                            # [T, N]
    alpha = (torch.rand(tokens, generator=gen) + 0.5).to(dtype)               # [T]
    return x, w, b, mask, alpha


def writer_case(tokens, groups, group_size, inner, dtype, *, density=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dim = groups * group_size
    u = torch.randn(tokens, inner, generator=gen).to(dtype)                   # [T, I]
    w = (torch.randn(dim, inner, generator=gen) / math.sqrt(inner)).to(dtype)  # [D, I]
    b = torch.randn(dim, generator=gen).to(dtype)                             # [D]
    gates = (torch.rand(tokens, groups, generator=gen) + 0.5) * active(gen, tokens, groups, 1, density)
    fusion = torch.eye(groups) + 0.1 * torch.randn(groups, groups, generator=gen)  # [N, N]
    residual = torch.randn(tokens, dim, generator=gen).to(dtype)              # [T, D]
    return u, w, b, gates.to(dtype), fusion.to(dtype), residual


def _truth(fn, *args):
    return fn(*(f64(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_read_cpu_matches_reference(shape, dtype):
    x, w, b, mask, alpha = reader_case(*shape, dtype)
    for bias in (b, None):
        for a in (alpha, None):
            for weight in (w, w.contiguous()):   # column-major (as laid out at rewrite) and row-major
                what = f"read {shape} bias={bias is not None} alpha={a is not None} col={is_column_major(weight)}"
                y = read_cpu(x, weight, bias, mask, a)                        # [T, O]
                if x.shape[0] == 0:
                    assert y.shape == (0, w.shape[0]) and y.dtype == dtype, what
                    continue
                truth = _truth(read_naive, x, weight, bias, mask, a)
                check(y, truth, read_naive(x, weight, bias, mask, a), what, dtype)
    if x.shape[0]:
        ys = read_multi_cpu(x, [w, w[:5], w], [b, None, b], mask, alpha)
        for got, weight, bias in zip(ys, (w, w[:5], w), (b, None, b)):
            assert torch.equal(got, read_cpu(x, weight, bias, mask, alpha)), "read_multi differs from read"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_write_cpu_matches_reference(shape, dtype):
    u, w, b, gates, fusion, residual = writer_case(*shape, dtype)
    for bias in (b, None):
        for mix in (fusion, None):
            what = f"write {shape} bias={bias is not None} fusion={mix is not None}"
            o = write_cpu(u, w, bias, gates, mix)                             # [T, D]
            if u.shape[0] == 0:
                assert o.shape == (0, w.shape[0]) and o.dtype == dtype, what
                continue
            check(o, _truth(write_naive, u, w, bias, gates, mix), write_naive(u, w, bias, gates, mix), what, dtype)
            assert torch.equal(write_add_cpu(u, w, bias, gates, mix, residual), o + residual), what


@pytest.mark.parametrize("tokens", [1, 5, 40])
def test_ops_forward_and_backward_through_cpu_kernels(tokens):
    x, w, b, mask, alpha = reader_case(tokens, 8, 6, 21, torch.float32, seed=3)
    x, w, b, alpha = (t.requires_grad_() for t in (x, w, b, alpha))
    y = OPS.read(x, w, b, mask, alpha)
    assert torch.equal(y, read_cpu(x.detach(), w.detach(), b.detach(), mask, alpha.detach())), "read dispatch"
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b, alpha), grad)
    want = read_backward_naive(grad, x.detach(), w.detach(), True, mask, alpha.detach())
    for name, g, r in zip(("x", "weight", "bias", "alpha"), got, want):   # codegen/cpu/backward.py
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=f"read grad_{name} vs the reference backward")
    u, w2, b2, gates, fusion, residual = writer_case(tokens, 8, 6, 21, torch.float32, seed=4)
    u, w2, b2, gates, fusion, residual = (t.requires_grad_() for t in (u, w2, b2, gates, fusion, residual))
    o = OPS.write_add(u, w2, b2, gates, fusion, residual)
    assert torch.equal(o, OPS.write(u, w2, b2, gates, fusion) + residual), "write_add is write + residual"
    grad = torch.randn_like(o)
    got = torch.autograd.grad(o, (u, w2, b2, gates, fusion, residual), grad)
    want = list(write_backward_naive(grad, *(t.detach() for t in (u, w2, b2, gates, fusion))))
    want[3] = want[3] * (gates != 0)   # the CPU backward gives zero gates a zero gradient (cpu/backward.py)
    for name, g, r in zip(("u", "weight", "bias", "gates", "fusion", "residual"), got, (*want, grad)):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=f"write_add grad_{name} vs the reference")
    ys = OPS.read_multi(x, [w, w], [b, b], mask, alpha)
    assert all(torch.equal(a, y) for a in ys), "read_multi on CPU must equal read"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_inactive_groups_weights_are_never_read_at_decode(tokens, dtype):
    """Weights of groups no token uses are NaN: a kernel that read them would return NaN."""
    groups, group_size = 16, 8
    x, w, b, mask, alpha = reader_case(tokens, groups, group_size, 30, dtype, density=0.1, seed=5)
    unused = ~mask.any(0)                                                     # [N]
    assert unused.any(), "the case must leave some group unused"
    cols = unused.repeat_interleave(group_size)                               # [D]
    w = w.clone()
    w[:, cols] = float("nan")
    y = OPS.read(x, w, b, mask, alpha)
    assert torch.isfinite(y).all(), f"read: NaN from the weight columns of unused groups {unused.nonzero().tolist()}"
    u, w2, b2, gates, fusion, residual = writer_case(tokens, groups, group_size, 30, dtype, density=0.1, seed=6)
    unused = ~(gates != 0).any(0)
    rows = unused.repeat_interleave(group_size)
    w2 = w2.clone()
    w2[rows] = float("nan")
    b2 = b2.clone()
    b2[rows] = float("nan")
    o = OPS.write_add(u, w2, b2, gates, fusion, residual)
    assert torch.isfinite(o).all(), f"write: NaN from the weight rows of unused groups {unused.nonzero().tolist()}"


def test_paths_and_layout():
    dt = torch.float32
    many = torch.zeros(64, 16, dtype=torch.bool)
    many[:, :2] = True
    many[torch.arange(64), 2 + torch.arange(64) % 14] = True                   # delta 3/16 per token
    for kind in ("read", "write"):
        assert cpu_plan.plan_groups(many[:1], dt, kind).path == "decode"
        assert cpu_plan.plan_groups(many, dt, kind).path == "grouped"
        assert cpu_plan.plan_groups(many, torch.bfloat16, kind).path == "dense"   # bf16 prefill: dense is faster
        assert cpu_plan.plan_groups(torch.ones(3, 4, dtype=torch.bool), dt, kind).path == "dense"
    half = many.clone()
    half[:, 2:8] = True                                                        # 8 or 9 of 16 groups per token
    assert cpu_plan.plan_groups(half, dt, "write").path == "dense"
    assert cpu_plan.runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (5, 7), (9, 10)]
    layer = torch.nn.Linear(12, 7)
    before = layer.weight.detach().clone()
    param = layer.weight
    lay_out_reader_weight(layer)
    assert layer.weight is param and is_column_major(layer.weight) and torch.equal(layer.weight, before)
    assert torch.equal(layer.state_dict()["weight"], before)
    restore_row_major(layer)
    assert layer.weight.is_contiguous() and torch.equal(layer.weight, before)


def test_errors_name_what_was_passed():
    x, w, b, mask, alpha = reader_case(2, 4, 4, 5, torch.float32)
    with pytest.raises(ValueError, match=r"mask has 3 groups, which does not divide x.shape\[1\] = 16"):
        read_cpu(x, w, b, mask[:, :3], alpha)
    with pytest.raises(ValueError, match=r"weight has dtype torch.bfloat16, but the input has torch.float32"):
        read_cpu(x, w.bfloat16(), b, mask, alpha)
    u, w2, b2, gates, fusion, _ = writer_case(2, 4, 4, 5, torch.float32)
    with pytest.raises(ValueError, match=r"^mohdify::write: fusion has shape \(3, 3\): required \[4, 4\]"):
        write_cpu(u, w2, b2, gates, fusion[:3, :3])


def test_backend_compiled_graph_runs_the_cpu_kernels(fresh_dynamo):
    """Under torch.compile(backend="mohd") (inductor) the MoHD ops still reach the CPU kernels: NaN
    weights of groups no token uses leave the output finite (the reference would return NaN), and the
    result equals eager."""
    x, w, b, mask, alpha = reader_case(1, 8, 8, 24, torch.float32, density=0.0, seed=7)   # group 0 only
    u, w2, b2, gates, _, residual = writer_case(1, 8, 8, 24, torch.float32, density=0.0, seed=8)
    w = w.clone()
    w[:, 8:] = float("nan")                                                   # groups 1..7 unused
    w2 = w2.clone()
    w2[8:] = float("nan")

    def branch(x, u, residual):
        y = OPS.read(x, w, b, mask, alpha)                                    # [1, 24]
        return OPS.write(u + y.sum(), w2, b2, gates, None) + residual         # [1, 64]

    got = torch.compile(branch, backend="mohd", fullgraph=True)(x, u, residual)
    assert torch.isfinite(got).all(), "the compiled graph ran the reference, not the CPU kernels"
    assert torch.allclose(got, branch(x, u, residual), atol=1e-5, rtol=1e-5), "compiled differs from eager"
