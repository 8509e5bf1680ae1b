"""Inputs the Triton launchers cannot take raise a ValueError naming the argument, the value passed
and what is required; never a wrong result."""

import pytest
import torch

from mohdify.codegen.contracts import ContractError
from mohdify.codegen.cpu.read import read_cpu, read_multi_cpu
from mohdify.codegen.cpu.write import write_add_cpu, write_cpu
from mohdify.codegen.launch_common import KernelConfig
from mohdify.codegen.read.launch import read_multi_triton, read_triton
from mohdify.codegen.write.launch import write_triton

pytestmark = pytest.mark.interpreter   # Triton kernels on CPU tensors: TRITON_INTERPRET=1


def reader_args(dim=64, groups=4, out=8, tokens=3):
    return (torch.randn(tokens, dim), torch.randn(out, dim), None, torch.ones(tokens, groups, dtype=torch.bool), None)


def writer_args(dim=64, groups=4, inner=8, tokens=3):
    return (torch.randn(tokens, inner), torch.randn(dim, inner), None, torch.ones(tokens, groups), None)


@pytest.mark.parametrize("dim, groups, size", [(40, 2, 20), (24, 3, 8), (72, 3, 24)])
def test_group_size_not_multiple_of_16(dim, groups, size):
    with pytest.raises(ValueError, match=rf"group size {size} .*must be a multiple of 16"):
        read_triton(*reader_args(dim=dim, groups=groups))
    with pytest.raises(ValueError, match=rf"group size {size} .*must be a multiple of 16"):
        write_triton(*writer_args(dim=dim, groups=groups))


