"""The native many-token kernels (codegen/cpu/grouped.c through grouped.py) and the dispatch that uses them.

Each kernel against float64 truth over random routings (hypothesis: token counts 1 to 80, group sizes
1 to 40 so every vector tail is hit, output widths 1 to 150), the kernels' results equal for 1 and 2
threads, inactive (token, group) inputs and unused groups' NaN weights stay out, the ops take the native
path where the native table says so (and the torch loops when the library is off), and a mohdified
model's training step takes it and matches the reference's gradients."""

import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import mohdify
import mohdify.codegen  # noqa: F401  (registers torch.ops.mohdify.*)
from mohdify.codegen.cpu import crossover, grouped, native
from mohdify.codegen.cpu.backward import PATHS
from mohdify.codegen.cpu.plan import GroupPlan, plan_groups

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the native kernels are off")
OPS = torch.ops.mohdify


def _plan(active: torch.Tensor) -> GroupPlan:
    counts = active.sum(0).tolist()
    full = [g for g, c in enumerate(counts) if c == active.shape[0]]
    partial = [g for g, c in enumerate(counts) if 0 < c < active.shape[0]]
    return GroupPlan("grouped", full, partial, {g: active[:, g].nonzero().squeeze(1) for g in partial})


def _active(gen, tokens, groups, density):
    active = torch.rand(tokens, groups, generator=gen) < density              # [T, N]
    if groups > 1:
        active[:, -1] = False                                                 # a group no token uses
    return active


def _spread(active, group_size):
    return active.repeat_interleave(group_size, dim=1)                        # [T, D]


cases = st.tuples(st.integers(1, 80), st.integers(1, 9), st.integers(1, 40), st.integers(1, 150),
                  st.floats(0.05, 0.95), st.integers(0, 2**16))


@given(cases)
@example((2500, 16, 32, 200, 0.4, 7))   # training-sized: thousands of tokens, every token chunk of the kernels
def test_kernels_match_float64(case):
    tokens, groups, group_size, width, density, seed = case
    gen = torch.Generator().manual_seed(seed)
    dim = groups * group_size
    active = _active(gen, tokens, groups, density)
    plan = _plan(active)
    c = grouped.csr(plan)
    part = torch.zeros(groups, dtype=torch.bool)
    part[plan.partial] = True
    mp = _spread(active & part, group_size).double()                          # partial groups' pairs only
    x = torch.randn(tokens, dim, generator=gen)                               # [T, D]
    wt = torch.randn(dim, width, generator=gen)                               # [D, C]
    a = torch.randn(tokens, width, generator=gen)                             # [T, C]
    bias = torch.randn(dim, generator=gen)                                    # [D]
    tol = dict(rtol=1e-4, atol=1e-4 * math.sqrt(max(dim, width)))

    y0 = torch.randn(tokens, width, generator=gen)
    y = y0.clone()
    grouped.acc(y, x, wt, c, group_size)                                      # y += x[t, g] wt[g]
    torch.testing.assert_close(y.double(), y0.double() + (x.double() * mp) @ wt.double(), **tol)

    out = torch.full((tokens, dim), 7.0)
    grouped.dot(out, a, wt, bias, c, group_size)                              # out[t, g] = a[t] wt[g]^T + b[g]
    want = torch.where(mp.bool(), a.double() @ wt.double().t() + bias.double(), 7.0)
    torch.testing.assert_close(out.double(), want, **tol)

    gw = torch.full((dim, width), 7.0)
    grouped.wgrad(gw, x, a, c, group_size)                                    # gw[g] = x[T_g, g]^T a[T_g]
    rows = _spread(part[None], group_size)[0]                                 # [D]: the partial groups' rows
    want = torch.where(rows[:, None], (x.double() * mp).t() @ a.double(), 7.0)
    torch.testing.assert_close(gw.double(), want, **tol)


