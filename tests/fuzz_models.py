"""Transformer-shaped models built from parts, with their readers and writers known by construction.

A `Spec` (drawn by hypothesis in tests/passes/test_fuzz.py) fixes every choice; `build(spec)` makes the
model and says what the analysis must find: the exact readers and writer of every branch, the branch
holder's name, and the distractor layers that must stay dense. Parts:
  norms: LayerNorm, F.rms_norm, Llama-style RMSNorm (x.to(float32) ... .to(dtype)), none;
  placements: pre-norm, post-norm (norm after the add; with a scaled stream term this is DeepNorm,
    LN(alpha * h + f(h))), sandwich (an RMSNorm on the branch output too);
  attention: separate q/k/v, fused qkv, multi-query (q and a fused kv), with a Linear subclass
    computing `x @ W.T + b` or plain nn.Linear;
  MLPs: plain (up, act, down), gated (gate, up, down), fused (gate_up), nn.Sequential(Linear, GELU, Linear),
    an MoE of stacked (3-D) expert weights with an nn.Linear router (left dense, with reasons), a
    Mixtral-style MoE looping over nn.Linear experts that skips experts no token chose (left dense);
  control flow: a data-dependent Python `if` at the top of a block (export refuses it; the real-value
    front-end follows it);
  residuals: sequential, or parallel (one or two norms) summed in any order, written `+`, `torch.add`,
    `h.add(f)`, or `h.clone().add_(f, alpha=1.0)`; the stream term scaled or cast to float32;
    dropout and a LayerScale on branch outputs;
  distractors: an output head (tied to the embedding or not), a pooler, a probe whose output joins the
    result, a sigmoid gate on
    an MLP branch output (reads the branch input, only gates).
Module names are drawn too. Every linear layer of the model is either a reader, a writer, an inner
layer (in_features != D) or a distractor.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 40


@dataclass(frozen=True)
class LayerSpec:
    attn: str          # "separate" | "fused" | "mqa"
    mlp: str           # "plain" | "gated" | "fused" | "sequential" | "moe"
    residual: str      # "sequential" | "parallel1" (one norm) | "parallel2" (two norms)
    order: tuple       # parallel: order of the terms ("x", "a", "m") in the sum
    add: str           # "+" | "torch.add" | "method" | "inplace"
    scale: float       # factor on the stream term (1.0: none)
    cast: bool         # residual.to(torch.float32) on the stream term
    layer_scale: bool  # a learned per-channel scale on branch outputs
    gate: bool         # a sigmoid gate (a Linear D -> 1) on the MLP output
    xwt: bool          # linears are a Linear subclass computing x @ W.T + b
    data_if: bool = False   # the block's forward starts with a Python `if` on a tensor's value


@dataclass(frozen=True)
class Spec:
    d: int
    heads: int
    norm: str          # "layer" | "rms_f" | "rms_up" | "none"
    placement: str     # "pre" | "post" | "sandwich" (RMS norms only)
    layers: tuple      # LayerSpec per layer
    names: tuple       # (blocks, attn, mlp) attribute names
    pooler: bool
    probe: bool
    tied: bool = False   # the head shares the embedding's weight
    seed: int = 0


class XWT(nn.Linear):
    """A linear layer whose forward is written `x @ W.T + b` (FalconLinear style)."""

    def forward(self, x):
        y = x @ self.weight.T
        return y if self.bias is None else y + self.bias


class RMSNormUp(nn.Module):
    """Llama-style RMSNorm: computed in float32, cast back."""

    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class RMSNormF(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(kind: str, d: int) -> nn.Module:
    return {"layer": lambda: nn.LayerNorm(d), "rms_f": lambda: RMSNormF(d), "rms_up": lambda: RMSNormUp(d),
            "none": nn.Identity}[kind]()


ATTN_READERS = {"separate": ["q_proj", "k_proj", "v_proj"], "fused": ["qkv"], "mqa": ["q_proj", "kv_proj"]}
MLP_PARTS = {"plain": (["up"], "down"), "gated": (["gate_proj", "up_proj"], "down_proj"),
             "fused": (["gate_up"], "down_proj")}


class Attention(nn.Module):
    def __init__(self, d, heads, kind, lin):
        super().__init__()
        self.d, self.heads, self.kind, self.hd = d, heads, kind, d // heads
        if kind == "separate":
            self.q_proj, self.k_proj, self.v_proj = lin(d, d), lin(d, d), lin(d, d)
        elif kind == "fused":
            self.qkv = lin(d, 3 * d)
        else:   # multi-query: one k/v head
            self.q_proj, self.kv_proj = lin(d, d), lin(d, 2 * self.hd)
        self.o_proj = lin(d, d)

    def forward(self, x):
        b, t, _ = x.shape
        if self.kind == "separate":
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        elif self.kind == "fused":
            q, k, v = self.qkv(x).split(self.d, dim=-1)
        else:
            q = self.q_proj(x)
            k, v = self.kv_proj(x).split(self.hd, dim=-1)
        q = q.view(b, t, self.heads, self.hd).transpose(1, 2)
        kv_heads = k.shape[-1] // self.hd
        k = k.view(b, t, kv_heads, self.hd).transpose(1, 2)
        v = v.view(b, t, kv_heads, self.hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != self.heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.d))


class MLP(nn.Module):
    def __init__(self, d, kind, lin):
        super().__init__()
        self.kind, hidden = kind, 2 * d
        if kind == "plain":
            self.up, self.down = lin(d, hidden), lin(hidden, d)
        elif kind == "gated":
            self.gate_proj, self.up_proj, self.down_proj = lin(d, hidden), lin(d, hidden), lin(hidden, d)
        elif kind == "fused":
            self.gate_up, self.down_proj = lin(d, 2 * hidden), lin(hidden, d)

    def forward(self, x):
        if self.kind == "plain":
            return self.down(F.gelu(self.up(x)))
        if self.kind == "gated":
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        g, u = self.gate_up(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(g) * u)


class MoE(nn.Module):
    """Stacked expert weights (3-D parameters) weighted by a softmax router (an nn.Linear), Mixtral-like
    but dense over experts: no linear writer, so the branch stays dense with a reason."""

    def __init__(self, d, experts=3):
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.w_in = nn.Parameter(torch.randn(experts, d, 2 * d) / math.sqrt(d))
        self.w_out = nn.Parameter(torch.randn(experts, 2 * d, d) / math.sqrt(2 * d))

    def forward(self, x):
        p = torch.softmax(self.router(x), dim=-1)
        out = p[..., :1] * (F.gelu(x @ self.w_in[0]) @ self.w_out[0])
        for e in range(1, self.w_in.shape[0]):
            out = out + p[..., e:e + 1] * (F.gelu(x @ self.w_in[e]) @ self.w_out[e])
        return out


class MoELoop(nn.Module):
    """Mixtral-style: top-2 of a softmax router, a loop over nn.Linear experts that skips (`continue`)
    the experts no token chose (a data-dependent Python branch) and scatters each expert's tokens back.
    Its experts read token subsets, so the block stays dense, with reasons."""

    def __init__(self, d, experts=4):
        super().__init__()
        self.router = nn.Linear(d, experts)
        self.experts = nn.ModuleList(nn.ModuleDict({"w1": nn.Linear(d, 2 * d), "w2": nn.Linear(2 * d, d)})
                                     for _ in range(experts))

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])                                      # [T, D]
        weights, chosen = torch.softmax(self.router(flat), -1).topk(2, dim=-1)  # [T, 2]
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel() == 0:
                continue
            y = expert["w2"](F.gelu(expert["w1"](flat[token])))               # [t, D]
            out = out.index_add(0, token, weights[token, slot, None] * y)
        return out.view_as(x)


def _add(h, f, how: str):
    if how == "+":
        return h + f
    if how == "torch.add":
        return torch.add(h, f)
    if how == "method":
        return h.add(f)
    out = h.clone()
    out.add_(f, alpha=1.0)
    return out


class Block(nn.Module):
    def __init__(self, spec: Spec, ls: LayerSpec, names):
        super().__init__()
        d = spec.d
        lin = XWT if ls.xwt else nn.Linear
        self.ls, self.norm_kind, self.placement, self.names = ls, spec.norm, spec.placement, names
        setattr(self, names[1], Attention(d, spec.heads, ls.attn, lin))
        if ls.mlp == "sequential":
            setattr(self, names[2], nn.Sequential(lin(d, 2 * d), nn.GELU(), lin(2 * d, d)))
        elif ls.mlp == "moe":
            setattr(self, names[2], MoE(d))
        elif ls.mlp == "moe_loop":
            setattr(self, names[2], MoELoop(d))
        else:
            setattr(self, names[2], MLP(d, ls.mlp, lin))
        self.norm1 = make_norm(spec.norm, d)
        self.norm2 = make_norm(spec.norm, d)
        if spec.placement == "sandwich":
            self.post1, self.post2 = make_norm(spec.norm, d), make_norm(spec.norm, d)
        self.drop = nn.Dropout(0.1)
        if ls.layer_scale:
            self.gamma1 = nn.Parameter(torch.full((d,), 0.5))
            self.gamma2 = nn.Parameter(torch.full((d,), 0.5))
        if ls.gate:
            self.gate = nn.Linear(d, 1)

    def _stream(self, x):
        if self.ls.cast:
            x = x.to(torch.float32)
        return x * self.ls.scale if self.ls.scale != 1.0 else x

    def _branch(self, which, x):
        mod = getattr(self, self.names[1] if which == "a" else self.names[2])
        norm = self.norm2 if which == "m" and self.ls.residual != "parallel1" else self.norm1
        inp = norm(x) if self.placement in ("pre", "sandwich") else x
        out = self.drop(mod(inp))
        if self.placement == "sandwich":
            out = (self.post1 if which == "a" else self.post2)(out)
        if self.ls.layer_scale:
            out = out * (self.gamma1 if which == "a" else self.gamma2)
        if which == "m" and self.ls.gate:
            out = torch.sigmoid(self.gate(inp)) * out
        return out

    def _close(self, h, which="a"):
        if self.placement == "post":
            return (self.norm1 if which == "a" else self.norm2)(h)
        return h

    def forward(self, x):
        ls = self.ls
        if ls.data_if and not bool(x.abs().amax() >= 0):   # never taken for finite inputs; decided by value
            return x
        if ls.residual == "sequential":
            x = self._close(_add(self._stream(x), self._branch("a", x), ls.add), "a")
            return self._close(_add(self._stream(x), self._branch("m", x), ls.add), "m")
        terms = {"x": self._stream(x), "a": self._branch("a", x), "m": self._branch("m", x)}
        t0, t1, t2 = (terms[k] for k in ls.order)
        return self._close(_add(_add(t0, t1, ls.add), t2, ls.add), "a")


class FuzzNet(nn.Module):
    def __init__(self, spec: Spec):
        super().__init__()
        d = spec.d
        self.spec = spec
        self.embed = nn.Embedding(VOCAB, d)
        setattr(self, spec.names[0], nn.ModuleList(Block(spec, ls, spec.names) for ls in spec.layers))
        self.final_norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB, bias=not spec.tied)
        if spec.tied:
            self.head.weight = self.embed.weight
        if spec.pooler:
            self.pooler = nn.Linear(d, d)
        if spec.probe:
            self.probe = nn.Linear(d, 3)

    def forward(self, ids):
        x = self.embed(ids)
        for i, block in enumerate(getattr(self, self.spec.names[0])):
            x = block(x)
            if i == 0 and self.spec.probe:
                probe = self.probe(x).mean()
        h = self.final_norm(x)
        out = self.head(h)
        if self.spec.pooler:
            out = out + torch.tanh(self.pooler(h[:, 0])).sum(-1)[:, None, None]
        if self.spec.probe:
            out = out + probe
        return out


@dataclass
class Expected:
    branches: dict[str, tuple[list[str], str]] = field(default_factory=dict)   # holder -> (readers, writer)
    dense: list[str] = field(default_factory=list)                             # distractors: must stay dense


def expected(spec: Spec) -> Expected:
    out = Expected(dense=["head"] + (["pooler"] if spec.pooler else []) + (["probe"] if spec.probe else []))
    blocks, attn, mlp = spec.names
    for i, ls in enumerate(spec.layers):
        root = f"{blocks}.{i}"
        a = f"{root}.{attn}"
        readers = ATTN_READERS[ls.attn]
        out.branches[a] = ([f"{a}.{r}" for r in readers], f"{a}.o_proj")
        m = f"{root}.{mlp}"
        if ls.mlp == "sequential":
            out.branches[root] = ([f"{m}.0"], f"{m}.2")
        elif ls.mlp == "moe":
            out.dense += [m, f"{m}.router"]
        elif ls.mlp == "moe_loop":
            out.dense += [m, f"{m}.router"] + [f"{m}.experts.{e}.{w}" for e in range(4) for w in ("w1", "w2")]
        else:
            rs, w = MLP_PARTS[ls.mlp]
            out.branches[m] = ([f"{m}.{r}" for r in rs], f"{m}.{w}")
        if ls.gate:
            out.dense.append(f"{root}.gate")
    return out


def build(spec: Spec) -> tuple[nn.Module, tuple]:
    torch.manual_seed(spec.seed)
    model = FuzzNet(spec).eval()
    with torch.no_grad():   # weights small enough that outputs stay O(1)
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name and not (spec.tied and name == "head.weight"):
                p.mul_(1.0 / math.sqrt(max(1.0, p.shape[1] / 8)))
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(spec.seed))
    return model, (ids,)
