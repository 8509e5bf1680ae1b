"""Launchers of the fused MoHD writer (forward and backward) on the Triton kernels in kernel.py.

`write_triton` equals `write_naive` (plus an optional residual) for every input it accepts; inputs
it cannot take raise a ValueError naming the argument, the value and what is required.

Shape legend: T = tokens, I = in_features, D = out_features = N * G, N = groups, G = group size.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ..contracts import check_write
from ..launch_common import KernelConfig, check_triton_inputs, divisor_block, ieee_for, require, split_for, upcast_for
from .kernel import mix_kernel, write_kernel

__all__ = ["write_triton", "mix_triton", "check_write_inputs", "default_write_config"]


def check_write_inputs(op: str, u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor,
                       fusion: Optional[Tensor], residual: Optional[Tensor] = None) -> int:
    """The writer contract (codegen/contracts.py) and what the kernels add; returns the group size G."""
    group_size = check_write(op, u, weight, bias, gates, fusion, residual)
    check_write_devices(op, group_size, u, weight, bias, gates, fusion, residual)
    return group_size


def check_write_devices(op: str, group_size: int, u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor,
                        fusion: Optional[Tensor], residual: Optional[Tensor] = None) -> None:
    """What the kernels add to the writer contract: devices and a group size that is a multiple of 16."""
    check_triton_inputs(op, group_size, f"weight.shape[0] = {weight.shape[0]} / gates.shape[1] = {gates.shape[1]}",
                        {"u": u, "weight": weight, "bias": bias, "gates": gates, "fusion": fusion,
                         "residual": residual})


def default_write_config(num_tokens: int, in_features: int, out_features: int, group_size: int,
                         device: torch.device) -> KernelConfig:
    """Fixed heuristics (no autotune: it needs a GPU driver). Decode: 16/32-token tiles of rows
    inside one group, the reduction over I split to fill the SMs; prefill: 64 x 128 tiles."""
    if device.type != "cuda":
        return KernelConfig(block_m=max(16, min(64, triton.next_power_of_2(num_tokens))),
                            block_n=divisor_block(group_size, 64), block_k=64)
    if num_tokens <= 32:
        block_m = 16 if num_tokens <= 16 else 32
        block_n = divisor_block(group_size, 64)
        tiles = triton.cdiv(num_tokens, block_m) * (out_features // block_n)
        return KernelConfig(block_m=block_m, block_n=block_n, block_k=128, num_warps=4, num_stages=3,
                            split=split_for(device, tiles, max_split=max(1, in_features // 512)))
    return KernelConfig(block_m=64, block_n=divisor_block(group_size, 128), block_k=64, num_warps=4, num_stages=3)


def mix_triton(o: Tensor, fusion: Tensor, gates: Optional[Tensor], residual: Optional[Tensor],
               out_dtype: torch.dtype, group_size: int) -> Tensor:
    """Group fusion o' = (M (x) I_G) o (+ residual); `o` `[T, D]`, `fusion` M `[N, N]` (any strides:
    pass `fusion.t()` for the transpose). `gates` `[T, N]`, when given, lets the kernel skip the
    groups that no token of a tile has active (o is zero there)."""
    num_tokens, dim = o.shape
    out = torch.empty(num_tokens, dim, dtype=out_dtype, device=o.device)     # [T, D]
    if num_tokens == 0:
        return out
    block_m = 64 if o.device.type == "cuda" and num_tokens > 32 else 16
    block_n = divisor_block(group_size, 128)
    g = gates if gates is not None else o
    r = residual if residual is not None else o
    grid = (triton.cdiv(num_tokens, block_m), dim // block_n)
    mix_kernel[grid](
        o, fusion, g, r, out,
        num_tokens, fusion.shape[0],
        o.stride(0), o.stride(1),
        fusion.stride(0), fusion.stride(1),
        g.stride(0), g.stride(1),
        r.stride(0), r.stride(1),
        out.stride(0), out.stride(1),
        G=group_size, HAS_GATES=gates is not None, HAS_RESIDUAL=residual is not None,
        BM=block_m, BN=block_n, num_warps=4,
    )
    return out


def write_triton(u: Tensor, weight: Tensor, bias: Optional[Tensor], gates: Tensor, fusion: Optional[Tensor],
                 residual: Optional[Tensor] = None, config: Optional[KernelConfig] = None) -> Tensor:
    """Fused writer, `[T, I]` -> `[T, D]`: o'_t = (M (x) I_G)(g_t * (W u_t + b)) (+ residual_t).

    Only the output rows of groups active in some token of a tile are computed. Without fusion
    everything (gate, bias, residual) happens in one kernel; with fusion the gated rows go through
    an fp32 buffer to the mixing kernel, which adds the residual.
    """
    group_size = check_write_inputs("write_triton", u, weight, bias, gates, fusion, residual)
    num_tokens, in_features = u.shape
    out_features = weight.shape[0]
    cfg = config or default_write_config(num_tokens, in_features, out_features, group_size, u.device)
    require(group_size % cfg.block_n == 0, f"config.block_n = {cfg.block_n} must divide the group size {group_size}")
    if num_tokens == 0:
        return u.new_empty(0, out_features)
    split = max(1, min(cfg.split, triton.cdiv(in_features, cfg.block_k)))
    k_per_split = triton.cdiv(triton.cdiv(in_features, split), cfg.block_k) * cfg.block_k
    mixing = fusion is not None
    if split > 1:
        buf = torch.zeros(num_tokens, out_features, dtype=torch.float32, device=u.device)   # [T, D]
    elif mixing:
        buf = torch.empty(num_tokens, out_features, dtype=torch.float32, device=u.device)   # [T, D]
    else:
        buf = torch.empty(num_tokens, out_features, dtype=u.dtype, device=u.device)         # [T, D]
    add_residual = residual is not None and not mixing
    r = residual if add_residual else buf
    grid = (triton.cdiv(num_tokens, cfg.block_m), out_features // cfg.block_n, split)
    write_kernel[grid](
        u, weight, bias if bias is not None else u, gates, r, buf,
        num_tokens, in_features, k_per_split,
        u.stride(0), u.stride(1),
        weight.stride(0), weight.stride(1),
        gates.stride(0), gates.stride(1),
        r.stride(0), r.stride(1),
        buf.stride(0), buf.stride(1),
        G=group_size, HAS_BIAS=bias is not None, HAS_RESIDUAL=add_residual, SPLIT=split,
        UPCAST=upcast_for(u), IEEE=ieee_for(u),
        BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, **cfg.launch_kwargs(),
    )
    if mixing:
        return mix_triton(buf, fusion, gates, residual, u.dtype, group_size)
    return buf.to(u.dtype) if split > 1 else buf
