"""Benchmark the MoHD reader and writer ops against their bounds, one layer shape at a time.

Providers (each a function of prepared tensors):
  dense        F.linear with the full weight (cuBLAS): what MoHD must beat.
  dense_active F.linear with a contiguous weight of the active width: the ideal (the stand-in ceiling).
  naive        the reference op (read_naive / write_naive), unfused torch.
  compiled     torch.compile of the reference.
  fused        the Triton launcher (read_triton / write_triton).

Shapes (the issue): bf16, D 4096 in 16 groups of 256, FFN 14336; decode 1 token at delta 0.5 and
0.25 (MLP gate|up 4096 -> 2 x 14336, down 14336 -> 4096, attention q|k|v 4096 -> 6144 with 8 KV
heads, o 4096 -> 4096), prefill 8192 tokens at delta 0.5. Decode reports achieved TB/s of useful
(active) weight bytes; prefill reports TFLOP/s of activated work. Both give the fraction of the
measured H100 ceilings (3.0 TB/s copy, 700 TFLOP/s bf16).

Routing: each token keeps 2 shared groups and draws the rest of its active groups at random (the
independent-routing model of the kernel anchors); `union` is the fraction of groups some token uses.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from common import BF16_TFLOPS, COPY_TBPS, bench_ms

PROVIDERS = ("dense", "dense_active", "naive", "compiled", "fused")
D_MODEL, FFN, GROUPS, SHARED = 4096, 14336, 16, 2


@dataclass(frozen=True)
class Layer:
    name: str
    kind: str        # "read" (input-side gather) or "write" (output-side gather)
    inner: int       # read: out_features O; write: in_features I
    fusion: bool = False


LAYERS = (
    Layer("attn_qkv", "read", D_MODEL + 2 * 1024),
    Layer("mlp_gate_up", "read", 2 * FFN),
    Layer("attn_o", "write", D_MODEL),
    Layer("mlp_down", "write", FFN),
    Layer("mlp_down_mix", "write", FFN, fusion=True),
)


@dataclass(frozen=True)
class Case:
    phase: str       # "decode" or "prefill"
    tokens: int
    delta: float
    layer: Layer
    dim: int = D_MODEL
    groups: int = GROUPS


def issue_cases() -> list[Case]:
    cases = [Case("decode", 1, delta, layer) for delta in (0.5, 0.25) for layer in LAYERS]
    cases += [Case("prefill", 8192, 0.5, layer) for layer in LAYERS if not layer.fusion]
    return cases


def smoke_cases() -> list[Case]:
    """Tiny shapes for a CPU run under TRITON_INTERPRET=1 (checks the plumbing, times nothing useful)."""
    small = (Layer("read", "read", 48), Layer("write", "write", 48), Layer("write_mix", "write", 48, fusion=True))
    return [Case(phase, tokens, 0.5, layer, dim=128, groups=4) for phase, tokens in (("decode", 1), ("prefill", 33))
            for layer in small]


def routing(case: Case, gen: torch.Generator, device: str) -> torch.Tensor:
    """`[T, N]` bool: SHARED shared groups plus random routed groups, delta * N active per token."""
    active = round(case.delta * case.groups)
    shared = min(SHARED, active) if case.groups > 4 else 1
    scores = torch.rand(case.tokens, case.groups - shared, generator=gen)
    chosen = scores.topk(active - shared, dim=1).indices + shared              # [T, k]
    mask = torch.zeros(case.tokens, case.groups, dtype=torch.bool)
    mask[:, :shared] = True
    mask.scatter_(1, chosen, True)
    return mask.to(device)


def providers(case: Case, device: str, dtype: torch.dtype, compile_ref: bool) -> tuple[dict[str, Callable], dict]:
    """The callables to time and the work they do (bytes of active weight, activated FLOPs)."""
    from mohdify.codegen.read.launch import read_triton
    from mohdify.codegen.read.naive import read_naive
    from mohdify.codegen.write.launch import write_triton
    from mohdify.codegen.write.naive import write_naive

    gen = torch.Generator().manual_seed(0)
    mask = routing(case, gen, device)                                          # [T, N]
    group_size = case.dim // case.groups
    union = mask.any(0).float().mean().item()
    active_dim = round(case.delta * case.dim)
    t, inner = case.tokens, case.layer.inner

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(device=device, dtype=dtype)

    if case.layer.kind == "read":
        x, w = rand(t, case.dim), rand(inner, case.dim)                        # [T, D], [O, D]
        w_act = w[:, :active_dim].contiguous()                                 # [O, delta D]
        x_act = x[:, :active_dim].contiguous()
        fns = {
            "dense": lambda: F.linear(x, w),
            "dense_active": lambda: F.linear(x_act, w_act),
            "naive": lambda: read_naive(x, w, None, mask, None),
            "fused": lambda: read_triton(x, w, None, mask, None),
        }
        if compile_ref:
            compiled = torch.compile(read_naive, dynamic=False)
            fns["compiled"] = lambda: compiled(x, w, None, mask, None)
    else:
        u, w = rand(t, inner), rand(case.dim, inner)                           # [T, I], [D, I]
        gates = mask.to(dtype)                                                 # [T, N]
        fusion = (torch.eye(case.groups) + 0.01).to(device=device, dtype=dtype) if case.layer.fusion else None
        w_act = w[:active_dim].contiguous()                                    # [delta D, I]
        fns = {
            "dense": lambda: F.linear(u, w),
            "dense_active": lambda: F.linear(u, w_act),
            "naive": lambda: write_naive(u, w, None, gates, fusion),
            "fused": lambda: write_triton(u, w, None, gates, fusion),
        }
        if compile_ref:
            compiled = torch.compile(write_naive, dynamic=False)
            fns["compiled"] = lambda: compiled(u, w, None, gates, fusion)
    weight_bytes = w.numel() * w.element_size()
    work = {"group_size": group_size, "union": union, "active_weight_bytes": weight_bytes * case.delta,
            "union_weight_bytes": weight_bytes * union, "active_flops": 2.0 * t * inner * case.dim * case.delta}
    return fns, work


def run_case(case: Case, device: str, dtype: torch.dtype, reps: int, only: Optional[set[str]],
             compile_ref: bool) -> list[dict]:
    fns, work = providers(case, device, dtype, compile_ref)
    rows, dense_ms = [], None
    for name in PROVIDERS:
        if name not in fns or (only and name not in only):
            continue
        ms = bench_ms(fns[name], device=device, graph=case.phase == "decode", reps=reps)
        dense_ms = ms if name == "dense" else dense_ms
        row = {"phase": case.phase, "layer": case.layer.name, "tokens": case.tokens, "delta": case.delta,
               "dim": case.dim, "inner": case.layer.inner, "groups": case.groups, "provider": name, "ms": ms,
               "union": work["union"]}
        if case.phase == "decode":
            # Useful bytes: the weight of the groups some token uses (all of it for "dense").
            useful = work["union_weight_bytes"] if name != "dense" else work["active_weight_bytes"] / case.delta
            row["tbps"] = useful / (ms * 1e-3) / 1e12
            row["frac_ceiling"] = row["tbps"] / COPY_TBPS
        else:
            row["tflops"] = work["active_flops"] / (ms * 1e-3) / 1e12
            row["frac_ceiling"] = row["tflops"] / BF16_TFLOPS
        rows.append(row)
    reference = fns["naive"]().float()
    scale = max(1.0, reference.abs().max().item())
    for row in rows:
        row["speedup_vs_dense"] = dense_ms / row["ms"] if dense_ms else None
        if row["provider"] in ("fused", "compiled"):
            # The timed paths must compute the reference's numbers: error relative to the output scale.
            row["rel_err_vs_naive"] = (fns[row["provider"]]().float() - reference).abs().max().item() / scale
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench_out", help="directory for the JSON and table files")
    p.add_argument("--phase", choices=("decode", "prefill", "all"), default="all")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma list out of {','.join(PROVIDERS)}")
    p.add_argument("--reps", type=int, default=200, help="do_bench repetition time in ms")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile(reference) provider")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes on CPU under TRITON_INTERPRET=1 (plumbing check, not a measurement)")
    p.add_argument("--dry-run", action="store_true", help="list the cases and providers, run nothing")
    return p
