"""The native CPU decode kernels (codegen/cpu/native.c through native.py) against the reference.

Token counts 0, 1, 2-8, 16 (and 17, past the decode boundary: the torch path); odd group sizes and
widths; fp32 and bf16; bias, alpha, gates, residual; NaN weights of groups no token uses stay out;
eager ops and the torch.compile backend; which path ran (`native.calls`); the fallback when the
library cannot be built (no compiler, a failing build, MOHDIFY_NATIVE=0), with one warning.
Truth is the reference in float64 (kernel_cases.check: fp32 tight, bf16 within twice torch's error)."""

import warnings

import pytest
import torch
from kernel_cases import check, f64
from test_cpu_kernels import reader_case, writer_case

import mohdify.codegen  # noqa: F401  (registers torch.ops.mohdify.*)
from mohdify.codegen.cpu import native
from mohdify.codegen.cpu.read import read_cpu, read_multi_cpu
from mohdify.codegen.cpu.write import write_add_cpu, write_cpu
from mohdify.codegen.read.naive import read_naive
from mohdify.codegen.write.naive import write_naive

OPS = torch.ops.mohdify
DTYPES = [torch.float32, torch.bfloat16]
# (tokens, groups, group size, O or I): group sizes 3 / 5 / 7 / 8 / 64, widths not multiples of 8 or 16
SHAPES = [(1, 16, 3, 37), (1, 16, 64, 300), (2, 5, 5, 11), (3, 7, 7, 129), (5, 4, 8, 1), (8, 16, 4, 70),
          (16, 8, 8, 33)]



@pytest.fixture
def native_lib():
    if native.library() is None:
        pytest.skip(f"the native library is not available here ({native._state.get('why')}); "
                    "the fallback tests cover this machine")


needs_native = pytest.mark.usefixtures("native_lib")


def _truth(fn, *args):
    return fn(*(f64(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args))


def _ran(kind, fn):
    before = native.calls[kind]
    out = fn()
    return out, native.calls[kind] - before


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_native_read_matches_reference(shape, dtype):
    x, w, b, mask, alpha = reader_case(*shape, dtype, density=0.4)
    for bias in (b, None):
        for a in (alpha, None):
            what = f"read {shape} {dtype} bias={bias is not None} alpha={a is not None}"
            y, ran = _ran("read", lambda: read_cpu(x, w, bias, mask, a))       # noqa: B023
            assert ran == 1, f"{what}: the native kernel did not run"
            check(y, _truth(read_naive, x, w, bias, mask, a), read_naive(x, w, bias, mask, a), what, dtype)
    ys, ran = _ran("read", lambda: read_multi_cpu(x, [w, w[:3], w], [b, None, b], mask, alpha))
    assert ran == 1, "read_multi must be one native call for all its weights"
    for got, weight, bias in zip(ys, (w, w[:3], w), (b, None, b)):
        assert torch.equal(got, read_cpu(x, weight, bias, mask, alpha)), "read_multi differs from read"


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_native_write_matches_reference(shape, dtype):
    u, w, b, gates, _, residual = writer_case(*shape, dtype, density=0.4)
    for bias in (b, None):
        what = f"write {shape} {dtype} bias={bias is not None}"
        o, ran = _ran("write", lambda: write_cpu(u, w, bias, gates, None))    # noqa: B023
        assert ran == 1, f"{what}: the native kernel did not run"
        check(o, _truth(write_naive, u, w, bias, gates, None), write_naive(u, w, bias, gates, None), what, dtype)
        assert torch.equal(write_add_cpu(u, w, bias, gates, None, residual), o + residual), f"{what}: write_add"


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("used", [0, 1, 5, 9, 16])
def test_native_threads_and_parts(used, dtype):
    """Calls big enough to run on 2 threads, with used-group counts that leave a work part empty
    (5, 9 groups in 4 parts) or every part empty (0): equal to the reference, and bit for bit equal
    on 1 and 2 threads (the sums do not depend on the thread count)."""
    x, w, b, _, alpha = reader_case(1, 16, 64, 1030, dtype)
    u, w2, b2, _, _, residual = writer_case(1, 16, 64, 1030, dtype)
    mask = torch.zeros(1, 16, dtype=torch.bool)
    mask[0, torch.randperm(16, generator=torch.Generator().manual_seed(used))[:used]] = True
    gates = mask.to(dtype) * 0.75
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            y, ran = _ran("read", lambda: read_multi_cpu(x, [w, w[:7]], [b, None], mask, alpha))
            o, ran2 = _ran("write", lambda: write_add_cpu(u, w2, b2, gates, None, residual))
            assert ran == ran2 == 1
            outs.append((*y, o))
    finally:
        torch.set_num_threads(before)
    for got, ref in zip(outs[0], outs[1]):
        assert torch.equal(got, ref), f"{used} groups: 2 threads differ from 1"
    what = f"{used} used groups {dtype}"
    check(outs[0][0], _truth(read_naive, x, w, b, mask, alpha), read_naive(x, w, b, mask, alpha), what, dtype)
    check(outs[0][1], _truth(read_naive, x, w[:7], None, mask, alpha), read_naive(x, w[:7], None, mask, alpha),
          what, dtype)
    want = write_naive(u, w2, b2, gates, None) + residual
    check(outs[0][2], _truth(write_naive, u, w2, b2, gates, None) + f64(residual), want, what, dtype)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_calls_the_native_kernels_do_not_take(dtype):
    """T = 0 and T > 16, a row-major reader, a writer with a fusion matrix, fp16: the torch path."""
    x, w, b, mask, alpha = reader_case(17, 4, 8, 20, dtype)
    u, w2, b2, gates, fusion, residual = writer_case(3, 4, 8, 20, dtype)
    cases = {"T = 17": ("read", lambda: read_cpu(x, w, b, mask, alpha)),
             "T = 0": ("read", lambda: read_cpu(x[:0], w, b, mask[:0], alpha[:0])),
             "row-major reader": ("read", lambda: read_cpu(x[:2], w.contiguous(), b, mask[:2], alpha[:2])),
             "fusion": ("write", lambda: write_cpu(u, w2, b2, gates, fusion)),
             "fp16": ("write", lambda: write_cpu(u.half(), w2.half(), None, gates.half(), None))}
    for what, (kind, fn) in cases.items():
        _, ran = _ran(kind, fn)
        assert ran == 0, f"{what}: the native kernel must not take this call"


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens", [1, 4, 16])
def test_native_unused_groups_stay_out(tokens, dtype):
    """NaN in the weights (and writer bias) of groups no token uses, and in a token's own inactive
    input groups, never reaches an output."""
    groups, group_size = 16, 5
    x, w, b, mask, alpha = reader_case(tokens, groups, group_size, 30, dtype, density=0.1, seed=5)
    unused = ~mask.any(0)                                                     # [N]
    assert unused.any(), "the case must leave some group unused"
    w = w.clone()
    w[:, unused.repeat_interleave(group_size)] = float("nan")
    y, ran = _ran("read", lambda: OPS.read(x, w, b, mask, alpha))
    assert ran == 1 and torch.isfinite(y).all(), f"read: NaN from unused groups {unused.nonzero().tolist()}"
    u, w2, b2, gates, _, residual = writer_case(tokens, groups, group_size, 30, dtype, density=0.1, seed=6)
    rows = (~(gates != 0).any(0)).repeat_interleave(group_size)
    w2, b2 = w2.clone(), b2.clone()
    w2[rows] = float("nan")
    b2[rows] = float("nan")
    o, ran = _ran("write", lambda: OPS.write_add(u, w2, b2, gates, None, residual))
    assert ran == 1 and torch.isfinite(o).all(), "write: NaN from the rows of unused groups"


@needs_native
def test_backend_compiled_decode_runs_the_native_kernels(fresh_dynamo):
    """Under torch.compile(backend="mohd") the fused read_multi and write_add reach the native kernels:
    one native call each per step, the eager result."""
    x, w, b, mask, alpha = reader_case(2, 8, 8, 24, torch.float32, density=0.3, seed=7)
    u, w2, b2, gates, _, residual = writer_case(2, 8, 8, 24, torch.float32, density=0.3, seed=8)

    def branch(x, u, residual):
        q = OPS.read(x, w, b, mask, alpha)                                    # [2, 24]
        k = OPS.read(x, w, b, mask, alpha)                                    # merged with q: read_multi
        return OPS.write(u * (q + k).sum(), w2, b2, gates, None) + residual   # write + add: write_add

    want = branch(x, u, residual)
    compiled = torch.compile(branch, backend="mohd", fullgraph=True)
    compiled(x, u, residual)
    before = dict(native.calls)
    got = compiled(x, u, residual)
    assert native.calls["read"] - before["read"] == 1 and native.calls["write"] - before["write"] == 1
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), "compiled differs from eager"


