"""Public API: the plan's counts, filter_fn, graph(), and the state a rewrite leaves."""

import pytest
import torch
from zoo import ZOO

import mohdify
from mohdify.modules import MoHDBranch, MoHDReader, MoHDWriter
from mohdify.routing import SLOTS, balance_loss

CFG = mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1)   # density 0.5


def test_plan_counts_are_exact_for_nanogpt():
    model, inputs = ZOO["nanogpt"].build()    # D = 48, 2 layers, MLP width 192, fused qkv
    plan = mohdify.explain(model, inputs, CFG)
    attn = plan.branch("h.0.attn")
    mlp = plan.branch("h.0.mlp")
    assert attn.reader_shapes == {"h.0.attn.c_attn": (48, 144)} and attn.writer_shape == (48, 48)
    assert mlp.reader_shapes == {"h.0.mlp.c_fc": (48, 192)} and mlp.writer_shape == (192, 48)
    # attention: 48*144 + 48*48 = 9216 weights; router 3 x 48 = 144; density 0.5
    assert attn.counts(CFG, 48) == {"params": 9216 + 144, "active_params": 4608 + 144,
                                    "flops": 2 * 9216, "active_flops": 2 * 4608 + 2 * 3 * 48}
    # MLP: 48*192 + 192*48 = 18432 weights
    assert mlp.counts(CFG, 48)["active_params"] == 9216 + 144
    assert plan.totals()["params"] == 2 * (9216 + 144 + 18432 + 144)
    text = str(plan)
    assert "hidden size D=48" in text and "4 branches" in text and "density=0.500" in text
    assert "lm_head: reads the residual stream but feeds no residual branch" in text


def test_filter_fn_limits_the_rewrite():
    model, inputs = ZOO["llama"].build()
    seen = []

    def only_mlp(module, name):
        seen.append((type(module).__name__, name))
        return ".mlp." in name

    mohdify.mohdify(model, CFG, example_inputs=inputs, filter_fn=only_mlp)
    assert [b.name for b in mohdify.branches(model)] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert type(model.model.layers[0].mlp.gate_proj) is MoHDReader
    assert type(model.model.layers[0].mlp.down_proj) is MoHDWriter
    assert ("Linear", "model.layers.0.self_attn.o_proj") in seen
    skipped = dict(model.mohd_plan.skipped)
    assert "excluded by filter_fn" in skipped["model.layers.0.self_attn.o_proj"]


def test_state_dict_keys_keep_layer_names_and_add_branch_state():
    model, inputs = ZOO["llama"].build()
    before = set(model.state_dict())
    mohdify.mohdify(model, mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1, fusion="mix"),
                    example_inputs=inputs)
    added = set(model.state_dict()) - before
    assert before <= set(model.state_dict())
    assert added == {f"model.layers.{i}.{b}.mohd.{p}" for i in range(2) for b in ("self_attn", "mlp")
                     for p in ("router", "fusion", "shared_idx", "routed_idx")}
    branch = model.model.layers[0].mlp.mohd
    assert isinstance(branch, MoHDBranch) and branch.router.shape == (3, 64) and not branch.router.any()
    assert torch.equal(branch.fusion, torch.eye(4))
    assert model.model.layers[0].mlp.up_proj.weight is model.model.layers[0].mlp.up_proj.original.weight


def test_graph_shows_named_mohd_ops_and_runs():
    model, inputs = ZOO["gpt2"].build()
    mohdify.mohdify(model, CFG, example_inputs=inputs)
    gm = mohdify.graph(model, inputs)
    names = [n.name for n in gm.graph.nodes if n.name.startswith("mohd_")]
    for i in range(2):
        assert f"mohd_read__transformer_h_{i}_attn_c_attn" in names
        assert f"mohd_write__transformer_h_{i}_attn_c_proj" in names
        assert f"mohd_route__transformer_h_{i}_mlp" in names
        assert f"mohd_route__transformer_h_{i}_attn" in names
        assert f"mohd_write__transformer_h_{i}_mlp_c_proj" in names
    assert len(names) == 4 * 3
    assert gm.code.count("torch.ops.mohdify.read.default(") == 4
    out = gm(**inputs)
    ref = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    assert torch.equal(logits, ref.logits)
    summary = gm.summary()
    assert summary.splitlines()[0] == "MoHD graph: 4 routings, 4 reads, 4 writes"
    assert ("transformer.h.1.mlp:\n  route\n  read  transformer.h.1.mlp.c_fc\n"
            "  write transformer.h.1.mlp.c_proj") in summary


