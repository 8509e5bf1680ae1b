"""Strategies and checks for the kernel tests: shapes, masks, dtypes and seeds drawn by hypothesis,
tensors from a seeded generator, and the comparison against the reference.

Truth is the reference op evaluated in float64 on the same (rounded) inputs. fp32 kernels must be
within the conftest fp32 tolerance of it; fp16/bf16 kernels within twice plain torch's own error
at that dtype (the reference run at that dtype), floored at the conftest tolerance for that dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from conftest import TOLERANCES, assert_close
from hypothesis import note
from hypothesis import strategies as st

from mohdify.codegen.launch_common import KernelConfig

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GROUP_SIZES = [16, 32, 64]
MAX_DIM = 256   # the interpreter is slow: keep every dimension <= 256


@dataclass
class Case:
    seed: int
    tokens: int          # T
    groups: int          # N
    group_size: int      # G
    other: int           # O for the reader (out_features), I for the writer (in_features)
    dtype: torch.dtype
    density: float       # probability that a (token, group) is active
    has_bias: bool
    has_extra: bool      # reader: alpha given; writer: fusion given
    config: Optional[KernelConfig]

    @property
    def dim(self) -> int:
        return self.groups * self.group_size

    def gen(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed)


@st.composite
def cases(draw, *, writer: bool) -> Case:
    group_size = draw(st.sampled_from(GROUP_SIZES))
    groups = draw(st.integers(2, min(8, MAX_DIM // group_size)))
    tokens = draw(st.one_of(st.integers(1, 40), st.sampled_from([1, 3, 17, 33])))
    other = draw(st.integers(1, 96))
    config = None
    if draw(st.booleans()):
        # Explicit configs reach the split (fp32 atomics) path and small tiles on CPU.
        block = draw(st.sampled_from([16, 32]))
        config = KernelConfig(block_m=draw(st.sampled_from([16, 32])), block_n=16 if writer else block,
                              block_k=block if writer else 16, split=draw(st.integers(1, 3)))
    case = Case(seed=draw(st.integers(0, 2**31 - 1)), tokens=tokens, groups=groups, group_size=group_size,
                other=other, dtype=draw(st.sampled_from(DTYPES)), density=draw(st.sampled_from([0.0, 0.3, 0.6, 1.0])),
                has_bias=draw(st.booleans()), has_extra=draw(st.booleans()), config=config)
    note(repr(case))
    return case


def randn(gen: torch.Generator, dtype: torch.dtype, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen).to(dtype)


def mask_of(gen: torch.Generator, case: Case) -> torch.Tensor:
    """`[T, N]` bool; with density 0 every group is off (the kernel must still write bias / zeros)."""
    return torch.rand(case.tokens, case.groups, generator=gen) < case.density


def f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.double()


def check(actual: Optional[torch.Tensor], truth: Optional[torch.Tensor], torch_at_dtype: Optional[torch.Tensor],
          what: str, dtype: torch.dtype) -> None:
    """Kernel result vs float64 truth; 16-bit dtypes get twice plain torch's own error."""
    if truth is None:
        assert actual is None, f"{what}: expected None, got a tensor of shape {tuple(actual.shape)}"
        return
    assert actual is not None, f"{what}: expected shape {tuple(truth.shape)}, got None"
    if dtype == torch.float32:
        assert_close(actual, truth.float(), what, dtype=torch.float32)
        return
    assert actual.dtype == torch_at_dtype.dtype, f"{what}: dtype {actual.dtype} != {torch_at_dtype.dtype}"
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    if truth.numel() == 0:
        return
    scale = max(1.0, truth.abs().max().item())
    err = (actual.double() - truth).abs().max().item()
    torch_err = (torch_at_dtype.double() - truth).abs().max().item()
    bound = max(2 * torch_err, TOLERANCES[dtype][0] * scale)
    assert err <= bound, (f"{what}: shape {tuple(truth.shape)} {dtype}: max abs error {err:.3e} > {bound:.3e} "
                          f"(plain torch at this dtype: {torch_err:.3e}, output scale {scale:.3e})")
