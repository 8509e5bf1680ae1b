"""The CPU backward kernels (codegen/cpu/backward.py) and the many-token dispatch (codegen/cpu/crossover.py)
against the reference: token counts 0, 1, 7, 130, 600; group sizes 3, 5, 32; fp32 and bf16; both
paths (grouped and dense-equivalent, forced and asserted through the PATHS counter); NaN in the
weights of groups no token uses stays out of every output and gradient; eager and compiled training
graphs give the same gradients. Truth is the reference in float64 (tests/codegen/kernel_cases.check)."""

import math

import pytest
import torch
from kernel_cases import check, f64

import mohdify.codegen  # noqa: F401  (registers torch.ops.mohdify.*)
from mohdify.codegen.cpu import crossover
from mohdify.codegen.cpu.backward import PATHS, read_backward_cpu, write_backward_cpu
from mohdify.codegen.cpu.plan import DECODE_MAX_TOKENS, plan_groups
from mohdify.codegen.read.naive import read_backward_naive
from mohdify.codegen.write.naive import write_backward_naive

OPS = torch.ops.mohdify
DTYPES = [torch.float32, torch.bfloat16]
# (tokens, groups, group size, O or I)
SHAPES = [(0, 4, 8, 7), (1, 16, 3, 37), (7, 5, 5, 11), (130, 8, 32, 23), (600, 16, 5, 19)]


@pytest.fixture
def force(monkeypatch):
    """force(kind, path): make the crossover table send every call of `kind` down `path`."""
    def set_path(kind: str, path: str) -> None:
        for name in ("GROUPED_WHEN", "GROUPED_WHEN_NATIVE"):   # the torch loops' table and the native kernels'
            table = dict(getattr(crossover, name))
            for dtype in DTYPES:
                table[(kind, dtype)] = [(0, 0, 1 << 62, 1.0)] if path == "grouped" else []
            monkeypatch.setattr(crossover, name, table)
    return set_path


def routing(gen, tokens, groups, density=0.35):
    mask = torch.rand(tokens, groups, generator=gen) < density                # [T, N]
    mask[:, 0] = True                                                         # a shared group
    if groups > 2:
        mask[:, -1] = False                                                   # a group no token uses
    return mask


