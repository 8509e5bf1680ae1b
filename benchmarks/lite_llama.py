"""A small self-written llama-style decoder with a static KV cache: the end-to-end benchmarks' model
when transformers is not installed (or its API does not fit), and the ideal stand-in's twin.

Same computation as HF's LlamaForCausalLM: token embedding, pre-norm blocks of (RMSNorm, GQA
attention with rotary embeddings, residual add, RMSNorm, SwiGLU MLP, residual add), final RMSNorm,
untied output head. It separates the residual width `dim` from the attention width
`heads * head_dim` and the FFN width, so the ideal stand-in is the same class with a narrower `dim`;
`head_in` > `dim` zero-pads the final hidden state so the output head keeps its full width.

Shape legend: B batch, T tokens, L cache length, D residual width, H / Hkv query / key-value heads,
Dh head dim, F FFN width, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LiteConfig", "LiteLlama", "KVCache"]


@dataclass(frozen=True)
class LiteConfig:
    vocab: int
    dim: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    head_in: int = 0          # output head in_features; 0 means dim
    max_positions: int = 4096
    rope_theta: float = 10000.0
    eps: float = 1e-5


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)   # [B, T, D]
        return self.weight * xf.to(x.dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of `x` [B, H, T, Dh] with cos / sin [T, Dh] (HF's rotate_half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Static per-layer key / value tensors [B, Hkv, L, Dh], written in place at the given positions."""

    def __init__(self, config: LiteConfig, batch: int, length: int, *, device, dtype):
        shape = (batch, config.kv_heads, length, config.head_dim)
        self.length = length
        self.layers = [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                       for _ in range(config.layers)]
        for k, v in self.layers:
            # Fixed addresses, so CUDA graphs can replay the in-place cache writes.
            torch._dynamo.mark_static_address(k)
            torch._dynamo.mark_static_address(v)

    def reset(self) -> None:
        for k, v in self.layers:
            k.zero_()
            v.zero_()


class Attention(nn.Module):
    def __init__(self, c: LiteConfig):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = c.heads, c.kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.dim, c.heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.dim, c.kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.dim, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: Optional[tuple[Tensor, Tensor]],
                pos: Tensor) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)       # [B, H, T, Dh]
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)    # [B, Hkv, T, Dh]
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)    # [B, Hkv, T, Dh]
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        mask = None
        if kv is not None:
            cache_k, cache_v = kv
            cache_k.index_copy_(2, pos, k)
            cache_v.index_copy_(2, pos, v)
            k, v = cache_k, cache_v                                                    # [B, Hkv, L, Dh]
            mask = torch.arange(k.shape[2], device=x.device)[None, :] <= pos[:, None]  # [T, L]
        rep = self.heads // self.kv_heads
        k = k.repeat_interleave(rep, dim=1)                                            # [B, H, L, Dh]
        v = v.repeat_interleave(rep, dim=1)                                            # [B, H, L, Dh]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, c: LiteConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.dim, c.ffn, bias=False)
        self.up_proj = nn.Linear(c.dim, c.ffn, bias=False)
        self.down_proj = nn.Linear(c.ffn, c.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: LiteConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.dim, c.eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.dim, c.eps)
        self.mlp = MLP(c)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, kv, pos: Tensor) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, kv, pos)
        return h + self.mlp(self.post_attention_layernorm(h))


class LiteLlama(nn.Module):
    """`forward(input_ids [B, T], cache=None, pos=None) -> logits [B, T, V]`.

    Without a cache the attention is causal over the given tokens (training, capture); with a
    KVCache the tokens' keys / values are written at `pos` [T] and attend to every position <= theirs.
    """

    def __init__(self, config: LiteConfig):
        super().__init__()
        self.config = config
        head_in = config.head_in or config.dim
        if head_in < config.dim:
            raise ValueError(f"LiteConfig.head_in={config.head_in} must be 0 or >= dim={config.dim}")
        self.embed_tokens = nn.Embedding(config.vocab, config.dim)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.dim, config.eps)
        self.lm_head = nn.Linear(head_in, config.vocab, bias=False)
        inv = 1.0 / config.rope_theta ** (torch.arange(0, config.head_dim, 2).float() / config.head_dim)
        angles = torch.outer(torch.arange(config.max_positions).float(), inv)          # [P, Dh / 2]
        angles = torch.cat((angles, angles), dim=-1)                                   # [P, Dh]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                m.weight.normal_(0.0, std)

    def forward(self, input_ids: Tensor, cache: Optional[KVCache] = None, pos: Optional[Tensor] = None) -> Tensor:
        t = input_ids.shape[1]
        if pos is None:
            pos = torch.arange(t, device=input_ids.device)                             # [T]
        h = self.embed_tokens(input_ids)                                               # [B, T, D]
        cos, sin = self.cos[pos].to(h.dtype), self.sin[pos].to(h.dtype)                # [T, Dh]
        for i, block in enumerate(self.layers):
            h = block(h, cos, sin, cache.layers[i] if cache is not None else None, pos)
        h = self.norm(h)
        if self.lm_head.in_features > h.shape[-1]:
            # The ideal stand-in: a narrow residual stream, but the full-width output head.
            h = F.pad(h, (0, self.lm_head.in_features - h.shape[-1]))                  # [B, T, head_in]
        return self.lm_head(h)                                                         # [B, T, V]
