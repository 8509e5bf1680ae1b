"""Models for the end-to-end benchmarks: llama-style shapes with random weights, the ideal stand-in,
MoHD configs at a density, and a greedy static-KV-cache decoder that works on HF's
LlamaForCausalLM (transformers 4.4x-5.x cache APIs) and on the self-written LiteLlama.

The ideal stand-in is the dense model with every reader's in_features and every writer's
out_features cut to the active width a = delta * D: built as the same architecture with residual
width a, the attention width (heads * head_dim) and the FFN width kept, and the output head kept at
full width D (the final hidden state is zero-padded to D), because MoHD leaves the head dense.
"""

from __future__ import annotations

import contextlib
import inspect
import time
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from lite_llama import KVCache, LiteConfig, LiteLlama
from torch import Tensor, nn

__all__ = ["Shape", "SHAPES", "build_model", "mohd_config", "active_groups", "active_width", "randomise_routers",
           "Decoder", "choose_impl", "count_params"]


@dataclass(frozen=True)
class Shape:
    name: str
    dim: int
    layers: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int = 32000

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    def to_dict(self) -> dict:
        return {**asdict(self), "head_dim": self.head_dim}


SHAPES = {
    # The shapes: 0.85B (TinyLlama-like width, 4 KV heads of 128) and 7.24B (Mistral-7B-like).
    "small": Shape("small", dim=2048, layers=16, ffn=5632, heads=16, kv_heads=4),
    "large": Shape("large", dim=4096, layers=32, ffn=14336, heads=32, kv_heads=8),
    # CPU plumbing check: D 64 in 4 groups of 16 (the kernels' minimum group size).
    "smoke": Shape("smoke", dim=64, layers=2, ffn=96, heads=4, kv_heads=2, vocab=128),
}


def active_groups(delta: float, groups: int) -> int:
    """delta * N, required to be a whole number of groups between 1 and N."""
    active = delta * groups
    if abs(active - round(active)) > 1e-9 or not 1 <= round(active) <= groups:
        raise ValueError(f"density {delta} is not a whole number of active groups out of {groups} "
                         f"(delta * groups = {active}); choose delta in {{1/{groups}, 2/{groups}, ..., 1}}")
    return round(active)


def active_width(dim: int, delta: float, groups: int) -> int:
    """a = delta * D: the ideal stand-in's residual width."""
    return dim // groups * active_groups(delta, groups)


def mohd_config(delta: float, groups: int, router: str):
    """MoHDConfig with delta * groups active groups: half of them shared (rounded down), the rest routed."""
    from mohdify import MoHDConfig

    active = active_groups(delta, groups)
    shared = active // 2
    return MoHDConfig(num_groups=groups, num_shared=shared, top_k=active - shared, router=router)


def randomise_routers(model: nn.Module, std: float, seed: int) -> int:
    """Draw the learned routers N(0, std^2) (they start at zero, which routes every token to the same
    groups); returns how many routers were drawn."""
    import mohdify

    gen = torch.Generator().manual_seed(seed)
    drawn = 0
    for branch in mohdify.branches(model):
        if branch.router is not None and std > 0:
            with torch.no_grad():
                sample = torch.randn(branch.router.shape, generator=gen) * std
                branch.router.copy_(sample.to(branch.router.dtype))
            drawn += 1
    return drawn


def count_params(model: nn.Module) -> dict:
    """Total parameters, and those a decode step reads (all but the embedding table, which is gathered)."""
    total = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else model.embed_tokens
    return {"total": total, "read_per_token": total - emb.weight.numel()}


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


