"""Triton kernels of the MoHD writer: gathered-row matmul with gates, then group fusion.

`write_kernel` computes a [BM tokens, BN rows] tile of o = g * (W u + b), where the BN rows lie in
one group n (BN divides G). When no token of the tile has a nonzero gate for group n it stores
zeros without touching W: only the output rows of active groups are computed. With SPLIT > 1 the
reduction over I is cut into SPLIT chunks whose fp32 partials are added with atomics into a zeroed
fp32 buffer (decode: D/BN row tiles alone do not fill the GPU); gate and bias are linear, so they
stay fused (bias and residual added by split 0 only).

`mix_kernel` applies group fusion o' = (M (x) I_G) o, i.e. o'[t, i, c] = sum_j M[i, j] o[t, j, c],
skipping j where M[i, j] is zero or where no token of the tile has group j active; it adds the
residual when given. The writer's backward uses it with M transposed (strides swapped).

Shape legend: T = tokens, I = in_features, D = out_features = N * G, N = groups, G = group size.
"""

import triton
import triton.language as tl


@triton.jit
def write_kernel(
    u_ptr, w_ptr, b_ptr, g_ptr, r_ptr, o_ptr,
    T, I, K_PER_SPLIT,
    stride_ut, stride_ui,
    stride_wd, stride_wi,
    stride_gt, stride_gn,
    stride_rt, stride_rd,
    stride_ot, stride_od,
    G: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, SPLIT: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)                                    # [BM] tokens
    rows = pid_n * BN + tl.arange(0, BN)                                      # [BN] output rows, all in group n
    n = (pid_n * BN) // G
    offs_k = tl.arange(0, BK)                                                 # [BK]
    tok_ok = offs_m < T                                                       # [BM]
    gate = tl.load(g_ptr + offs_m * stride_gt + n * stride_gn, mask=tok_ok, other=0.0).to(tl.float32)  # [BM]
    acc = tl.zeros((BM, BN), dtype=tl.float32)                                # [BM, BN]
    if tl.max(tl.abs(gate), axis=0) > 0:
        for k0 in range(pid_s * K_PER_SPLIT, (pid_s + 1) * K_PER_SPLIT, BK):
            k = k0 + offs_k                                                   # [BK]
            k_ok = k < I                                                      # [BK]
            ut = tl.load(u_ptr + offs_m[:, None] * stride_ut + k[None, :] * stride_ui,
                         mask=tok_ok[:, None] & k_ok[None, :], other=0.0)     # [BM, BK]
            wt = tl.load(w_ptr + rows[None, :] * stride_wd + k[:, None] * stride_wi,
                         mask=k_ok[:, None], other=0.0)                       # [BK, BN] = W[rows, k].T
            if UPCAST:
                ut = ut.to(tl.float32)
                wt = wt.to(tl.float32)
            if IEEE:
                acc = tl.dot(ut, wt, acc, input_precision="ieee")             # [BM, BN]
            else:
                acc = tl.dot(ut, wt, acc)                                     # [BM, BN]
        if HAS_BIAS:
            bias = tl.load(b_ptr + rows).to(tl.float32)                       # [BN]
            if SPLIT > 1:
                bias = tl.where(pid_s == 0, bias, 0.0)                        # [BN] only split 0 adds it
            acc = acc + bias[None, :]                                         # [BM, BN]
        acc = acc * gate[:, None]                                             # [BM, BN]
    ok = tok_ok[:, None] & (rows[None, :] >= 0)                               # [BM, BN]
    if HAS_RESIDUAL:
        res = tl.load(r_ptr + offs_m[:, None] * stride_rt + rows[None, :] * stride_rd,
                      mask=ok, other=0.0).to(tl.float32)                      # [BM, BN]
        if SPLIT > 1:
            res = tl.where(pid_s == 0, res, 0.0)
        acc = acc + res
    o_ptrs = o_ptr + offs_m[:, None] * stride_ot + rows[None, :] * stride_od
    if SPLIT > 1:
        tl.atomic_add(o_ptrs, acc, mask=ok)                                   # o is fp32 here
    else:
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=ok)


@triton.jit
def mix_kernel(
    o_ptr, m_ptr, g_ptr, r_ptr, out_ptr,
    T, N,
    stride_ot, stride_od,
    stride_mi, stride_mj,
    stride_gt, stride_gn,
    stride_rt, stride_rd,
    stride_yt, stride_yd,
    G: tl.constexpr,
    HAS_GATES: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)                                    # [BM] tokens
    cols = pid_n * BN + tl.arange(0, BN)                                      # [BN] dims of output group i
    i = (pid_n * BN) // G
    c = cols - i * G                                                          # [BN] offsets inside a group
    tok_ok = offs_m < T                                                       # [BM]
    ok = tok_ok[:, None] & (c[None, :] >= 0)                                  # [BM, BN]
    acc = tl.zeros((BM, BN), dtype=tl.float32)                                # [BM, BN]
    for j in range(0, N):
        coef = tl.load(m_ptr + i * stride_mi + j * stride_mj).to(tl.float32)  # M[i, j]
        used = coef != 0
        if HAS_GATES:
            gate = tl.load(g_ptr + offs_m * stride_gt + j * stride_gn, mask=tok_ok, other=0.0)  # [BM]
            used = used & (tl.max(tl.abs(gate.to(tl.float32)), axis=0) > 0)
        if used:
            oj = tl.load(o_ptr + offs_m[:, None] * stride_ot + (j * G + c)[None, :] * stride_od,
                         mask=ok, other=0.0).to(tl.float32)                   # [BM, BN] group j of o
            acc = acc + coef * oj
    if HAS_RESIDUAL:
        acc = acc + tl.load(r_ptr + offs_m[:, None] * stride_rt + cols[None, :] * stride_rd,
                            mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_m[:, None] * stride_yt + cols[None, :] * stride_yd,
             acc.to(out_ptr.dtype.element_ty), mask=ok)
