"""Inputs the Triton launchers cannot take raise a ValueError naming the argument, the value passed
and what is required; never a wrong result."""

import pytest
import torch

from mohdify.codegen.launch_common import KernelConfig
from mohdify.codegen.read.launch import read_triton
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
        ((x, w, torch.zeros(7), mask, None), r"bias has shape \(7,\), required \(8,\)"),
        ((x, w, None, mask, torch.ones(2)), r"alpha has shape \(2,\), required \(3,\)"),
        ((x, w[:, :32], None, mask, None), r"weight has shape \(8, 32\): required \[O, 64\]"),
        ((x.double(), w.double(), None, mask, None), r"x has dtype torch.float64"),
        ((x, w, None, mask[:, :3], None), r"mask has 3 groups, which does not divide x.shape\[1\] = 64"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=message):
            read_triton(*args)


def test_writer_rejects_bad_arguments():
    u, w, _, gates, _ = writer_args()
    with pytest.raises(ValueError, match=r"fusion has shape \(3, 3\), required \(4, 4\)"):
        write_triton(u, w, None, gates, torch.eye(3))
    with pytest.raises(ValueError, match=r"residual has shape \(3, 32\), required \(3, 64\)"):
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
