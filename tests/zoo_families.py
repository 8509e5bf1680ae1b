"""More tiny Transformers (random weights, configs only) and capture-fallback models.

Expected readers / writers come from reading each transformers 5.x modeling file (see
tests/passes/test_zoo_families.py for the reasons per architecture), not from running the pass.
"""

from __future__ import annotations

import torch
from torch import nn
from zoo import VOCAB, Block, ZooModel, _hf, _ids, _layers

D = 64
_C = dict(vocab_size=VOCAB, hidden_size=D, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
          max_position_embeddings=64)


def _lm(cls, cfg, **kw):
    return lambda: (_hf(cls, cfg, **kw), {"input_ids": _ids()})


_ATTN = (["q_proj", "k_proj", "v_proj"], "o_proj")
_GLU = (["gate_proj", "up_proj"], "down_proj")


def _llama_like(root="model.layers.{i}"):
    return {**_layers(root + ".self_attn", 2, *_ATTN), **_layers(root + ".mlp", 2, *_GLU)}


def _bart():
    m = _hf("BartForConditionalGeneration", "BartConfig", vocab_size=VOCAB, d_model=D, encoder_layers=1,
            decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=96,
            decoder_ffn_dim=96, max_position_embeddings=64)
    return m, {"input_ids": _ids(), "decoder_input_ids": _ids(seq=5, seed=1)}


def _qkv(root, attn, qkv, out, mlp, up, down):
    return {**_layers(f"{root}.{attn}", 2, [qkv] if isinstance(qkv, str) else qkv, out),
            **_layers(f"{root}.{mlp}", 2, [up], down)}


