"""The pass finds exactly the expected readers and writers in every zoo model."""

import pytest
import torch
from zoo import ZOO

import mohdify

CONFIG = mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1)


@pytest.mark.parametrize("name", list(ZOO))
def test_explain_finds_exact_branches(name):
    z = ZOO[name]
    model, inputs = z.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = mohdify.explain(model, inputs, CONFIG)
    assert plan.hidden_size == z.hidden_size
    got = {b.name: (b.readers, b.writer) for b in plan.branches}
    assert got == z.branches, f"{name}: found {got}"
    skipped = dict(plan.skipped)
    for layer in z.never:
        assert layer not in plan.readers and layer not in plan.writers, f"{name}: {layer} must stay dense"
    rewritten = set(plan.readers) | set(plan.writers)
    assert not rewritten & set(skipped), f"{name}: layers both rewritten and skipped"
    # explain changes nothing
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    table = str(plan)
    for b in plan.branches:
        assert b.name in table


@pytest.mark.parametrize("name", list(ZOO))
def test_mohdify_swaps_exactly_the_planned_layers(name):
    z = ZOO[name]
    model, inputs = z.build()
    cls = type(model)
    mohdify.mohdify(model, CONFIG, example_inputs=inputs)
    assert type(model) is cls
    from mohdify.modules import MoHDReader, MoHDWriter
    readers = sorted(n for n, m in model.named_modules() if isinstance(m, MoHDReader))
    writers = sorted(n for n, m in model.named_modules() if isinstance(m, MoHDWriter))
    assert readers == sorted(r for rs, _ in z.branches.values() for r in rs)
    assert writers == sorted(w for _, w in z.branches.values())
    assert len(mohdify.branches(model)) == len(z.branches)


def test_mixtral_moe_block_is_skipped_with_reason():
    model, inputs = ZOO["mixtral"].build()
    plan = mohdify.explain(model, inputs, CONFIG)
    skipped = dict(plan.skipped)
    for i in range(2):
        reason = skipped[f"model.layers.{i}.mlp"]
        assert "MixtralSparseMoeBlock" in reason and "left dense" in reason


def test_t5_cross_attention_kv_read_the_encoder_stream():
    model, inputs = ZOO["t5"].build()
    skipped = dict(mohdify.explain(model, inputs, CONFIG).skipped)
    for kv in ("k", "v"):
        assert skipped[f"decoder.block.0.layer.1.EncDecAttention.{kv}"] == (
            "reads a stream other than its branch's input (e.g. cross-attention k/v reading the encoder output); "
            "left dense")
