"""mohdify.rebasis: an exact permutation of the residual stream (same outputs), its refusals, the energy order."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mohdify
from mohdify import rebasis

transformers = pytest.importorskip("transformers")
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

IDS = {"input_ids": torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))}


def tiny_llama(tied=False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)                 # norms that are not all ones, so their permutation matters
    return model


def perm32() -> torch.Tensor:
    return torch.randperm(32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tied", [False, True])
def test_permuted_llama_computes_the_same(tied):
    model = tiny_llama(tied)
    ref = copy.deepcopy(model)
    perm = perm32()
    assert rebasis.permute_stream(model, perm, IDS) is model and torch.equal(model.mohd_stream_perm, perm)
    torch.testing.assert_close(model.model.embed_tokens.weight, ref.model.embed_tokens.weight[:, perm])
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight,
                               ref.model.layers[0].self_attn.q_proj.weight[:, perm])
    torch.testing.assert_close(model.model.layers[1].mlp.down_proj.weight,
                               ref.model.layers[1].mlp.down_proj.weight[perm])
    torch.testing.assert_close(model.model.norm.weight, ref.model.norm.weight[perm])
    torch.testing.assert_close(model.lm_head.weight, ref.lm_head.weight[:, perm])
    with torch.no_grad():
        a, b = ref(**IDS, output_hidden_states=True), model(**IDS, output_hidden_states=True)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    for x, y in zip(a.hidden_states, b.hidden_states):               # stream outputs: back in the old basis
        torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    # mohdified at delta 1 it still computes the dense model; at delta < 1 groups are runs of perm
    mohdify.mohdify(model, mohdify.MoHDConfig.dense(num_groups=4, num_shared=1, router="magnitude"),
                    example_inputs=IDS)
    with torch.no_grad():
        torch.testing.assert_close(model(**IDS).logits, a.logits, atol=1e-5, rtol=1e-5)


def test_permuted_bert_keeps_its_outputs():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=16)
    model = BertModel(cfg).eval()
    ref = copy.deepcopy(model)
    batch = {**IDS, "attention_mask": torch.ones(2, 7, dtype=torch.long)}
    rebasis.permute_stream(model, perm32(), batch)
    with torch.no_grad():
        a, b = ref(**batch), model(**batch)
    torch.testing.assert_close(b.last_hidden_state, a.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.pooler_output, a.pooler_output, atol=1e-5, rtol=1e-5)
    # the stream inside is permuted
    emb = ref.embeddings.word_embeddings.weight
    torch.testing.assert_close(model.embeddings.word_embeddings.weight, emb[:, perm32()])
    torch.testing.assert_close(model.pooler.dense.weight, ref.pooler.dense.weight[:, perm32()])     # reads the stream
    torch.testing.assert_close(model.pooler.dense.bias, ref.pooler.dense.bias)                      # writes no stream


class ChunkLayerNorm(nn.Module):
    """A norm over two halves of the stream separately: not permutation-equivariant."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 1.5, d))

    def forward(self, x):
        h = x.unflatten(-1, (2, -1))
        return (h - h.mean(-1, keepdim=True)).flatten(-2) * self.weight


class StreamBias(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.shift = nn.Parameter(torch.ones(d))

    def forward(self, x):
        return x + self.shift


@pytest.mark.parametrize("replace, match", [(ChunkLayerNorm, "other outputs"), (StreamBias, "no known role")])
def test_refusals_leave_the_model_as_it_was(replace, match):
    model = tiny_llama()
    model.model.norm = replace(32)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(mohdify.UnsupportedModelError, match=match):
        rebasis.permute_stream(model, perm32(), IDS)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and not hasattr(model, "mohd_stream_perm")
    assert not model._forward_hooks


def test_bad_permutation_and_mohdified_model_are_refused():
    model = tiny_llama()
    with pytest.raises(mohdify.InputError, match="permutation of range"):
        rebasis.permute_stream(model, torch.zeros(32, dtype=torch.long), IDS)
    mohdify.mohdify(model, mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1, router="magnitude"),
                    example_inputs=IDS)
    with pytest.raises(mohdify.UnsupportedModelError, match="already mohdified"):
        rebasis.permute_stream(model, perm32(), IDS)


def test_energy_order_puts_the_high_energy_dims_first():
    model = tiny_llama()
    with torch.no_grad():
        for layer in model.model.layers:                               # every branch input: dim 5 x 10, dim 9 x 5
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.fill_(1.0)
                norm.weight[5], norm.weight[9] = 10.0, 5.0
    order = rebasis.energy_order(model, [IDS], IDS)
    assert sorted(order.tolist()) == list(range(32)) and order[:2].tolist() == [5, 9]
