"""A zoo of tiny Transformers with random weights, built from configs (no downloads).

Each entry builds (model, example_inputs) and states what the pass must find: the exact readers
and writer of every branch, and the layers it must leave dense.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 96


@dataclass
class ZooModel:
    name: str
    build: Callable[[], tuple[nn.Module, dict | tuple]]
    hidden_size: int
    branches: dict[str, tuple[list[str], str]]   # writer -> (readers, writer) expected, keyed by branch holder
    never: list[str] = field(default_factory=list)  # layers that must stay dense
    generates: bool = False


def _ids(batch=2, seq=7, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, seq), generator=g)


# ---------------------------------------------------------------- nanoGPT-style, written here
class CausalSelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.c_fc = nn.Linear(d, 4 * d)
        self.c_proj = nn.Linear(4 * d, d)
        self.dropout = nn.Dropout(0.0)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, vocab=VOCAB, d=48, heads=4, layers=2, block_size=32):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block_size, d)
        self.h = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight   # tied
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx):
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def nanogpt():
    torch.manual_seed(0)
    return NanoGPT().eval(), (_ids(),)


# ---------------------------------------------------------------- Hugging Face transformers 5.x
def _hf(cls_name, cfg_name, **cfg):
    import transformers
    torch.manual_seed(0)
    config = getattr(transformers, cfg_name)(**cfg)
    return getattr(transformers, cls_name)(config).eval()


def llama():
    m = _hf("LlamaForCausalLM", "LlamaConfig", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return m, {"input_ids": _ids()}


def qwen2():
    m = _hf("Qwen2ForCausalLM", "Qwen2Config", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return m, {"input_ids": _ids()}


def gpt2():
    m = _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=64,
            bos_token_id=0, eos_token_id=0)
    return m, {"input_ids": _ids()}


def bert():
    m = _hf("BertModel", "BertConfig", vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=96, max_position_embeddings=64)
    return m, {"input_ids": _ids()}


def t5():
    m = _hf("T5ForConditionalGeneration", "T5Config", vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64,
            num_layers=1, num_decoder_layers=1, num_heads=4, decoder_start_token_id=0)
    return m, {"input_ids": _ids(), "decoder_input_ids": _ids(seq=5, seed=1)}


def vit():
    m = _hf("ViTForImageClassification", "ViTConfig", hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=96, image_size=16, patch_size=8, num_channels=3, num_labels=5)
    g = torch.Generator().manual_seed(0)
    return m, {"pixel_values": torch.randn(2, 3, 16, 16, generator=g)}


def mixtral():
    m = _hf("MixtralForCausalLM", "MixtralConfig", vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
            num_experts_per_tok=2, max_position_embeddings=64)
    return m, {"input_ids": _ids()}


def _layers(fmt, n, readers, writer):
    return {fmt.format(i=i): ([f"{fmt.format(i=i)}.{r}" for r in readers], f"{fmt.format(i=i)}.{writer}")
            for i in range(n)}


ZOO = {
    "nanogpt": ZooModel(
        "nanogpt", nanogpt, 48,
        {**_layers("h.{i}.attn", 2, ["c_attn"], "c_proj"), **_layers("h.{i}.mlp", 2, ["c_fc"], "c_proj")},
        never=["lm_head"]),
    "llama": ZooModel(
        "llama", llama, 64,
        {**_layers("model.layers.{i}.self_attn", 2, ["q_proj", "k_proj", "v_proj"], "o_proj"),
         **_layers("model.layers.{i}.mlp", 2, ["gate_proj", "up_proj"], "down_proj")},
        never=["lm_head"], generates=True),
    "qwen2": ZooModel(
        "qwen2", qwen2, 64,
        {**_layers("model.layers.{i}.self_attn", 2, ["q_proj", "k_proj", "v_proj"], "o_proj"),
         **_layers("model.layers.{i}.mlp", 2, ["gate_proj", "up_proj"], "down_proj")},
        never=["lm_head"], generates=True),
    "gpt2": ZooModel(
        "gpt2", gpt2, 48,
        {**_layers("transformer.h.{i}.attn", 2, ["c_attn"], "c_proj"),
         **_layers("transformer.h.{i}.mlp", 2, ["c_fc"], "c_proj")},
        never=["lm_head"], generates=True),
    "bert": ZooModel(
        "bert", bert, 48,
        {**{f"encoder.layer.{i}.attention": (
            [f"encoder.layer.{i}.attention.self.{r}" for r in ("query", "key", "value")],
            f"encoder.layer.{i}.attention.output.dense") for i in range(2)},
         **{f"encoder.layer.{i}": ([f"encoder.layer.{i}.intermediate.dense"], f"encoder.layer.{i}.output.dense")
            for i in range(2)}},
        never=["pooler.dense"]),
    "t5": ZooModel(
        "t5", t5, 32,
        {**_layers("encoder.block.0.layer.0.SelfAttention", 1, ["q", "k", "v"], "o"),
         **_layers("encoder.block.0.layer.1.DenseReluDense", 1, ["wi"], "wo"),
         **_layers("decoder.block.0.layer.0.SelfAttention", 1, ["q", "k", "v"], "o"),
         **_layers("decoder.block.0.layer.1.EncDecAttention", 1, ["q"], "o"),
         **_layers("decoder.block.0.layer.2.DenseReluDense", 1, ["wi"], "wo")},
        never=["lm_head", "decoder.block.0.layer.1.EncDecAttention.k", "decoder.block.0.layer.1.EncDecAttention.v"]),
    "vit": ZooModel(
        "vit", vit, 48,
        {**_layers("vit.layers.{i}.attention", 2, ["q_proj", "k_proj", "v_proj"], "o_proj"),
         **_layers("vit.layers.{i}.mlp", 2, ["fc1"], "fc2")},
        never=["classifier"]),
    "mixtral": ZooModel(
        "mixtral", mixtral, 64,
        _layers("model.layers.{i}.self_attn", 2, ["q_proj", "k_proj", "v_proj"], "o_proj"),
        never=["lm_head", "model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]),
}