def test_graph_requires_a_mohdified_model():
    model, inputs = ZOO["nanogpt"].build()
    with pytest.raises(mohdify.UnsupportedModelError, match="is not mohdified"):
        mohdify.graph(model, inputs)


def test_aux_loss_value_matches_the_spec_formula():
    model, inputs = ZOO["nanogpt"].build()
    cfg = mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1, aux_loss_coef=0.5)
    mohdify.mohdify(model, cfg, example_inputs=inputs)
    g = torch.Generator().manual_seed(3)
    for b in mohdify.branches(model):
        b.router.data = torch.randn(b.router.shape, generator=g)
    model.train()   # balance losses are kept in training mode
    model(*inputs)
    expected = 0.0
    for b in mohdify.branches(model):
        assert b.balance_log.count == 1 and b.balance_log.total.requires_grad
        expected = expected + 0.5 * b.balance_log.total
    assert torch.equal(mohdify.aux_loss(model), expected)
    assert all(b.balance_log.total is None for b in mohdify.branches(model))   # taken
    # with all tokens on one group, f = (1, 0, 0) and the loss is N_r * P_0 per branch
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.7, 0.2, 0.1]])
    topk = torch.tensor([[0], [0]])
    assert torch.allclose(balance_loss(probs, topk), torch.tensor(3 * 0.6))


def test_magnitude_router_has_no_parameters_and_zero_aux_loss():
    model, inputs = ZOO["nanogpt"].build()
    n_before = sum(p.numel() for p in model.parameters())
    mohdify.mohdify(model, mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1, router="magnitude"),
                    example_inputs=inputs)
    assert sum(p.numel() for p in model.parameters()) == n_before
    model(*inputs)
    assert mohdify.aux_loss(model).item() == 0.0


def test_calibrate_makes_the_high_energy_groups_shared():
    model, inputs = ZOO["nanogpt"].build()   # D = 48: 4 groups of 12
    mohdify.mohdify(model, mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1), example_inputs=inputs)
    # Make group 2 of the first attention input dominant: the LayerNorm bias puts energy there.
    with torch.no_grad():
        model.h[0].ln_1.bias[24:36] = 50.0
    chosen = mohdify.calibrate(model, [inputs, (inputs[0][:1],)])
    assert chosen["h.0.attn"] == [2]
    branch = model.h[0].attn.mohd
    assert branch.shared_idx.tolist() == [2] and branch.routed_idx.tolist() == [0, 1, 3]
    out = model(*inputs)
    assert torch.isfinite(out).all()
    assert set(model.state_dict()["h.0.attn.mohd.shared_idx"].tolist()) == {2}
    assert set(chosen) == {"h.0.attn", "h.0.mlp", "h.1.attn", "h.1.mlp"}


def test_hf_save_pretrained_round_trip(tmp_path):
    from safetensors.torch import load_file
    model, inputs = ZOO["llama"].build()
    cfg = mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=2, fusion="mix")
    mohdify.mohdify(model, cfg, example_inputs=inputs)
    g = torch.Generator().manual_seed(1)
    for b in mohdify.branches(model):
        b.router.data = torch.randn(b.router.shape, generator=g)
        b.fusion.data = torch.eye(4) + 0.1 * torch.randn(4, 4, generator=g)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert "model.layers.1.mlp.mohd.router" in saved and "model.layers.0.self_attn.mohd.fusion" in saved
    fresh, _ = ZOO["llama"].build()
    torch.nn.init.normal_(fresh.model.layers[0].mlp.up_proj.weight)   # differ before loading
    mohdify.mohdify(fresh, cfg, example_inputs=inputs)
    missing, unexpected = fresh.load_state_dict(saved, strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}   # tied to the embeddings
    assert torch.equal(fresh(**inputs).logits, model(**inputs).logits)