def test_thread_count_does_not_change_results():
    gen = torch.Generator().manual_seed(1)
    tokens, groups, group_size, width = 700, 16, 32, 300
    active = _active(gen, tokens, groups, 0.4)
    c = grouped.csr(_plan(active))
    x, wt, a = (torch.randn(tokens, groups * group_size, generator=gen), torch.randn(groups * group_size, width,
                generator=gen), torch.randn(tokens, width, generator=gen))
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            y, out, gw = torch.zeros(tokens, width), torch.zeros(tokens, groups * group_size), torch.zeros(
                groups * group_size, width)
            grouped.acc(y, x, wt, c, group_size)
            grouped.dot(out, a, wt, None, c, group_size)
            grouped.wgrad(gw, x, a, c, group_size)
            results.append((y, out, gw))
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def test_inactive_inputs_and_unused_weights_stay_out():
    """NaN in a token's inactive groups of x, and in the weights of a group no token uses: every output
    and gradient stays finite, and the unused group's weight gradient is 0."""
    gen = torch.Generator().manual_seed(2)
    tokens, groups, group_size, out_features = 300, 16, 32, 96
    dim = groups * group_size
    mask = _active(gen, tokens, groups, 0.3)
    mask[:, 0] = True                                                         # a shared group
    x = torch.randn(tokens, dim, generator=gen)
    x[~_spread(mask, group_size)] = float("nan")
    w = torch.randn(out_features, dim, generator=gen).t().contiguous().t()    # column-major reader [O, D]
    w[:, -group_size:] = float("nan")
    calls = dict(grouped.calls)
    y = OPS.read(x, w, None, mask, None)                                      # [T, O]
    assert grouped.calls["acc"] == calls.get("acc", 0) + 1, "T 300, 30% active, G 32: the native grouped path"
    assert torch.isfinite(y).all()
    grad_x, grad_w, _, _ = OPS.read_backward(torch.randn(tokens, out_features, generator=gen),
                                             torch.nan_to_num(x), w, False, mask, None)
    assert torch.isfinite(grad_x).all() and (grad_w[:, -group_size:] == 0).all()
    assert torch.isfinite(grad_w[:, :-group_size]).all()


def test_dispatch_uses_the_native_table():
    """With the library, fp32 G 32 at delta 0.5 groups (T 64 to 4096), G 8 does not, bf16 does not;
    without it (or on operands the kernels do not take) the torch loops' table decides (dense there)."""
    gen = torch.Generator().manual_seed(3)
    half = torch.zeros(512, 16, dtype=torch.bool)
    half[:, :4] = True
    half.scatter_(1, torch.rand(512, 12, generator=gen).topk(4, dim=1).indices + 4, True)   # delta 0.5
    for kind in ("read", "write", "read_backward", "write_backward"):
        assert plan_groups(half, torch.float32, kind, 32, native=True).path == "grouped", kind
        assert plan_groups(half, torch.float32, kind, 32, native=False).path == "dense", kind
        assert plan_groups(half, torch.float32, kind, 8, native=True).path == "dense", kind
        assert plan_groups(half, torch.bfloat16, kind, 32, native=True).path == "dense", kind
    assert not crossover.grouped_pays("read", torch.float32, 32, 512, 0.75, native=True)
    assert crossover.grouped_pays("read", torch.float32, 32, 8192, 0.3, native=True)
    assert not crossover.grouped_pays("read", torch.float32, 32, 8192, 0.5, native=True)
    w = torch.randn(64, 512, generator=gen)                                   # row-major reader: not taken
    x = torch.randn(512, 512, generator=gen)
    assert not grouped.takes(x, w.t()) and grouped.takes(x, w.t().contiguous())
    assert not grouped.takes(x.bfloat16())
    many = torch.zeros(40, grouped.MAX_GROUPS + 1, dtype=torch.bool)            # past the native kernels' limit
    many[:, 0] = True
    many[::2, 1] = True
    plan = plan_groups(many, torch.float32, "read", 32, native=True)
    assert plan.path == "grouped" and plan.csr is None, "the torch loops' plan (their table: share tiny)"