def reader_case(tokens, groups, group_size, out, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dim = groups * group_size
    x = torch.randn(tokens, dim, generator=gen).to(dtype)                     # [T, D]
    w = (torch.randn(out, dim, generator=gen) / math.sqrt(dim)).to(dtype).t().contiguous().t()  # column-major
    mask = routing(gen, tokens, groups)
    alpha = (torch.rand(tokens, generator=gen) + 0.5).to(dtype)               # [T]
    grad = torch.randn(tokens, out, generator=gen).to(dtype)                  # [T, O]
    return grad, x, w, mask, alpha


def writer_case(tokens, groups, group_size, inner, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dim = groups * group_size
    u = torch.randn(tokens, inner, generator=gen).to(dtype)                   # [T, I]
    w = (torch.randn(dim, inner, generator=gen) / math.sqrt(inner)).to(dtype)  # [D, I]
    b = torch.randn(dim, generator=gen).to(dtype)                             # [D]
    mask = routing(gen, tokens, groups)
    gates = ((torch.rand(tokens, groups, generator=gen) + 0.5) * mask).to(dtype)  # [T, N]
    fusion = (torch.eye(groups) + 0.1 * torch.randn(groups, groups, generator=gen)).to(dtype)
    grad = torch.randn(tokens, dim, generator=gen).to(dtype)                  # [T, D]
    return grad, u, w, b, gates, fusion


def _expected_path(tokens: int, forced: str) -> str:
    """Few tokens (decode) always take the grouped loops; otherwise the forced path."""
    return "empty" if tokens == 0 else "grouped" if tokens <= DECODE_MAX_TOKENS else forced


def _f64(*args):
    return [f64(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]


@pytest.mark.parametrize("path", ["grouped", "dense"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_read_backward_matches_reference(shape, dtype, path, force):
    force("read_backward", path)
    grad, x, w, mask, alpha = reader_case(*shape, dtype)
    for a in (alpha, None):
        PATHS.clear()
        got = read_backward_cpu(grad, x, w, True, mask, a)
        ran = _expected_path(shape[0], path)
        assert PATHS == {f"read_backward:{ran}": 1}, f"read_backward {shape}: ran {dict(PATHS)}, wanted {ran}"
        truth = read_backward_naive(*_f64(grad, x, w, True, mask, a))
        at_dtype = read_backward_naive(grad, x, w, True, mask, a)
        for name, g, t, r in zip(("grad_x", "grad_w", "grad_b", "grad_alpha"), got, truth, at_dtype):
            if t is None:
                assert g is None, f"{name} must be None without alpha"
                continue
            assert g.shape == t.shape and g.dtype == r.dtype, f"{name}: {g.shape} {g.dtype} vs {t.shape} {r.dtype}"
            if shape[0]:
                check(g, t, r, f"read_backward {shape} {path} alpha={a is not None} {name}", dtype)
        assert got[1].stride() == w.stride(), "grad_w comes back in the weight's (column-major) layout"


@pytest.mark.parametrize("path", ["grouped", "dense"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_write_backward_matches_reference(shape, dtype, path, force):
    force("write_backward", path)
    grad, u, w, b, gates, fusion = writer_case(*shape, dtype)
    active = gates != 0
    for mix in (fusion, None):
        for bias in (b, None):
            PATHS.clear()
            got = write_backward_cpu(grad, u, w, bias, gates, mix)
            ran = _expected_path(shape[0], path)
            assert PATHS == {f"write_backward:{ran}": 1}, f"write_backward {shape}: ran {dict(PATHS)}"
            truth = list(write_backward_naive(*_f64(grad, u, w, bias, gates, mix)))
            at_dtype = list(write_backward_naive(grad, u, w, bias, gates, mix))
            truth[3], at_dtype[3] = truth[3] * active, at_dtype[3] * active   # zero gates: zero gradient
            for name, g, t, r in zip(("grad_u", "grad_w", "grad_b", "grad_gates", "grad_fusion"), got, truth, at_dtype):
                if t is None:
                    assert g is None, f"{name} must be None"
                    continue
                assert g.shape == t.shape, f"{name}: {g.shape} vs {t.shape}"
                if shape[0]:
                    check(g, t, r, f"write_backward {shape} {path} fusion={mix is not None} {name}", dtype)
            assert torch.equal(got[3][~active], torch.zeros_like(got[3][~active])), "zero gates get zero gradient"


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_backward_reads_z_from_the_output(dtype):
    """Given the forward's output (no fusion), the gates' gradient is <grad, out> / gate: the same
    numbers as recomputing z = W u + b, without the matmul."""
    grad, u, w, b, gates, _ = writer_case(130, 8, 32, 23, dtype, seed=4)
    out = OPS.write(u, w, b, gates, None)
    from_out = write_backward_cpu(grad, u, w, b, gates, None, True, out)
    recomputed = write_backward_cpu(grad, u, w, b, gates, None, True)
    truth = write_backward_naive(*_f64(grad, u, w, b, gates, None))[3] * (gates != 0)
    check(from_out[3], truth, recomputed[3], "grad_gates from the saved output", dtype)
    for a, r in zip(from_out[:3], recomputed[:3]):
        assert torch.equal(a, r), "only the gates' gradient may differ"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [7, 130, 600])
def test_nan_in_unused_groups_stays_out_of_the_grouped_backward(tokens, dtype, force):
    """The weights of a group no token uses are NaN: the grouped path never reads them, so every
    gradient is finite, and the unused rows / columns of grad_w are exactly zero."""
    force("read_backward", "grouped")
    force("write_backward", "grouped")
    group_size = 8
    grad, x, w, mask, alpha = reader_case(tokens, 6, group_size, 13, dtype, seed=5)
    unused = ~mask.any(0)                                                     # [N]
    assert unused.any(), "the case must leave a group unused"
    cols = unused.repeat_interleave(group_size)
    w = w.clone()
    w[:, cols] = float("nan")
    gx, gw, gb, ga = read_backward_cpu(grad, x, w, True, mask, alpha)
    for name, g in (("grad_x", gx), ("grad_b", gb), ("grad_alpha", ga)):
        assert torch.isfinite(g).all(), f"read_backward {name}: NaN from unused groups {unused.nonzero().tolist()}"
    assert torch.isfinite(gw[:, ~cols]).all() and (gw[:, cols] == 0).all(), "unused groups' grad_w is zero"
    grad, u, w2, b2, gates, fusion = writer_case(tokens, 6, group_size, 13, dtype, seed=6)
    rows = (~(gates != 0).any(0)).repeat_interleave(group_size)
    w2, b2 = w2.clone(), b2.clone()
    w2[rows], b2[rows] = float("nan"), float("nan")
    got = write_backward_cpu(grad, u, w2, b2, gates, fusion)
    for name, g in zip(("grad_u", "grad_b", "grad_gates", "grad_fusion"), (got[0], got[2], got[3], got[4])):
        assert torch.isfinite(g).all(), f"write_backward {name}: NaN from unused groups"
    assert torch.isfinite(got[1][~rows]).all() and (got[1][rows] == 0).all(), "unused groups' grad_w is zero"


def test_crossover_dispatch():
    """The table decides: narrow groups (G 8, train_lm's D 128) always dense; G 32 grouped at low
    density, dense at high; bf16 dense (no bf16 row)."""
    gen = torch.Generator().manual_seed(0)
    sparse = torch.rand(512, 16, generator=gen) < 0.2                          # ~20% active
    sparse[:, 0] = True
    busy = torch.rand(512, 16, generator=gen) < 0.8
    for kind in ("read", "write", "read_backward", "write_backward"):
        assert plan_groups(sparse, torch.float32, kind, 32).path == "grouped", kind
        assert plan_groups(sparse, torch.float32, kind, 8).path == "dense", kind
        assert plan_groups(busy, torch.float32, kind, 32).path == "dense", kind
        assert plan_groups(sparse, torch.bfloat16, kind, 32).path == "dense", kind
    assert crossover.grouped_pays("read", torch.float32, 128, 2048, 0.25)
    assert not crossover.grouped_pays("read", torch.float32, 128, 2048, 0.5)   # big gathers: dense
    assert crossover.grouped_pays("read", torch.float32, 128, 512, 0.5)
    assert not crossover.grouped_pays("nothing", torch.float32, 128, 2048, 0.01)


def test_empty_and_errors():
    grad, x, w, mask, alpha = reader_case(0, 4, 8, 7, torch.float32)
    gx, gw, gb, ga = read_backward_cpu(grad, x, w, True, mask, alpha)
    assert gx.shape == (0, 32) and torch.equal(gw, torch.zeros_like(w)) and gb.shape == (7,) and ga.shape == (0,)
    with pytest.raises(ValueError, match=r"^mohdify::read_backward: mask has 3 groups"):
        read_backward_cpu(grad, x, w, True, mask[:, :3], alpha)
    grad, u, w2, b2, gates, fusion = writer_case(2, 4, 4, 5, torch.float32)
    with pytest.raises(ValueError, match=r"^mohdify::write_backward: fusion has shape \(3, 3\)"):
        write_backward_cpu(grad, u, w2, b2, gates, fusion[:3, :3])
    with pytest.raises(ValueError, match=r"^mohdify::write_backward: grad has shape \(1, 16\): required \[2, 16\]"):
        write_backward_cpu(grad[:1], u, w2, b2, gates, fusion)


def _branch_loss(x, w_up, router, w_down, routed, top_k, naive=False):
    """A MoHD MLP branch with a learned router, through the ops (or the reference functions, whose
    gradients come from plain autograd): loss + balance loss."""
    from mohdify.codegen import read_naive, write_naive
    from mohdify.routing import route_tokens
    read, write = (read_naive, write_naive) if naive else (OPS.read, OPS.write)
    shared = torch.arange(0, w_up.shape[1] // 32 - routed)
    routed_idx = torch.arange(shared.numel(), w_up.shape[1] // 32)
    r = route_tokens(x, "learned", router, shared, routed_idx, top_k, "norm", 0.5, balance=True)
    h = torch.relu(read(x, w_up, None, r.mask, r.scale))                      # [T, F]
    out = write(h, w_down, None, r.gates, None)                               # [T, D]
    return (out * out).mean() + 0.01 * r.balance


@pytest.mark.parametrize("tokens", [130, 600])
def test_training_graph_eager_and_compiled_agree(tokens, fresh_dynamo):
    """Forward + balance loss + backward: the grouped CPU kernels eager, the same graph under
    torch.compile(backend="mohd") (AOT autograd traces the backward ops); gradients of the input,
    the weights and the router equal each other and the float64 reference autograd."""
    gen = torch.Generator().manual_seed(7)
    dim, ffn = 256, 48                                                        # 8 groups of 32
    x = torch.randn(tokens, dim, generator=gen)
    w_up = (torch.randn(ffn, dim, generator=gen) / 16).t().contiguous().t()  # column-major reader
    w_down = torch.randn(dim, ffn, generator=gen) / 7
    router = torch.randn(7, dim, generator=gen) / 16
    leaves = [t.clone().requires_grad_() for t in (x, w_up, router, w_down)]
    PATHS.clear()
    loss = _branch_loss(*leaves, routed=7, top_k=1)                           # 2 of 8 groups per token: grouped
    eager = torch.autograd.grad(loss, leaves)
    assert PATHS["read_backward:grouped"] == 1 and PATHS["write_backward:grouped"] == 1, dict(PATHS)
    leaves_c = [t.clone().requires_grad_() for t in (x, w_up, router, w_down)]
    fn = torch.compile(lambda *a: _branch_loss(*a, routed=7, top_k=1), backend="mohd", fullgraph=True)
    PATHS.clear()
    compiled = torch.autograd.grad(fn(*leaves_c), leaves_c)
    assert PATHS["read_backward:grouped"] == 1 and PATHS["write_backward:grouped"] == 1, dict(PATHS)
    for name, a, c in zip(("x", "w_up", "router", "w_down"), eager, compiled):
        torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6, msg=f"compiled grad {name} vs eager")
    leaves_r = [t.double().requires_grad_() for t in (x, w_up, router, w_down)]
    reference = torch.autograd.grad(_branch_loss(*leaves_r, routed=7, top_k=1, naive=True), leaves_r)
    for name, a, r in zip(("x", "w_up", "router", "w_down"), eager, reference):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-6, msg=f"eager grad {name} vs float64 autograd")
    assert eager[2].abs().sum() > 0, "the router gets a gradient"