def test_reader_rejects_bad_arguments():
    x, w, _, mask, _ = reader_args()
    cases = [
        ((x, w.half(), None, mask, None), r"weight has dtype torch.float16, but the input has torch.float32"),
        ((x, w, None, mask.float(), None), r"mask has dtype torch.float32: required torch.bool"),
        ((x, w, torch.zeros(7), mask, None), r"read_triton: bias has shape \(7,\): required \[8\]"),
        ((x, w, None, mask, torch.ones(2)), r"alpha has shape \(2,\): required \[3\] \(T = x.shape\[0\]\)"),
        ((x, w[:, :32], None, mask, None), r"weight has shape \(8, 32\): required \[O, 64\]"),
        ((x.double(), w.double(), None, mask, None), r"x has dtype torch.float64"),
        ((x, w, None, mask[:, :3], None), r"mask has 3 groups, which does not divide x.shape\[1\] = 64"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            read_triton(*args)


def test_writer_rejects_bad_arguments():
    u, w, _, gates, _ = writer_args()
    with pytest.raises(ValueError, match=r"write_triton: fusion has shape \(3, 3\): required \[4, 4\]"):
        write_triton(u, w, None, gates, torch.eye(3))
    with pytest.raises(ValueError, match=r"residual has shape \(3, 32\): required \[3, 64\]"):
        write_triton(u, w, None, gates, None, residual=torch.zeros(3, 32))
    with pytest.raises(ValueError, match=r"gates has shape \(2, 4\): required \[T, N\] with T = u.shape\[0\] = 3"):
        write_triton(u, w, None, gates[:2], None)


def test_configs_that_do_not_fit_the_groups():
    with pytest.raises(ValueError, match=r"config.block_k = 64 must divide the group size 16"):
        read_triton(*reader_args(dim=64, groups=4), config=KernelConfig(16, 16, 64))
    with pytest.raises(ValueError, match=r"config.block_n = 32 must divide the group size 16"):
        write_triton(*writer_args(dim=64, groups=4), config=KernelConfig(16, 32, 16))
    with pytest.raises(ValueError, match=r"KernelConfig.block_m=24: must be a power of two >= 16"):
        KernelConfig(24, 16, 16)


def test_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"x is on cpu: the Triton kernels run on CUDA, or on CPU only under"):
        read_triton(*reader_args())
    with pytest.raises(ValueError, match=r"u is on cpu"):
        write_triton(*writer_args())


def _what(fn, *args, **kwargs) -> str:
    with pytest.raises(ContractError) as err:
        fn(*args, **kwargs)
    return err.value.what


def test_cpu_kernels_and_triton_launchers_check_one_contract():
    """codegen/contracts.py is the one check: a broken input gets the same text from the CPU kernel
    and from the Triton launcher (only the op name in front differs)."""
    x, w, _, mask, _ = reader_args()
    reader_cases = [
        ((x[0], w, None, mask, None), "x has shape (64,): required 2-D [T, D]"),
        ((x, w[:, :32], None, mask, None), "weight has shape (8, 32): required [O, 64] (D = x.shape[1])"),
        ((x, w, None, mask[:2], None), "mask has shape (2, 4): required [T, N] with T = x.shape[0] = 3"),
        ((x, w, None, mask.float(), None), "mask has dtype torch.float32: required torch.bool"),
        ((x, w, None, mask[:, :3], None), "mask has 3 groups, which does not divide x.shape[1] = 64"),
        ((x.double(), w.double(), None, mask, None), "x has dtype torch.float64: required float32, bfloat16 or "
                                                     "float16"),
        ((x, w.half(), None, mask, None), "weight has dtype torch.float16, but the input has torch.float32: they "
                                          "must match"),
        ((x, w, torch.zeros(7), mask, None), "bias has shape (7,): required [8] (O = weight.shape[0])"),
        ((x, w, torch.zeros(8, dtype=torch.int32), mask, None), "bias has dtype torch.int32: required float32, "
                                                                "bfloat16 or float16"),
        ((x, w, None, mask, torch.ones(2)), "alpha has shape (2,): required [3] (T = x.shape[0])"),
    ]
    for args, what in reader_cases:
        assert _what(read_cpu, *args) == what
        assert _what(read_triton, *args) == what
        x_, w_, b_, m_, a_ = args
        assert _what(read_multi_cpu, x_, [w, w_], [None, b_], m_, a_) == what
        assert _what(read_multi_triton, x_, [w, w_], [None, b_], m_, a_) == what
    lists = "got 1 weights and 2 biases: required at least one weight and one bias (or None) per weight"
    assert _what(read_multi_cpu, x, [w], [None, None], mask, None) == lists
    assert _what(read_multi_triton, x, [w], [None, None], mask, None) == lists

    u, w, _, gates, _ = writer_args()
    writer_cases = [
        ((u, w[:, :4], None, gates, None), "weight has shape (64, 4): required [D, 8] (I = u.shape[1])"),
        ((u, w, None, gates[:2], None), "gates has shape (2, 4): required [T, N] with T = u.shape[0] = 3"),
        ((u, w, None, gates[:, :3], None), "gates has 3 groups, which does not divide weight.shape[0] = 64"),
        ((u, w, None, gates.bool(), None), "gates has dtype torch.bool: required float32, bfloat16 or float16"),
        ((u, w, torch.zeros(3), gates, None), "bias has shape (3,): required [64] (D = weight.shape[0])"),
        ((u, w, None, gates, torch.eye(3)), "fusion has shape (3, 3): required [4, 4] (N = gates.shape[1])"),
    ]
    for args, what in writer_cases:
        assert _what(write_cpu, *args) == what
        assert _what(write_triton, *args) == what
    what = "residual has shape (3, 32): required [3, 64] ([T, D] of the write)"
    assert _what(write_add_cpu, u, w, None, gates, None, torch.zeros(3, 32)) == what
    assert _what(write_triton, u, w, None, gates, None, residual=torch.zeros(3, 32)) == what


def test_errors_name_the_op():
    x, w, _, mask, _ = reader_args()
    with pytest.raises(ValueError, match=r"^mohdify::read: mask has 3 groups"):
        read_cpu(x, w, None, mask[:, :3], None)
    with pytest.raises(ValueError, match=r"^read_triton: mask has 3 groups"):
        read_triton(x, w, None, mask[:, :3], None)
    u, w, _, gates, _ = writer_args()
    with pytest.raises(ValueError, match=r"^mohdify::write_add: residual has shape"):
        write_add_cpu(u, w, None, gates, None, torch.zeros(3, 32))