@pytest.fixture
def rebuild(tmp_path, monkeypatch):
    """An empty cache and a forgotten library; afterwards the real one is loaded again."""
    monkeypatch.setenv("MOHDIFY_CACHE", str(tmp_path))
    native.reset()
    yield monkeypatch
    native.reset()


@pytest.mark.parametrize("how", ["no compiler", "build fails", "disabled"])
def test_fallback_when_the_library_is_unavailable(rebuild, how):
    if how == "no compiler":
        rebuild.setattr(native, "_compiler", lambda: None)
    elif how == "build fails":
        rebuild.setattr(native, "FLAGS", [*native.FLAGS, "--no-such-flag"])
    else:
        rebuild.setenv("MOHDIFY_NATIVE", "0")
    x, w, b, mask, alpha = reader_case(3, 4, 8, 20, torch.float32)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, ran = _ran("read", lambda: read_cpu(x, w, b, mask, alpha))
        read_cpu(x, w, b, mask, alpha)
    assert ran == 0 and native.library() is None
    check(y, _truth(read_naive, x, w, b, mask, alpha), read_naive(x, w, b, mask, alpha), how, torch.float32)
    ours = [str(c.message) for c in caught if "native CPU kernels" in str(c.message)]
    want = {"no compiler": "no C compiler", "build fails": "--no-such-flag", "disabled": None}[how]
    if want is None:
        assert ours == [], "MOHDIFY_NATIVE=0 must not warn"
    else:
        assert len(ours) == 1 and want in ours[0], f"one warning naming the reason, got {ours}"


@needs_native
def test_build_is_cached(rebuild, tmp_path):
    assert native.library() is not None
    built = list(tmp_path.glob("mohd_native_*.so"))
    assert len(built) == 1, "one library in the cache"
    native.reset()
    stamp = built[0].stat().st_mtime_ns
    assert native.library() is not None and built[0].stat().st_mtime_ns == stamp, "a second process must not rebuild"