_bart_attn = ["q_proj", "k_proj", "v_proj"]
EXTRA = {
    # parallel attention + MLP: attn reads input_layernorm(h), mlp reads post_attention_layernorm(h),
    # both summed into one residual add (use_parallel_residual=True)
    "gpt_neox": ZooModel("gpt_neox", _lm("GPTNeoXForCausalLM", "GPTNeoXConfig", **_C, use_parallel_residual=True), D,
                         _qkv("gpt_neox.layers.{i}", "attention", "query_key_value", "dense", "mlp",
                              "dense_h_to_4h", "dense_4h_to_h"), never=["lm_head"]),
    # parallel: attn and mlp both read ln_1(h); attn_output + mlp_output + residual
    "gptj": ZooModel("gptj", _lm("GPTJForCausalLM", "GPTJConfig", vocab_size=VOCAB, n_embd=D, n_layer=2, n_head=4,
                                 n_positions=64, rotary_dim=8, n_inner=96), D,
                     _qkv("transformer.h.{i}", "attn", _bart_attn, "out_proj", "mlp", "fc_in", "fc_out"),
                     never=["lm_head"]),
    # parallel like GPT-J, one input_layernorm; attention writer is `dense`
    "phi": ZooModel("phi", _lm("PhiForCausalLM", "PhiConfig", **_C), D,
                    _qkv("model.layers.{i}", "self_attn", _bart_attn, "dense", "mlp", "fc1", "fc2"),
                    never=["lm_head"]),
    # parallel_attn: mlp and attention read the same input_layernorm; FalconLinear computes x @ W.T
    "falcon": ZooModel("falcon", _lm("FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=D,
                                     num_hidden_layers=2, num_attention_heads=4, parallel_attn=True,
                                     new_decoder_architecture=False), D,
                       _qkv("transformer.h.{i}", "self_attention", "query_key_value", "dense", "mlp",
                            "dense_h_to_4h", "dense_4h_to_h"), never=["lm_head"]),
    # sandwich norms: post_attention_layernorm / post_feedforward_layernorm (RMSNorm) on the branch output
    "gemma2": ZooModel("gemma2", _lm("Gemma2ForCausalLM", "Gemma2Config", **_C, num_key_value_heads=2, head_dim=16),
                       D, _llama_like(), never=["lm_head"]),
    "gemma3": ZooModel("gemma3", _lm("Gemma3ForCausalLM", "Gemma3TextConfig", **_C, num_key_value_heads=2,
                                     head_dim=16), D, _llama_like(), never=["lm_head"]),
    "mistral": ZooModel("mistral", _lm("MistralForCausalLM", "MistralConfig", **_C, num_key_value_heads=2), D,
                        _llama_like(), never=["lm_head"]),
    # fc1 / fc2 sit directly in the decoder layer, so that branch is named after the layer
    "opt": ZooModel("opt", _lm("OPTForCausalLM", "OPTConfig", vocab_size=VOCAB, hidden_size=D, ffn_dim=96,
                               num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                               word_embed_proj_dim=D), D,
                    {**_layers("model.decoder.layers.{i}.self_attn", 2, _bart_attn, "out_proj"),
                     **_layers("model.decoder.layers.{i}", 2, ["fc1"], "fc2")}, never=["lm_head"]),
    "bloom": ZooModel("bloom", _lm("BloomForCausalLM", "BloomConfig", vocab_size=VOCAB, hidden_size=D, n_layer=2,
                                   n_head=4), D,
                      _qkv("transformer.h.{i}", "self_attention", "query_key_value", "dense", "mlp",
                           "dense_h_to_4h", "dense_4h_to_h"), never=["lm_head"]),
    # post-norm: readers read h itself (the output of the previous add + LayerNorm)
    "distilbert": ZooModel("distilbert", lambda: (_hf("DistilBertModel", "DistilBertConfig", vocab_size=VOCAB, dim=D,
                                                      hidden_dim=96, n_layers=2, n_heads=4,
                                                      max_position_embeddings=64), {"input_ids": _ids()}), D,
                           _qkv("transformer.layer.{i}", "attention", ["q_lin", "k_lin", "v_lin"], "out_lin",
                                "ffn", "lin1", "lin2")),
    "roberta": ZooModel("roberta", lambda: (_hf("RobertaModel", "RobertaConfig", vocab_size=VOCAB, hidden_size=D,
                                                intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                                max_position_embeddings=64, pad_token_id=1),
                                            {"input_ids": _ids() + 2}), D,
                        {**{f"encoder.layer.{i}.attention": (
                            [f"encoder.layer.{i}.attention.self.{r}" for r in ("query", "key", "value")],
                            f"encoder.layer.{i}.attention.output.dense") for i in range(2)},
                         **{f"encoder.layer.{i}": ([f"encoder.layer.{i}.intermediate.dense"],
                                                   f"encoder.layer.{i}.output.dense") for i in range(2)}},
                        never=["pooler.dense"]),
    # encoder-decoder: cross-attention q reads the decoder stream, k/v read the encoder output
    "bart": ZooModel("bart", _bart, D,
                     {**_layers("model.encoder.layers.{i}.self_attn", 1, _bart_attn, "out_proj"),
                      **_layers("model.encoder.layers.{i}", 1, ["fc1"], "fc2"),
                      **_layers("model.decoder.layers.{i}.self_attn", 1, _bart_attn, "out_proj"),
                      **_layers("model.decoder.layers.{i}.encoder_attn", 1, ["q_proj"], "out_proj"),
                      **_layers("model.decoder.layers.{i}", 1, ["fc1"], "fc2")},
                     never=["lm_head", "model.decoder.layers.0.encoder_attn.k_proj",
                            "model.decoder.layers.0.encoder_attn.v_proj"]),
    # MoE with a shared expert: the shared expert is a dense MLP branch (its output, scaled per token
    # by sigmoid(shared_expert_gate(x)), is summed with the experts' output); experts/router stay dense
    "qwen2_moe": ZooModel("qwen2_moe", _lm("Qwen2MoeForCausalLM", "Qwen2MoeConfig", **_C, num_key_value_heads=2,
                                           num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                           shared_expert_intermediate_size=48), D,
                          {**_layers("model.layers.{i}.self_attn", 2, *_ATTN),
                           **_layers("model.layers.{i}.mlp.shared_expert", 2, *_GLU)},
                          never=["lm_head", "model.layers.0.mlp.shared_expert_gate",
                                 "model.layers.1.mlp.shared_expert_gate"]),
    "qwen3_moe": ZooModel("qwen3_moe", _lm("Qwen3MoeForCausalLM", "Qwen3MoeConfig", **_C, num_key_value_heads=2,
                                           head_dim=16, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=32), D,
                          _layers("model.layers.{i}.self_attn", 2, *_ATTN), never=["lm_head"]),
    # no pre-norm: readers read h; RMSNorm on each branch output before the add
    "olmo2": ZooModel("olmo2", _lm("Olmo2ForCausalLM", "Olmo2Config", **_C, num_key_value_heads=2), D,
                      _llama_like(), never=["lm_head"]),
    "starcoder2": ZooModel("starcoder2", _lm("Starcoder2ForCausalLM", "Starcoder2Config", **_C,
                                             num_key_value_heads=2), D,
                           {**_layers("model.layers.{i}.self_attn", 2, *_ATTN),
                            **_layers("model.layers.{i}.mlp", 2, ["c_fc"], "c_proj")}, never=["lm_head"]),
    # --- more architectures, readers/writers from the transformers 5.x modeling code
    # parallel: attn and mlp both read input_layernorm(h); residual + attn + mlp in one sum
    "cohere": ZooModel("cohere", _lm("CohereForCausalLM", "CohereConfig", **_C, num_key_value_heads=2), D,
                       _llama_like(), never=["lm_head"]),
    "mpt": ZooModel("mpt", _lm("MptForCausalLM", "MptConfig", vocab_size=VOCAB, d_model=D, n_heads=4, n_layers=2,
                               expansion_ratio=2, max_seq_len=64), D,
                    _qkv("transformer.blocks.{i}", "attn", "Wqkv", "out_proj", "ffn", "up_proj", "down_proj"),
                    never=["lm_head"]),
    # fused qkv_proj and gate_up_proj are one reader each
    "phi3": ZooModel("phi3", _lm("Phi3ForCausalLM", "Phi3Config", **_C, num_key_value_heads=2, pad_token_id=0), D,
                     _qkv("model.layers.{i}", "self_attn", "qkv_proj", "o_proj", "mlp", "gate_up_proj", "down_proj"),
                     never=["lm_head"]),
    "gemma": ZooModel("gemma", _lm("GemmaForCausalLM", "GemmaConfig", **_C, num_key_value_heads=2, head_dim=16), D,
                      _llama_like(), never=["lm_head"]),
    # MLA: q_a_proj and kv_a_proj_with_mqa read the branch input; q_b_proj / kv_b_proj read the
    # low-rank latents (inner). Layer 0 is dense (first_k_dense_replace=1); layer 1 is MoE: its
    # shared experts are a branch, the routed experts (stacked weights) and the router stay dense.
    "deepseek_v3": ZooModel("deepseek_v3", _lm("DeepseekV3ForCausalLM", "DeepseekV3Config", **_C,
                                               num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16,
                                               qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                               n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                               moe_intermediate_size=32, first_k_dense_replace=1, n_group=1,
                                               topk_group=1), D,
                            {**_layers("model.layers.{i}.self_attn", 2, ["q_a_proj", "kv_a_proj_with_mqa"], "o_proj"),
                             **_layers("model.layers.{i}.mlp", 1, *_GLU),
                             "model.layers.1.mlp.shared_experts": (
                                 [f"model.layers.1.mlp.shared_experts.{r}" for r in _GLU[0]],
                                 "model.layers.1.mlp.shared_experts.down_proj")},
                            never=["lm_head", "model.layers.0.self_attn.q_b_proj", "model.layers.0.self_attn.kv_b_proj",
                                   "model.layers.1.mlp.gate"]),
    "t5_encoder": ZooModel("t5_encoder", lambda: (_hf("T5EncoderModel", "T5Config", vocab_size=VOCAB, d_model=32,
                                                      d_kv=8, d_ff=64, num_layers=2, num_heads=4),
                                                  {"input_ids": _ids()}), 32,
                           {**_layers("encoder.block.{i}.layer.0.SelfAttention", 2, ["q", "k", "v"], "o"),
                            **_layers("encoder.block.{i}.layer.1.DenseReluDense", 2, ["wi"], "wo")}),
    # pre-norm encoder; fc1 / fc2 sit in the layer itself; projector and classifier are the head
    "whisper_encoder": ZooModel("whisper_encoder", lambda: (
        _hf("WhisperForAudioClassification", "WhisperConfig", vocab_size=VOCAB, d_model=D, encoder_layers=2,
            encoder_attention_heads=4, encoder_ffn_dim=96, num_mel_bins=16, max_source_positions=8,
            decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=96, num_labels=3),
        {"input_features": torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))}), D,
        {**_layers("encoder.layers.{i}.self_attn", 2, _bart_attn, "out_proj"),
         **_layers("encoder.layers.{i}", 2, ["fc1"], "fc2")}, never=["projector", "classifier"]),
    "clip_text": ZooModel("clip_text", lambda: (_hf("CLIPTextModel", "CLIPTextConfig", vocab_size=VOCAB, hidden_size=D,
                                                    intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                                    max_position_embeddings=64), {"input_ids": _ids()}), D,
                          _qkv("encoder.layers.{i}", "self_attn", _bart_attn, "out_proj", "mlp", "fc1", "fc2")),
    # residual kept in fp32 (residual.to(torch.float32) on the stream); x_proj reads the conv output
    # (inner); dt_proj's weight is used as `dt_proj.weight @ time_step` in the mixer, not via its forward
    "mamba": ZooModel("mamba", _lm("MambaForCausalLM", "MambaConfig", vocab_size=VOCAB, hidden_size=D, state_size=8,
                                   num_hidden_layers=2, intermediate_size=128, time_step_rank=8, conv_kernel=4,
                                   residual_in_fp32=True), D,
                      _layers("backbone.layers.{i}.mixer", 2, ["in_proj"], "out_proj"),
                      never=["lm_head", "backbone.layers.0.mixer.x_proj", "backbone.layers.0.mixer.dt_proj",
                             "backbone.layers.1.mixer.dt_proj"]),
}