class PaddedHead(nn.Module):
    """The ideal stand-in's output head: full width D, fed the narrow final hidden state zero-padded."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        self.head = head

    def forward(self, h: Tensor) -> Tensor:
        return self.head(F.pad(h, (0, self.head.in_features - h.shape[-1])))   # [B, T, V]


def _hf_config(shape: Shape, dim: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=shape.vocab, hidden_size=dim, intermediate_size=shape.ffn,
                       num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                       num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim, max_position_embeddings=4096,
                       tie_word_embeddings=False, attn_implementation="sdpa")


def build_model(impl: str, shape: Shape, *, dim: Optional[int] = None, device: str, dtype: torch.dtype,
                seed: int) -> nn.Module:
    """A random-weight model of `shape` with residual width `dim` (default shape.dim, the dense model;
    smaller: the ideal stand-in, whose output head keeps width shape.dim). Same seed and dim, same weights."""
    dim = shape.dim if dim is None else dim
    torch.manual_seed(seed)
    with torch.device(device), _default_dtype(dtype):
        if impl == "hf":
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM(_hf_config(shape, dim))
            if dim < shape.dim:
                head = nn.Linear(shape.dim, shape.vocab, bias=False)
                nn.init.normal_(head.weight, std=0.02)
                model.lm_head = PaddedHead(head)
        elif impl == "lite":
            model = LiteLlama(LiteConfig(vocab=shape.vocab, dim=dim, layers=shape.layers, heads=shape.heads,
                                         kv_heads=shape.kv_heads, head_dim=shape.head_dim, ffn=shape.ffn,
                                         head_in=shape.dim))
        else:
            raise ValueError(f"model impl must be 'hf' or 'lite', got {impl!r}")
    return model.to(device=device, dtype=dtype).eval()


class Decoder:
    """Greedy decoding of `batch` sequences with a static KV cache of `length` positions.

    `step(ids [B, T], pos [T]) -> next tokens [B, 1]` runs the model on T tokens at positions `pos`
    (writing their keys / values into the cache) and takes the argmax of the last logits. The prefill
    calls it eagerly; the decode loop calls `compile(...)`'s compiled step, one token at a time.
    """

    def __init__(self, model: nn.Module, impl: str, length: int, batch: int = 1):
        self.model, self.impl, self.length = model, impl, length
        param = next(model.parameters())
        if impl == "lite":
            self.cache = KVCache(model.config, batch, length, device=param.device, dtype=param.dtype)
            return
        from transformers import StaticCache

        wants = inspect.signature(StaticCache.__init__).parameters
        kwargs = {"config": model.config, "max_cache_len": length}
        # transformers 4.4x takes batch size, device and dtype; 5.x allocates lazily on first use.
        optional = {"max_batch_size": batch, "batch_size": batch, "device": param.device, "dtype": param.dtype}
        kwargs.update({k: v for k, v in optional.items() if k in wants})
        self.cache = StaticCache(**kwargs)
        forward = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in forward else "past_key_values"   # renamed in transformers 5.x
        self.pass_cache_position = "cache_position" in forward

    def logits(self, ids: Tensor, pos: Tensor) -> Tensor:
        """`[B, T, V]` logits of `ids` at positions `pos`, through the cache."""
        if self.impl == "lite":
            return self.model(ids, cache=self.cache, pos=pos)
        kwargs = {self.cache_kw: self.cache, "use_cache": True, "position_ids": pos[None]}
        if self.pass_cache_position:
            kwargs["cache_position"] = pos
        return self.model(input_ids=ids, **kwargs).logits

    def step(self, ids: Tensor, pos: Tensor) -> Tensor:
        return self.logits(ids, pos)[:, -1].argmax(-1, keepdim=True)                   # [B, 1]

    def generate(self, step_fn, prompt: Tensor, new_tokens: int, *, cuda_graphs: bool) -> tuple[Tensor, float]:
        """(tokens [B, new_tokens + 1], seconds of the `new_tokens` decode steps). The prefill (eager,
        it gives the first token) is not timed; on CUDA the clock is read after a synchronize."""
        self.cache.reset()
        p = prompt.shape[1]
        if p + new_tokens > self.length:
            raise ValueError(f"prompt {p} + new tokens {new_tokens} exceed the cache length {self.length}")
        cuda = prompt.is_cuda
        with torch.no_grad():
            tok = self.step(prompt, torch.arange(p, device=prompt.device))           # [B, 1]
            positions = torch.arange(p, p + new_tokens, device=prompt.device)         # [n]
            out = [tok]
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            for i in range(new_tokens):
                if cuda_graphs:
                    torch.compiler.cudagraph_mark_step_begin()
                # clone: a CUDA-graph output is overwritten by the next replay.
                tok = step_fn(tok, positions[i:i + 1]).clone()
                out.append(tok)
            if cuda:
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
        return torch.cat(out, dim=1), seconds


def choose_impl(requested: str) -> tuple[str, Optional[str]]:
    """("hf" or "lite", why HF was not used). `auto` uses HF's LlamaForCausalLM if transformers imports
    and a tiny CPU model decodes through its static cache exactly like a full forward pass."""
    if requested in ("hf", "lite"):
        return requested, None
    if requested != "auto":
        raise ValueError(f"--model must be auto, hf or lite, got {requested!r}")
    try:
        import transformers  # noqa: F401
        from transformers import LlamaForCausalLM, StaticCache  # noqa: F401
    except ImportError as err:
        return "lite", f"transformers not importable: {err}"
    shape = SHAPES["smoke"]
    ids = torch.randint(0, shape.vocab, (1, 6), generator=torch.Generator().manual_seed(0))
    try:
        model = build_model("hf", shape, device="cpu", dtype=torch.float32, seed=0)
        with torch.no_grad():
            dec = Decoder(model, "hf", 8)
            first = dec.logits(ids[:, :5], torch.arange(5))
            last = dec.logits(ids[:, 5:], torch.arange(5, 6))
            full = model(input_ids=ids, use_cache=False).logits
    except (TypeError, ValueError, RuntimeError, AttributeError) as err:
        return "lite", (f"transformers {transformers.__version__}: static-cache decode failed: "
                        f"{type(err).__name__}: {err}")
    got = torch.cat([first, last], dim=1)
    err = (got - full).abs().max().item()
    if err > 1e-4:
        return "lite", (f"transformers {transformers.__version__}: static-cache logits differ from a full "
                        f"forward by {err:.2e}")
    return "hf", None
