"""transformers-native loading (mohdify/hf_quantizer.py): a mohdified model saved with
`save_pretrained` comes back mohdified from transformers' own `from_pretrained`, through the
quantizer mohdify registers as quant_method "mohd", with the saved plan applied as is."""

from __future__ import annotations

import json

import pytest
import torch
from reference import randomize_branches
from zoo import ZOO

import mohdify
from mohdify.codegen.cpu.layout import is_column_major
from mohdify.modules import MoHDReader

transformers = pytest.importorskip("transformers")
from transformers import AutoModel, AutoModelForCausalLM  # noqa: E402

CFG = mohdify.MoHDConfig(num_groups=8, num_shared=2, top_k=2, fusion="mix", scaling="norm")


def _saved(name, tmp_path, config=CFG):
    model, inputs = ZOO[name].build()
    mohdify.mohdify(model, config, example_inputs=inputs)
    randomize_branches(model, seed=1, permute_groups=True)   # trained-looking routers, fusion, shared groups
    model.eval()
    model.save_pretrained(tmp_path)
    return model, inputs["input_ids"]


def _no_capture(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("loading captured the model again")
    monkeypatch.setattr("mohdify.passes.make_plan.capture", refuse)


@pytest.mark.parametrize("name", ["llama", "gpt2"])   # nn.Linear and GPT-2's Conv1D
def test_auto_from_pretrained_gives_the_mohdified_model(name, tmp_path, monkeypatch):
    model, ids = _saved(name, tmp_path)
    entry = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert entry["quant_method"] == "mohd" and entry["config"] == CFG.to_dict()
    assert [b["writer"] for b in entry["plan"]["branches"]] == model.mohd_plan.writers
    _no_capture(monkeypatch)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    assert loaded.mohd_plan.branches == model.mohd_plan.branches
    assert [b.name for b in mohdify.branches(loaded)] == [b.name for b in mohdify.branches(model)]
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    for m in loaded.modules():   # the layers hold the loaded Parameters, CPU readers laid out as by mohdify()
        if isinstance(m, MoHDReader):
            assert m.original.weight is m.weight
            assert is_column_major(m.weight) == (name == "llama")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    assert torch.equal(loaded.generate(ids, **kw), model.generate(ids, **kw))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_reloaded_model_saves_the_same_and_loads_again(name, tmp_path):
    model, ids = _saved(name, tmp_path / "a")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")
    first, second = (json.loads((tmp_path / d / "config.json").read_text())["quantization_config"] for d in "ab")
    assert first == second
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("name,base", [("llama", "model"), ("gpt2", "transformer")])
def test_auto_model_loads_the_base_model_mohdified(name, base, tmp_path):
    model, ids = _saved(name, tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert len(mohdify.branches(loaded)) == len(mohdify.branches(model))
    assert loaded.mohd_plan.writers == [w[len(base) + 1:] for w in model.mohd_plan.writers]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).last_hidden_state,
                           getattr(model, base)(input_ids=ids).last_hidden_state)


def test_loaded_model_dequantizes_to_the_dense_model_and_casts(tmp_path):
    model, ids = _saved("llama", tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    loaded.half().float()                                    # a MoHD model is not "quantized": casts work
    assert loaded.lm_head.weight.dtype == torch.float32
    dense = loaded.dequantize()
    assert not mohdify.passes.is_mohdified(dense) and "quantization_config" not in dense.config.to_dict()
    reference = mohdify.demohdify(model).half().float()
    with torch.no_grad():
        assert torch.equal(dense(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_mohdify_from_pretrained_is_the_same_load_and_refuses_dense(tmp_path):
    model, ids = _saved("llama", tmp_path / "mohd")
    loaded = mohdify.from_pretrained(AutoModelForCausalLM, str(tmp_path / "mohd"))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    dense, _ = ZOO["llama"].build()
    dense.save_pretrained(tmp_path / "dense")
    with pytest.raises(mohdify.InputError, match="holds no mohdified model"):
        mohdify.from_pretrained(AutoModelForCausalLM, str(tmp_path / "dense"))


def test_folder_saved_by_mohdify_0_1_loads(tmp_path):
    model, ids = _saved("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    entry = config.pop("quantization_config")
    config["mohd"] = {"format": 1, "config": entry["config"], "plan": entry["plan"]}   # the 0.1 layout
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = mohdify.from_pretrained(AutoModelForCausalLM, str(tmp_path))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_checkpoint_without_its_mohd_entries_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    _saved("llama", tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.endswith("mohd.router")}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(mohdify.InputError, match=r"lack the MoHD entries \['model.layers.0.mlp.mohd.router'"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_model_with_another_quantization_config_is_refused_untouched():
    model, inputs = ZOO["llama"].build()
    model.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(mohdify.InputError, match="quant_method 'bitsandbytes'"):
        mohdify.mohdify(model, CFG, example_inputs=inputs)
    assert not mohdify.passes.is_mohdified(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