# ---------------------------------------------------------------- capture fallbacks
class _Net(nn.Module):
    def __init__(self, d=32, layers=2):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.h = nn.ModuleList(Block(d, 4) for _ in range(layers))
        self.head = nn.Linear(d, VOCAB)

    def body(self, idx):
        x = self.emb(idx)
        for block in self.h:
            x = block(x)
            if x.abs().amax() > 1e6:   # data-dependent Python control flow: export fails, dynamo breaks
                x = x / 2
        return self.head(x)


class DataDependentNet(_Net):
    """torch.export (non-strict) fails; dynamo works with a graph break after each block."""

    def forward(self, idx):
        return self.body(idx)


class EagerOnlyNet(_Net):
    """export fails, dynamo compiles nothing (disabled); each block of `h` exports on its own."""

    @torch._dynamo.disable
    def forward(self, idx):
        return self.body(idx)


class Uncapturable(nn.Module):
    """Every front-end fails: data-dependent control flow, dynamo disabled, no repeated blocks."""

    def __init__(self, d=32):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, d)
        self.block = Block(d, 4)
        self.head = nn.Linear(d, VOCAB)

    @torch._dynamo.disable
    def forward(self, idx):
        x = self.block(self.emb(idx))
        if x.abs().amax() > 1e6:
            x = x / 2
        return self.head(x)


class LayerNormOut(nn.Module):
    """Two branches: a plain MLP, and one whose output passes a LayerNorm before the residual add
    (res-post-norm, Swin v2 style), which does not keep zeros."""

    def __init__(self, d=32):
        super().__init__()
        self.up1, self.down1 = nn.Linear(d, 64), nn.Linear(64, d)
        self.up2, self.down2, self.norm = nn.Linear(d, 64), nn.Linear(64, d), nn.LayerNorm(d)
        self.out = nn.Linear(d, 8)

    def forward(self, x):
        x = x + self.down1(torch.relu(self.up1(x)))
        x = x + self.norm(self.down2(torch.relu(self.up2(x))))
        return self.out(x)


NETS_BRANCHES = {**_layers("h.{i}.attn", 2, ["c_attn"], "c_proj"), **_layers("h.{i}.mlp", 2, ["c_fc"], "c_proj")}