def test_library_off_runs_the_torch_loops(monkeypatch):
    """MOHDIFY_NATIVE=0: the same op at delta 0.3 (grouped in both tables) runs the torch loops, same values."""
    gen = torch.Generator().manual_seed(4)
    mask = _active(gen, 256, 16, 0.3)
    x = torch.randn(256, 512, generator=gen)
    w = torch.randn(40, 512, generator=gen).t().contiguous().t()
    calls = dict(grouped.calls)
    with_native = OPS.read(x, w, None, mask, None)
    assert grouped.calls["acc"] == calls.get("acc", 0) + 1
    monkeypatch.setenv("MOHDIFY_NATIVE", "0")
    native.reset()
    try:
        calls = dict(grouped.calls)
        without = OPS.read(x, w, None, mask, None)
        assert grouped.calls == calls, "the library is off: no native call"
    finally:
        monkeypatch.delenv("MOHDIFY_NATIVE")
        native.reset()
    torch.testing.assert_close(with_native, without, rtol=1e-5, atol=1e-4)


class _Mlp(torch.nn.Module):
    def __init__(self, dim=512, inner=96):
        super().__init__()
        self.norm = torch.nn.LayerNorm(dim)
        self.up = torch.nn.Linear(dim, inner)
        self.down = torch.nn.Linear(inner, dim)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.norm(x))))


def test_training_step_takes_the_native_path_and_matches_the_reference(monkeypatch):
    """A mohdified block (G 32, delta 0.5, learned router) on 4 x 64 tokens: forward and backward run the
    native kernels (counted), and every gradient equals the same model's with the library off (torch loops
    / masked path) within fp32 summation order."""
    torch.manual_seed(5)
    model = _Mlp()
    mohdify.mohdify(model, mohdify.MoHDConfig(num_groups=16, num_shared=4, top_k=4, router="learned"),
                    example_inputs=(torch.randn(1, 8, 512),))
    for p in model.parameters():
        if p.dim() == 2 and p.shape[0] == 12:                                 # the router [N_r, D]
            torch.nn.init.normal_(p, std=0.05)
    x = torch.randn(4, 64, 512)

    def grads():
        model.zero_grad(set_to_none=True)
        out = model(x)
        (out.square().mean() + mohdify.aux_loss(model)).backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    calls = dict(grouped.calls)
    PATHS.clear()
    out, got = grads()
    assert grouped.calls["acc"] > calls.get("acc", 0) and grouped.calls["dot"] > calls.get("dot", 0)
    assert grouped.calls["wgrad"] > calls.get("wgrad", 0)
    assert PATHS["read_backward:grouped"] == 1 and PATHS["write_backward:grouped"] == 1, dict(PATHS)
    monkeypatch.setenv("MOHDIFY_NATIVE", "0")
    native.reset()
    try:
        out_ref, want = grads()
    finally:
        monkeypatch.delenv("MOHDIFY_NATIVE")
        native.reset()
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys() and len(got) >= 5
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_write_add_reads_z_from_its_output_in_fp32():
    """write_add without fusion (what the backend emits): the gates' gradient comes from output - residual,
    no second product for z (one native `dot`, the forward's), and equals the float64 reference even
    with a residual 30x larger than the write."""
    gen = torch.Generator().manual_seed(6)
    tokens, groups, group_size, inner = 300, 16, 32, 72
    dim = groups * group_size
    active = _active(gen, tokens, groups, 0.3)
    active[:, 0] = True
    u = torch.randn(tokens, inner, generator=gen, requires_grad=True)
    w = (torch.randn(dim, inner, generator=gen) / inner ** 0.5).requires_grad_()
    gates = (torch.rand(tokens, groups, generator=gen) + 0.5).mul(active).requires_grad_()
    residual = (30 * torch.randn(tokens, dim, generator=gen)).requires_grad_()
    calls = dict(grouped.calls)
    out = OPS.write_add(u, w, None, gates, None, residual)
    grad = torch.randn(tokens, dim, generator=gen)
    got = torch.autograd.grad(out, (u, w, gates, residual), grad)
    assert grouped.calls["dot"] == calls.get("dot", 0) + 1, "z came from the output, not a second product"
    ref = [t.detach().double().requires_grad_() for t in (u, w, gates, residual)]
    z = ref[0] @ ref[1].t()                                                   # [T, D]
    want = list(torch.autograd.grad((z * ref[2].repeat_interleave(group_size, 1) + ref[3]), ref, grad.double()))
    want[2] = want[2] * active   # a zero gate (inactive group) gets a zero gradient on CPU (cpu/backward.py)
    for name, g, r in zip(("u", "weight", "gates", "residual"), got, want):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4, msg=name)
