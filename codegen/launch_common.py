"""Helpers shared by the Triton launchers: their input checks, block configs, interpreter handling.

The launchers run on CUDA, or on CPU under the Triton interpreter (`TRITON_INTERPRET=1`, how the
tests run). Two interpreter facts shape the code here: bf16 `tl.dot` returns garbage there (tiles
are upcast to fp32 on CPU), and `@triton.autotune` needs a GPU driver (configs are picked by the
fixed heuristics below, or passed explicitly as a `KernelConfig`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .contracts import ContractError


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def upcast_for(t: Tensor) -> bool:
    """Whether tiles must be cast to fp32 before `tl.dot`: on the interpreter, for 16-bit dtypes."""
    return interpreting() and t.dtype != torch.float32


def ieee_for(t: Tensor) -> bool:
    """fp32 on a GPU: ask `tl.dot` for IEEE fp32, as torch's F.linear does by default (no TF32)."""
    return not interpreting() and t.dtype == torch.float32


def require(ok: bool, message: str) -> None:
    """Raise a ValueError with `message` (what was passed, what is required) unless `ok`."""
    if not ok:
        raise ValueError(message)


def check_triton_inputs(op: str, group_size: int, where: str, tensors: dict[str, Optional[Tensor]]) -> None:
    """What the Triton kernels add to an op's contract (codegen/contracts.py): the group size `where`
    (how it came about) is a multiple of 16 (`tl.dot` tiles are >= 16 wide and must not straddle two
    groups), and every tensor given is on the first one's device, a CUDA device (CPU only under the
    interpreter). None entries are skipped."""
    if group_size % 16:
        raise ContractError(op, f"group size {group_size} ({where}) is not supported by the Triton kernels: it "
                                "must be a multiple of 16 (tl.dot tiles are at least 16 wide and a tile must not "
                                "straddle two groups)")
    (first_name, first), *others = tensors.items()
    device = first.device
    if not (device.type == "cuda" or (device.type == "cpu" and interpreting())):
        raise ContractError(op, f"{first_name} is on {device}: the Triton kernels run on CUDA, or on CPU only under "
                                "TRITON_INTERPRET=1")
    for name, t in others:
        if t is not None and t.device != device:
            raise ContractError(op, f"{name} is on {t.device}, but {first_name} is on {device}: required the same "
                                    "device")


def divisor_block(group_size: int, cap: int) -> int:
    """The largest power of two <= `cap` that divides `group_size` (>= 16 for valid group sizes)."""
    return math.gcd(group_size, cap)


@dataclass(frozen=True)
class KernelConfig:
    """A fixed launch config. Blocks are powers of two >= 16; `split` > 1 splits the reduction
    over `split` programs that accumulate with fp32 atomics (for decode, to fill the GPU)."""

    block_m: int
    block_n: int
    block_k: int
    split: int = 1
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            v = getattr(self, name)
            require(v >= 16 and v & (v - 1) == 0, f"KernelConfig.{name}={v}: must be a power of two >= 16")
        require(self.split >= 1, f"KernelConfig.split={self.split}: must be >= 1")

    def launch_kwargs(self) -> dict:
        return {"num_warps": self.num_warps, "num_stages": self.num_stages}


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 on CPU (the interpreter runs programs serially)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_for(device: torch.device, programs: int, max_split: int) -> int:
    """How far to split the reduction so that about two programs run per SM (1 on CPU)."""
    if device.type != "cuda" or programs <= 0:
        return 1
    return max(1, min(max_split, math.ceil(2 * num_sms(device) / programs)))
