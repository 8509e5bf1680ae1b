"""Launchers of the fused MoHD reader (forward and backward) on the Triton kernel in kernel.py.

`read_triton` equals `read_naive` for every input it accepts; inputs it cannot take raise a
ValueError that names the argument, the value and what is required (never a wrong result).

Shape legend: T = tokens, D = in_features = N * G, O = out_features, N = groups, G = group size.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
from torch import Tensor

from ..contracts import check_read_multi
from ..launch_common import KernelConfig, check_triton_inputs, divisor_block, ieee_for, require, split_for, upcast_for
from .kernel import read_multi_kernel

__all__ = ["read_triton", "read_multi_triton", "check_read_inputs", "default_read_config",
           "MAX_WEIGHTS_PER_LAUNCH"]


def check_read_inputs(op: str, x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], mask: Tensor,
                      alpha: Optional[Tensor]) -> int:
    """The reader contract (codegen/contracts.py) for each weight, and what the kernel adds; returns G."""
    group_size = check_read_multi(op, x, weights, biases, mask, alpha)
    check_read_devices(op, group_size, x, weights, biases, mask, alpha)
    return group_size


def check_read_devices(op: str, group_size: int, x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]],
                       mask: Tensor, alpha: Optional[Tensor]) -> None:
    """What the kernel adds to the reader contract: devices and a group size that is a multiple of 16."""
    tensors = {"x": x, "mask": mask, "alpha": alpha}
    for i, (w, b) in enumerate(zip(weights, biases)):
        tensors.update({f"weights[{i}]": w, f"biases[{i}]": b} if len(weights) > 1 else {"weight": w, "bias": b})
    check_triton_inputs(op, group_size, f"x.shape[1] = {x.shape[1]} / mask.shape[1] = {mask.shape[1]}", tensors)


def default_read_config(num_tokens: int, out_features: int, group_size: int, num_groups: int,
                        device: torch.device) -> KernelConfig:
    """Fixed heuristics (no autotune: it needs a GPU driver). Decode: a 16/32-token tile and split
    over groups to fill the SMs; prefill: 64 x 128 tiles accumulating across a token's groups."""
    if device.type != "cuda":
        # The interpreter runs programs one after another: few, large tiles are fastest.
        return KernelConfig(block_m=max(16, min(64, triton.next_power_of_2(num_tokens))),
                            block_n=max(16, min(64, triton.next_power_of_2(out_features))),
                            block_k=divisor_block(group_size, 64))
    if num_tokens <= 32:
        block_m = 16 if num_tokens <= 16 else 32
        tiles = triton.cdiv(num_tokens, block_m) * triton.cdiv(out_features, 64)
        return KernelConfig(block_m=block_m, block_n=64, block_k=divisor_block(group_size, 128),
                            split=split_for(device, tiles, max_split=num_groups), num_warps=4, num_stages=3)
    return KernelConfig(block_m=64, block_n=128, block_k=divisor_block(group_size, 64), num_warps=4, num_stages=3)


def read_triton(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Tensor, alpha: Optional[Tensor],
                config: Optional[KernelConfig] = None) -> Tensor:
    """Fused reader, `[T, D]` -> `[T, O]`: y_t = alpha_t * W[:, A_t] x_t[A_t] + b (see `read_naive`).

    Any strides are accepted (e.g. GPT-2's transposed Conv1D weight), at some bandwidth cost when
    the weight's in-feature dimension is not the contiguous one. One launch of `read_multi_kernel`
    with one weight: the same tiles, split and config as a launch of its own.
    """
    return _read_launch("read_triton", x, [weight], [bias], mask, alpha, config)[0]


MAX_WEIGHTS_PER_LAUNCH = 4   # read_multi_kernel's weight slots: q|k|v and gate|up fit in one launch


def read_multi_triton(x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], mask: Tensor,
                      alpha: Optional[Tensor], config: Optional[KernelConfig] = None) -> list[Tensor]:
    """Several readers of one input, `[T, D]` -> `[T, O_i]` each, as `read_triton` per weight, in
    one launch per 4 weights: the grid runs over the concatenated column tiles of all outputs.

    Every weight must pass the reader contract with this x, mask and alpha (ValueError otherwise).
    """
    return _read_launch("read_multi_triton", x, weights, biases, mask, alpha, config)


def _read_launch(op: str, x: Tensor, weights: list[Tensor], biases: list[Optional[Tensor]], mask: Tensor,
                 alpha: Optional[Tensor], config: Optional[KernelConfig]) -> list[Tensor]:
    """The launches of `read_multi_triton` (op names the caller in error messages)."""
    group_size = check_read_inputs(op, x, weights, biases, mask, alpha)
    num_tokens, num_groups = mask.shape
    total_out = sum(int(w.shape[0]) for w in weights)
    cfg = config or default_read_config(num_tokens, total_out, group_size, num_groups, x.device)
    require(group_size % cfg.block_k == 0,
            f"config.block_k = {cfg.block_k} must divide the group size {group_size}")
    if num_tokens == 0:
        return [x.new_empty(0, w.shape[0]) for w in weights]
    split = min(cfg.split, num_groups)
    mask_u8 = mask.view(torch.uint8)                                          # [T, N], same bytes as bool
    outs = []
    for start in range(0, len(weights), MAX_WEIGHTS_PER_LAUNCH):
        ws = weights[start:start + MAX_WEIGHTS_PER_LAUNCH]
        bs = biases[start:start + MAX_WEIGHTS_PER_LAUNCH]
        ys = [torch.zeros(num_tokens, w.shape[0], dtype=torch.float32, device=x.device) if split > 1
              else torch.empty(num_tokens, w.shape[0], dtype=x.dtype, device=x.device) for w in ws]  # [T, O_i]
        tiles = [triton.cdiv(int(w.shape[0]), cfg.block_n) for w in ws]
        ends = [sum(tiles[:i + 1]) for i in range(len(ws))]                   # E_{i+1}: first tile of weight i+1
        pad = MAX_WEIGHTS_PER_LAUNCH - len(ws)
        slots = [(w, b if b is not None else x, y) for w, b, y in zip(ws, bs, ys)] + [(x, x, x)] * pad
        outs_f = [int(w.shape[0]) for w in ws] + [0] * pad
        ends = (ends + [ends[-1]] * pad)[:MAX_WEIGHTS_PER_LAUNCH - 1]
        strides = [s for w in ws for s in w.stride()] + [0, 0] * pad
        has_bias = [b is not None for b in bs] + [False] * pad
        grid = (triton.cdiv(num_tokens, cfg.block_m), sum(tiles), split)
        read_multi_kernel[grid](
            x, mask_u8, alpha if alpha is not None else x,
            *[p for slot in slots for p in slot],
            *outs_f, *ends,
            num_tokens, num_groups,
            x.stride(0), x.stride(1),
            mask_u8.stride(0), mask_u8.stride(1),
            alpha.stride(0) if alpha is not None else 0,
            *strides,
            G=group_size, NUM_W=len(ws),
            HAS_B0=has_bias[0], HAS_B1=has_bias[1], HAS_B2=has_bias[2], HAS_B3=has_bias[3],
            HAS_ALPHA=alpha is not None, SPLIT=split,
            UPCAST=upcast_for(x), IEEE=ieee_for(x),
            BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k, **cfg.launch_kwargs(),
        )
        outs += [y.to(x.dtype) for y in ys] if split > 1 else ys
    return outs
