"""How the custom ops reach the kernels: on CPU the forward runs the CPU kernels (codegen/cpu) and the
backward the reference (bit for bit, through the backward custom ops), the ops pass opcheck, and on
CUDA they run the Triton kernels.

The CUDA tests need a real GPU with the interpreter off (`MOHDIFY_TEST_CUDA=1 pytest tests/codegen`);
elsewhere they skip."""

import math

import pytest
import torch
from conftest import TOLERANCES
from kernel_cases import check, f64

import mohdify.codegen  # noqa: F401  (registers torch.ops.mohdify.*)
from mohdify.codegen.launch_common import interpreting
from mohdify.codegen.read.naive import read_backward_naive, read_naive
from mohdify.codegen.write.naive import write_backward_naive, write_naive

gpu = pytest.mark.skipif(not torch.cuda.is_available() or interpreting(),
                         reason="needs a CUDA device with TRITON_INTERPRET unset (set MOHDIFY_TEST_CUDA=1)")


def reader_inputs(tokens, dim, groups, out, dtype, device, grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, dim, generator=gen)                               # [T, D]
    w = torch.randn(out, dim, generator=gen) / math.sqrt(dim)                 # [O, D]
    b = torch.randn(out, generator=gen)                                       # [O]
    mask = torch.rand(tokens, groups, generator=gen) < 0.5                    # [T, N]
    alpha = torch.rand(tokens, generator=gen) + 0.5                           # [T]
    ts = [t.to(device=device, dtype=dtype).requires_grad_(grad) for t in (x, w, b, alpha)]
    return ts[0], ts[1], ts[2], mask.to(device), ts[3]


def writer_inputs(tokens, dim, groups, inner, dtype, device, grad=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(tokens, inner, generator=gen)                             # [T, I]
    w = torch.randn(dim, inner, generator=gen) / math.sqrt(inner)             # [D, I]
    b = torch.randn(dim, generator=gen)                                       # [D]
    gates = torch.rand(tokens, groups, generator=gen) * (torch.rand(tokens, groups, generator=gen) < 0.5)  # [T, N]
    fusion = torch.eye(groups) + 0.1 * torch.randn(groups, groups, generator=gen)  # [N, N]
    return [t.to(device=device, dtype=dtype).requires_grad_(grad) for t in (u, w, b, gates, fusion)]


def test_cpu_ops_run_the_cpu_kernels_forward_and_backward():
    from mohdify.codegen.cpu.read import read_cpu
    from mohdify.codegen.cpu.write import write_cpu

    x, w, b, mask, alpha = reader_inputs(5, 64, 4, 24, torch.float32, "cpu", grad=True)
    y = torch.ops.mohdify.read(x, w, b, mask, alpha)
    assert torch.equal(y, read_cpu(x.detach(), w.detach(), b.detach(), mask, alpha.detach())), \
        "CPU mohdify::read must run read_cpu"
    check(y, read_naive(*(f64(t) if t.is_floating_point() else t for t in (x, w, b, mask, alpha))),
          None, "CPU read vs reference", torch.float32)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b, alpha), grad)
    want = read_backward_naive(grad, x.detach(), w.detach(), True, mask, alpha.detach())
    for name, g, r in zip(("x", "weight", "bias", "alpha"), got, want):   # codegen/cpu/backward.py
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=f"CPU read grad_{name} vs read_backward_naive")
    u, w, b, gates, fusion = writer_inputs(5, 64, 4, 24, torch.float32, "cpu", grad=True)
    o = torch.ops.mohdify.write(u, w, b, gates, fusion)
    assert torch.equal(o, write_cpu(*(t.detach() for t in (u, w, b, gates, fusion)))), \
        "CPU mohdify::write must run write_cpu"
    check(o, write_naive(*(f64(t) for t in (u, w, b, gates, fusion))), None, "CPU write vs reference", torch.float32)
    grad = torch.randn_like(o)
    got = torch.autograd.grad(o, (u, w, b, gates, fusion), grad)
    want = list(write_backward_naive(grad, *(t.detach() for t in (u, w, b, gates, fusion))))
    want[3] = want[3] * (gates != 0)   # zero gates get a zero gradient on CPU (codegen/cpu/backward.py)
    for name, g, r in zip(("u", "weight", "bias", "gates", "fusion"), got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=f"CPU write grad_{name} vs write_backward_naive")


