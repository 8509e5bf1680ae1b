"""Triton kernel of the MoHD reader: y = alpha * W[:, A] x[A] + b, reading only active groups.

One program computes a [BM tokens, BN outputs] tile of y. It walks the groups and skips a group
when no token of its tile has it active, so each active group's weight tile is loaded once for all
the tokens of the tile that need it (decode: one tile holds every token) and partial products stay
in fp32 registers across a token's groups (prefill). Tokens of the tile that do not use the group
contribute zeros (their x tile rows are masked on load).

With SPLIT > 1 the groups are dealt round-robin over SPLIT programs per tile that add their fp32
partials into a zeroed fp32 output with atomics: for decode, where T/BM x O/BN tiles alone do not
fill the GPU. alpha is linear and bias is added by split 0 only, so both stay fused.

Shape legend: T = tokens, D = in_features = N * G, O = out_features, N = groups, G = group size.
"""

import triton
import triton.language as tl


@triton.jit
def read_kernel(
    x_ptr, w_ptr, b_ptr, mask_ptr, alpha_ptr, y_ptr,
    T, O, N,
    stride_xt, stride_xd,
    stride_wo, stride_wd,
    stride_mt, stride_mn,
    stride_a,
    stride_yt, stride_yo,
    G: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALPHA: tl.constexpr, SPLIT: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)                                    # [BM] tokens
    offs_n = pid_n * BN + tl.arange(0, BN)                                    # [BN] outputs
    offs_k = tl.arange(0, BK)                                                 # [BK]
    tok_ok = offs_m < T                                                       # [BM]
    out_ok = offs_n < O                                                       # [BN]
    acc = tl.zeros((BM, BN), dtype=tl.float32)                                # [BM, BN]
    for n in range(pid_s, N, SPLIT):
        active = tl.load(mask_ptr + offs_m * stride_mt + n * stride_mn, mask=tok_ok, other=0) != 0  # [BM]
        if tl.max(active.to(tl.int32), axis=0) > 0:
            for k0 in range(0, G, BK):
                d = n * G + k0 + offs_k                                       # [BK] input dims of group n
                xt = tl.load(x_ptr + offs_m[:, None] * stride_xt + d[None, :] * stride_xd,
                             mask=active[:, None], other=0.0)                 # [BM, BK]
                wt = tl.load(w_ptr + d[:, None] * stride_wd + offs_n[None, :] * stride_wo,
                             mask=out_ok[None, :], other=0.0)                 # [BK, BN] = W[n-block, k-block].T
                if UPCAST:
                    xt = xt.to(tl.float32)
                    wt = wt.to(tl.float32)
                if IEEE:
                    acc = tl.dot(xt, wt, acc, input_precision="ieee")         # [BM, BN]
                else:
                    acc = tl.dot(xt, wt, acc)                                 # [BM, BN]
    if HAS_ALPHA:
        alpha = tl.load(alpha_ptr + offs_m * stride_a, mask=tok_ok, other=0.0).to(tl.float32)  # [BM]
        acc = acc * alpha[:, None]                                            # [BM, BN]
    if HAS_BIAS:
        bias = tl.load(b_ptr + offs_n, mask=out_ok, other=0.0).to(tl.float32)  # [BN]
        if SPLIT > 1:
            bias = tl.where(pid_s == 0, bias, 0.0)                            # [BN] only split 0 adds it
        acc = acc + bias[None, :]                                             # [BM, BN]
    y_ptrs = y_ptr + offs_m[:, None] * stride_yt + offs_n[None, :] * stride_yo
    ok = tok_ok[:, None] & out_ok[None, :]                                    # [BM, BN]
    if SPLIT > 1:
        tl.atomic_add(y_ptrs, acc, mask=ok)                                   # y is fp32 here
    else:
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=ok)
