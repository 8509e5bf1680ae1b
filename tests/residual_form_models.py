"""Small models, one per residual form (tests/passes/test_residual_forms.py): each is the minimal model that
showed one way the analysis missed a branch, found a false one, or gave an untrue reason."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

D = 32


class Attn(nn.Module):
    def __init__(self, lin=nn.Linear):
        super().__init__()
        self.q, self.k, self.v, self.o = lin(D, D), lin(D, D), lin(D, D), lin(D, D)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 4, -1)
        return self.o(a @ self.v(x))


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(D, 64), nn.Linear(64, D)

    def forward(self, x):
        return self.down(F.gelu(self.up(x)))


class RMSNorm(nn.Module):
    """kind "f": F.rms_norm; kind "up": Llama's fp32 upcast, x.to(float32) ... .to(dtype)."""

    def __init__(self, kind):
        super().__init__()
        self.weight, self.kind = nn.Parameter(torch.ones(D)), kind

    def forward(self, x):
        if self.kind == "f":
            return F.rms_norm(x, (D,), self.weight, 1e-6)
        dtype, h = x.dtype, x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dtype)


SUMS = {   # parallel attention + MLP, summed in several orders and spellings
    "x + a + m": lambda x, a, m: x + a + m,
    "(x + a) + m": lambda x, a, m: (x + a) + m,
    "a + m + x": lambda x, a, m: a + m + x,
    "m + x + a": lambda x, a, m: m + x + a,
    "x.add(a).add(m)": lambda x, a, m: x.add(a).add(m),
    "torch.add(torch.add(x, a), m)": lambda x, a, m: torch.add(torch.add(x, a), m),
}


class Parallel(nn.Module):
    def __init__(self, how, norms="one"):
        super().__init__()
        self.how = how
        self.n = nn.LayerNorm(D) if norms == "one" else RMSNorm("up")
        self.n2 = RMSNorm("up") if norms == "two" else None
        self.attn, self.mlp = Attn(), MLP()

    def forward(self, x):
        return SUMS[self.how](x, self.attn(self.n(x)), self.mlp((self.n2 or self.n)(x)))


class DeepNorm(nn.Module):
    """Post-norm with a scaled stream term: LN(alpha * h + f(h))."""

    def __init__(self):
        super().__init__()
        self.attn, self.mlp, self.n1, self.n2 = Attn(), MLP(), nn.LayerNorm(D), nn.LayerNorm(D)

    def forward(self, x):
        x = self.n1(2.0 * x + self.attn(x))
        return self.n2(x * 2.0 + self.mlp(x))


class AddForms(nn.Module):
    """Residual adds written h.add(f), h.add_(f, alpha=...) and torch.add."""

    def __init__(self):
        super().__init__()
        self.n, self.n2, self.attn, self.mlp = nn.LayerNorm(D), nn.LayerNorm(D), Attn(), MLP()

    def forward(self, x):
        x = x.add(self.attn(self.n(x)))
        y = x.clone()
        y.add_(self.mlp(self.n2(x)), alpha=0.5)
        return torch.add(y, self.attn(self.n(y)))


class IAdd(AddForms):
    """Residual adds written +=."""

    def forward(self, x):
        x = x.clone()
        x += self.attn(self.n(x))
        x += self.mlp(self.n2(x))
        return x


class CastStream(nn.Module):
    """The residual kept in float32: residual.to(torch.float32) + f (Mamba's residual_in_fp32)."""

    def __init__(self):
        super().__init__()
        self.n, self.mlp = nn.LayerNorm(D), MLP()

    def forward(self, x):
        return self.mlp(self.n(x)) + x.to(torch.float32)


class RMSBlock(nn.Module):
    """Pre-norm block with an RMSNorm of either form; the MLP an nn.Sequential(Linear, GELU, Linear)."""

    def __init__(self, kind):
        super().__init__()
        self.n, self.n2, self.attn = RMSNorm(kind), RMSNorm(kind), Attn()
        self.mlp = nn.Sequential(nn.Linear(D, 64), nn.GELU(), nn.Linear(64, D))

    def forward(self, x):
        x = x + self.attn(self.n(x))
        return x + self.mlp(self.n2(x))


class XWT(nn.Linear):
    def forward(self, x):
        return x @ self.weight.T + self.bias


class Twice(nn.Module):
    """One block applied twice, its linears written x @ W.T + b."""

    def __init__(self):
        super().__init__()
        self.n, self.attn = nn.LayerNorm(D), Attn(XWT)

    def forward(self, x):
        for _ in range(2):
            x = x + self.attn(self.n(x))
        return x


class WeightForms(nn.Module):
    """Weight products that are not calls of a linear layer: F.linear on slices of a fused weight,
    W @ x, einsum with a Linear's weight, a bare nn.Parameter."""

    def __init__(self):
        super().__init__()
        self.n, self.n2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.w_in = nn.Parameter(torch.randn(D, 64) / 8)
        self.fc2 = nn.Linear(64, D)

    def forward(self, x):
        h = self.n(x)
        q = F.linear(h, self.qkv.weight[:D], self.qkv.bias[:D])
        k = F.linear(h, self.qkv.weight[D:2 * D])
        v = h @ self.qkv.weight[2 * D:].T
        a = torch.softmax(q @ k.transpose(-1, -2) / 4, -1)
        x = x + torch.einsum("btd,od->bto", a @ v, self.o.weight)
        return x + self.fc2(F.gelu(self.n2(x) @ self.w_in))


class Net(nn.Module):
    def __init__(self, block, layers=2):
        super().__init__()
        self.h = nn.ModuleList(block() for _ in range(layers))
        self.head = nn.Linear(D, 5)

    def forward(self, x):
        for b in self.h:
            x = b(x)
        return self.head(x)


class BreakBlock(nn.Module):
    """A block whose loop has a data-dependent branch when `brk`: dynamo skips its whole frame."""

    def __init__(self, brk):
        super().__init__()
        self.n, self.n2, self.attn, self.mlp, self.brk = nn.LayerNorm(D), nn.LayerNorm(D), Attn(), MLP(), brk

    def forward(self, x):
        for i in range(2):
            if self.brk and x.abs().amax() > 1e6:
                x = x / 2
            x = x + (self.attn(self.n(x)) if i == 0 else self.mlp(self.n2(x)))
        return x


class LoopBreakBlock(BreakBlock):
    """A block with a graph break in its loop that torch.export does not mind (torch._dynamo.graph_break)."""

    def __init__(self):
        super().__init__(False)

    def forward(self, x):
        for i in range(2):
            torch._dynamo.graph_break()
            x = x + (self.attn(self.n(x)) if i == 0 else self.mlp(self.n2(x)))
        return x


class BreakNet(Net):
    """torch.export fails (data-dependent branch), so capture uses dynamo."""

    def forward(self, x):
        for b in self.h:
            x = b(x)
        if x.abs().amax() > 1e6:
            x = x / 2
        return self.head(x)


def branches_of(prefix_fmt: str, layers: int = 2, mlp: bool = True) -> dict:
    out = {}
    for i in range(layers):
        p = prefix_fmt.format(i=i)
        out[f"{p}.attn"] = ([f"{p}.attn.{r}" for r in "qkv"], f"{p}.attn.o")
        if mlp:
            out[f"{p}.mlp"] = ([f"{p}.mlp.up"], f"{p}.mlp.down")
    return out