def test_ops_pass_opcheck_with_the_backward_ops():
    x, w, b, mask, alpha = reader_inputs(3, 32, 2, 8, torch.float32, "cpu", grad=True)
    for args in [(x, w, b, mask, alpha), (x, w, None, mask, None)]:
        result = torch.library.opcheck(torch.ops.mohdify.read.default, args)
        assert set(result.values()) == {"SUCCESS"}, f"opcheck mohdify::read: {result}"
    u, w, b, gates, fusion = writer_inputs(3, 32, 2, 8, torch.float32, "cpu", grad=True)
    for args in [(u, w, b, gates, fusion), (u, w, None, gates, None)]:
        result = torch.library.opcheck(torch.ops.mohdify.write.default, args)
        assert set(result.values()) == {"SUCCESS"}, f"opcheck mohdify::write: {result}"


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tokens, groups, group_size", [(1, 16, 256), (7, 8, 16), (300, 16, 64), (33, 4, 512)])
def test_cuda_ops_run_triton_and_match_reference(dtype, tokens, groups, group_size, monkeypatch):
    from mohdify.codegen.read import backward as read_backward
    from mohdify.codegen.read import launch as read_launch
    from mohdify.codegen.write import backward as write_backward
    from mohdify.codegen.write import launch as write_launch

    calls = []
    for module, name in ((read_launch, "read_triton"), (write_launch, "write_triton"),
                         (read_backward, "read_backward_triton"), (write_backward, "write_backward_triton")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    dim = groups * group_size
    x, w, b, mask, alpha = reader_inputs(tokens, dim, groups, 200, dtype, "cuda", grad=True)
    y = torch.ops.mohdify.read(x, w, b, mask, alpha)
    assert calls == ["read_triton"], f"mohdify::read on CUDA must dispatch to read_triton, called {calls}"
    check(y, read_naive(*(f64(t) if t.is_floating_point() else t for t in (x, w, b, mask, alpha))),
          read_naive(x, w, b, mask, alpha), "cuda read y", dtype)
    grad = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b, alpha), grad)
    assert "read_backward_triton" in calls, f"read backward on CUDA must use the kernels, called {calls}"
    truth = read_backward_naive(f64(grad), f64(x), f64(w), True, mask, f64(alpha))
    at_dtype = read_backward_naive(grad, x.detach(), w.detach(), True, mask, alpha.detach())
    for name, g, t, a in zip(("x", "weight", "bias", "alpha"), got, truth, at_dtype):
        check(g, t, a, f"cuda read grad_{name}", dtype)
    u, w, b, gates, fusion = writer_inputs(tokens, dim, groups, 200, dtype, "cuda", grad=True)
    calls.clear()
    o = torch.ops.mohdify.write(u, w, b, gates, fusion)
    assert calls == ["write_triton"], f"mohdify::write on CUDA must dispatch to write_triton, called {calls}"
    check(o, write_naive(*(f64(t) for t in (u, w, b, gates, fusion))), write_naive(u, w, b, gates, fusion),
          "cuda write o", dtype)
    grad = torch.randn_like(o)
    got = torch.autograd.grad(o, (u, w, b, gates, fusion), grad)
    assert "write_backward_triton" in calls, f"write backward on CUDA must use the kernels, called {calls}"
    truth = write_backward_naive(f64(grad), *(f64(t) for t in (u, w, b, gates, fusion)))
    at_dtype = write_backward_naive(grad, *(t.detach() for t in (u, w, b, gates, fusion)))
    for name, g, t, a in zip(("u", "weight", "bias", "gates", "fusion"), got, truth, at_dtype):
        check(g, t, a, f"cuda write grad_{name}", dtype)


@gpu
@pytest.mark.gpu
def test_cuda_compiled_ops_match_eager():
    x, w, b, mask, alpha = reader_inputs(9, 256, 4, 96, torch.float32, "cuda", grad=True)
    u, w2, b2, gates, fusion = writer_inputs(9, 256, 4, 96, torch.float32, "cuda", grad=True)

    def branch(x, w, b, alpha, w2, b2, gates, fusion):
        h = torch.relu(torch.ops.mohdify.read(x, w, b, mask, alpha))         # [T, 96]
        return torch.ops.mohdify.write(h, w2, b2, gates, fusion)             # [T, 256]

    args = (x, w, b, alpha, w2, b2, gates, fusion)
    eager = branch(*args)
    compiled = torch.compile(branch, fullgraph=True)(*args)
    atol = TOLERANCES[torch.float32][0] * max(1.0, eager.abs().max().item())
    assert (compiled - eager).abs().max().item() <= atol, "compiled branch differs from eager"
    g_eager = torch.autograd.grad(eager.sum(), args)
    g_comp = torch.autograd.grad(torch.compile(branch, fullgraph=True)(*args).sum(), args)
    for i, (a, c) in enumerate(zip(g_eager, g_comp)):
        err = (a - c).abs().max().item()
        assert err <= TOLERANCES[torch.float32][0] * max(1.0, a.abs().max().item()), f"grad {i}: {err:.3e}"


@gpu
@pytest.mark.gpu
def test_cuda_decode_beats_dense_at_quarter_density():
    """Perf sanity (H100 anchors: 2.1-2.5x at 25% active): batch-1 bf16 reader 4096 -> 14336 and
    writer 14336 -> 4096 with 4 of 16 groups active must take < 0.8x the dense F.linear time."""
    from triton.testing import do_bench

    from mohdify.codegen.read.launch import read_triton
    from mohdify.codegen.write.launch import write_triton

    dev, dt = "cuda", torch.bfloat16
    mask = torch.zeros(1, 16, dtype=torch.bool, device=dev)
    mask[0, [0, 3, 9, 14]] = True
    x = torch.randn(1, 4096, device=dev, dtype=dt)
    w = torch.randn(14336, 4096, device=dev, dtype=dt)
    dense = do_bench(lambda: torch.nn.functional.linear(x, w))
    fused = do_bench(lambda: read_triton(x, w, None, mask, None))
    assert fused < 0.8 * dense, f"reader decode: fused {fused * 1e3:.1f} us vs dense {dense * 1e3:.1f} us"
    u = torch.randn(1, 14336, device=dev, dtype=dt)
    w2 = torch.randn(4096, 14336, device=dev, dtype=dt)
    gates = mask.to(dt)
    dense = do_bench(lambda: torch.nn.functional.linear(u, w2))
    fused = do_bench(lambda: write_triton(u, w2, None, gates, None))
    assert fused < 0.8 * dense, f"writer decode: fused {fused * 1e3:.1f} us vs dense {dense * 1e3:.1f} us"
