"""Triton kernel of the MoHD reader: y = alpha * W[:, A] x[A] + b, reading only active groups.

One program computes a [BM tokens, BN outputs] tile of y. It walks the groups and skips a group
when no token of its tile has it active, so each active group's weight tile is loaded once for all
the tokens of the tile that need it (decode: one tile holds every token) and partial products stay
in fp32 registers across a token's groups (prefill). Tokens of the tile that do not use the group
contribute zeros (their x tile rows are masked on load).

With SPLIT > 1 the groups are dealt round-robin over SPLIT programs per tile that add their fp32
partials into a zeroed fp32 output with atomics: for decode, where T/BM x O/BN tiles alone do not
fill the GPU. alpha is linear and bias is added by split 0 only, so both stay fused.

`read_multi_kernel` runs one reader, or several of the same input (q|k|v, gate|up), in one launch.

Shape legend: T = tokens, D = in_features = N * G, O = out_features, N = groups, G = group size.
"""

import triton
import triton.language as tl


@triton.jit
def read_tile(
    x_ptr, w_ptr, b_ptr, mask_ptr, alpha_ptr, y_ptr,
    pid_m, pid_n, pid_s,
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
    """One [BM, BN] tile of y (tile pid_m, pid_n; split pid_s): the body of `read_multi_kernel`."""
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


@triton.jit
def read_multi_kernel(
    x_ptr, mask_ptr, alpha_ptr,
    w0_ptr, b0_ptr, y0_ptr, w1_ptr, b1_ptr, y1_ptr, w2_ptr, b2_ptr, y2_ptr, w3_ptr, b3_ptr, y3_ptr,
    O0, O1, O2, O3,
    E1, E2, E3,
    T, N,
    stride_xt, stride_xd,
    stride_mt, stride_mn,
    stride_a,
    stride_wo0, stride_wd0, stride_wo1, stride_wd1, stride_wo2, stride_wd2, stride_wo3, stride_wd3,
    G: tl.constexpr, NUM_W: tl.constexpr,
    HAS_B0: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_B3: tl.constexpr,
    HAS_ALPHA: tl.constexpr, SPLIT: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """Up to 4 readers of the same x, mask and alpha in one launch. The column tiles of the
    outputs are concatenated along grid axis 1: tiles [0, E1) are weight 0's, [E1, E2) weight 1's,
    [E2, E3) weight 2's, [E3, ...) weight 3's. Each program picks its weight by that offset and
    runs `read_tile` on it; outputs y_i are contiguous [T, O_i] (row stride O_i)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    if pid_n < E1:
        read_tile(x_ptr, w0_ptr, b0_ptr, mask_ptr, alpha_ptr, y0_ptr, pid_m, pid_n, pid_s, T, O0, N,
                  stride_xt, stride_xd, stride_wo0, stride_wd0, stride_mt, stride_mn, stride_a, O0, 1,
                  G, HAS_B0, HAS_ALPHA, SPLIT, UPCAST, IEEE, BM, BN, BK)
    elif NUM_W > 1:
        if pid_n < E2:
            read_tile(x_ptr, w1_ptr, b1_ptr, mask_ptr, alpha_ptr, y1_ptr, pid_m, pid_n - E1, pid_s, T, O1, N,
                      stride_xt, stride_xd, stride_wo1, stride_wd1, stride_mt, stride_mn, stride_a, O1, 1,
                      G, HAS_B1, HAS_ALPHA, SPLIT, UPCAST, IEEE, BM, BN, BK)
        elif NUM_W > 2:
            if pid_n < E3:
                read_tile(x_ptr, w2_ptr, b2_ptr, mask_ptr, alpha_ptr, y2_ptr, pid_m, pid_n - E2, pid_s, T, O2, N,
                          stride_xt, stride_xd, stride_wo2, stride_wd2, stride_mt, stride_mn, stride_a, O2, 1,
                          G, HAS_B2, HAS_ALPHA, SPLIT, UPCAST, IEEE, BM, BN, BK)
            elif NUM_W > 3:
                read_tile(x_ptr, w3_ptr, b3_ptr, mask_ptr, alpha_ptr, y3_ptr, pid_m, pid_n - E3, pid_s, T, O3, N,
                          stride_xt, stride_xd, stride_wo3, stride_wd3, stride_mt, stride_mn, stride_a, O3, 1,
                          G, HAS_B3, HAS_ALPHA, SPLIT, UPCAST, IEEE, BM, BN, BK)