def test_graph_of_llama_has_one_routing_per_branch_application():
    model, inputs = ZOO["llama"].build()
    mohdify.mohdify(model, mohdify.MoHDConfig(num_groups=8, num_shared=2, top_k=2), example_inputs=inputs)
    gm = mohdify.graph(model, inputs)
    kinds = [n.name.split("__")[0] for n in gm.graph.nodes if n.name.startswith("mohd_")]
    assert (kinds.count("mohd_route"), kinds.count("mohd_read"), kinds.count("mohd_write")) == (4, 10, 4)
    lines = gm.summary().splitlines()
    assert lines[:6] == ["MoHD graph: 4 routings, 10 reads, 4 writes", "model.layers.0.self_attn:", "  route",
                         "  read  model.layers.0.self_attn.q_proj", "  read  model.layers.0.self_attn.k_proj",
                         "  read  model.layers.0.self_attn.v_proj"]
    assert len(lines) == 1 + 4 * 2 + 10 + 4


class _SequentialMLP(torch.nn.Module):
    """A pre-norm block whose MLP is an nn.Sequential(Linear, GELU, Linear)."""

    def __init__(self, d=32):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 4 * d), torch.nn.GELU(), torch.nn.Linear(4 * d, d))

    def forward(self, h):
        return h + self.mlp(self.norm(h))


def test_a_branch_inside_nn_sequential_is_not_called_by_it():
    model = _SequentialMLP().eval()
    x = torch.randn(2, 5, 32)
    dense = model(x)
    mohdify.mohdify(model, mohdify.MoHDConfig.dense(num_groups=4, num_shared=1), example_inputs=(x,))
    assert [type(m).__name__ for m in model.mlp] == ["MoHDReader", "GELU", "MoHDWriter"]
    assert model.mohd_plan.branches[0].name == ""   # the closest module that is not a container: the root
    assert isinstance(model.mohd, MoHDBranch) and "mohd.router" in model.state_dict()
    assert torch.allclose(model(x), dense, atol=1e-6)
    gm = mohdify.graph(model, (x,))
    assert gm.summary().splitlines()[1:] == ["(branch):", "  route", "  read  mlp.0", "  write mlp.2"]
    mohdify.demohdify(model)
    assert [type(m).__name__ for m in model.mlp] == ["Linear", "GELU", "Linear"] and not hasattr(model, "mohd")


def test_a_rewrite_that_cannot_run_is_rolled_back(monkeypatch):
    model, inputs = ZOO["nanogpt"].build()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def broken(self, u):
        raise RuntimeError("injected: the writer cannot run")
    monkeypatch.setattr(MoHDWriter, "forward", broken)
    with pytest.raises(mohdify.UnsupportedModelError, match="failed on example_inputs .*injected.*restored"):
        mohdify.mohdify(model, mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1), example_inputs=inputs)
    assert not mohdify.branches(model) and "mohd_plan" not in vars(model)
    assert SLOTS.slots == {}        # no routing of the failed check run is left in this thread
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_trace_routing_records_each_application_and_leaves_nothing():
    model, inputs = ZOO["llama"].build()
    mohdify.mohdify(model, mohdify.MoHDConfig(num_groups=8, num_shared=2, top_k=2, router="magnitude"),
                    example_inputs=inputs)
    with torch.no_grad(), mohdify.trace_routing(model) as seen:
        model(**inputs)
        model(**inputs)
    assert sorted(seen) == [f"model.layers.{i}.{k}" for i in range(2) for k in ("mlp", "self_attn")]
    for routings in seen.values():
        assert len(routings) == 2 and routings[0].mask.shape == (14, 8)
        assert routings[0].mask.sum(1).tolist() == [4] * 14 and torch.equal(routings[0].mask, routings[1].mask)
    assert all(not m._forward_pre_hooks for m in model.modules())
