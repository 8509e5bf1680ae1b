"""More architectures and the capture fallbacks: exact readers/writers, dense equivalence, errors.

Readers/writers per architecture, from the transformers 5.x modeling code:
  gpt_neox (parallel residual), gptj, phi, falcon (parallel_attn): attention and MLP are two
    branches summed into one residual add; each writer reaches the add through the other branch's
    sum, which does not depend on it. Fused qkv (query_key_value) is one reader.
  gemma2/gemma3 (sandwich) and olmo2: the branch output passes an RMSNorm before the add; RMSNorm
    scales each token by one number, so it keeps zeros and the branch is a MoHD branch.
  opt, bloom, mistral, starcoder2: pre-norm; distilbert, roberta, bart: post-norm (readers read h).
  bart: cross-attention k_proj/v_proj read the encoder output: dense.
  qwen2_moe: the shared expert is a branch; routed experts (stacked weights, routed tokens), the
    router (not an nn.Linear) and shared_expert_gate (it scales the branch output) stay dense.
  qwen3_moe: no shared expert, the whole MoE block stays dense with its router.
Every model's head stays dense.
"""

import copy
import importlib

import pytest
import torch
from conftest import assert_close
from zoo_families import EXTRA, NETS_BRANCHES, DataDependentNet, EagerOnlyNet, LayerNormOut, Uncapturable, _ids

import mohdify
from mohdify.modules import MoHDReader, MoHDWriter
from mohdify.passes.graph_names import module_path
from mohdify.passes.make_plan import OUTSIDE_BLOCKS

capture_mod = importlib.import_module("mohdify.passes.capture")
DENSE = mohdify.MoHDConfig.dense(num_groups=4, num_shared=1)


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    if isinstance(out, torch.Tensor):
        return out
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", list(EXTRA))
def test_extra_exact_branches_and_dense_equivalence(name):
    z = EXTRA[name]
    model, inputs = z.build()
    ref = copy.deepcopy(model)
    mohdify.mohdify(model, DENSE, example_inputs=inputs)
    plan = model.mohd_plan
    assert plan.frontend == "torch.export" and plan.hidden_size == z.hidden_size
    got = {b.name: (b.readers, b.writer) for b in plan.branches}
    assert got == z.branches, f"{name}: found {got}"
    for layer in z.never:
        assert layer not in plan.readers and layer not in plan.writers, f"{name}: {layer} must stay dense"
        assert layer in dict(plan.skipped), f"{name}: {layer} has no stated reason"
    readers = sorted(n for n, m in model.named_modules() if isinstance(m, MoHDReader))
    assert readers == sorted(r for rs, _ in z.branches.values() for r in rs)
    assert sorted(n for n, m in model.named_modules() if isinstance(m, MoHDWriter)) == \
        sorted(w for _, w in z.branches.values())
    assert_close(_out(model, inputs), _out(ref, inputs), f"{name} mohdified (delta=1) vs dense output")


def test_sandwich_and_output_norms_are_named_in_the_plan():
    for name, norm in (("gemma2", "post_attention_layernorm (Gemma2RMSNorm)"),
                       ("olmo2", "post_attention_layernorm (Olmo2RMSNorm)")):
        model, inputs = EXTRA[name].build()
        attn = mohdify.explain(model, inputs, DENSE).branch("model.layers.1.self_attn")
        assert attn.input.endswith(f"output through model.layers.1.{norm} before the add"), attn.input
    assert attn.input.startswith("h (the residual stream itself)")   # olmo2 has no pre-norm


def test_moe_parts_left_dense_with_reasons():
    model, inputs = EXTRA["qwen2_moe"].build()
    skipped = dict(mohdify.explain(model, inputs, DENSE).skipped)
    for i in range(2):
        assert "Qwen2MoeExperts" in skipped[f"model.layers.{i}.mlp.experts"]
        assert "routed to them" in skipped[f"model.layers.{i}.mlp.experts"]
        assert skipped[f"model.layers.{i}.mlp.gate"].startswith("Qwen2MoeTopKRouter multiplies activations")
        assert "gates or routes" in skipped[f"model.layers.{i}.mlp.shared_expert_gate"]
    model, inputs = EXTRA["qwen3_moe"].build()
    skipped = dict(mohdify.explain(model, inputs, DENSE).skipped)
    assert "Qwen3MoeSparseMoeBlock" in skipped["model.layers.0.mlp"] and "left dense" in skipped["model.layers.0.mlp"]
    assert "Qwen3MoeTopKRouter" in skipped["model.layers.1.mlp.gate"]


def test_layernorm_on_branch_output_is_not_a_writer():
    torch.manual_seed(0)
    model = LayerNormOut().eval()
    plan = mohdify.explain(model, (torch.randn(2, 5, 32),), DENSE)
    assert [(b.readers, b.writer) for b in plan.branches] == [(["up1"], "down1")]
    why = dict(plan.skipped)["down2"]
    assert "layer_norm" in why and "in norm (LayerNorm)" in why and "does not keep zeros" in why


def test_dynamo_fallback_with_graph_breaks():
    torch.manual_seed(0)
    model = DataDependentNet().eval()
    ref = copy.deepcopy(model)
    cap = capture_mod.capture(model, (_ids(),))
    # dynamo runs the model's own frame eagerly after a graph break in its loop, so the real-value trace
    # (passes/capture_real.py) is used: it sees that frame too
    assert cap.frontend == "real-value trace" and len(cap.graphs) == 1, [g.frontend for g in cap.graphs]
    mohdify.mohdify(model, DENSE, example_inputs=(_ids(),))
    plan = model.mohd_plan
    assert plan.frontend == "real-value trace"
    assert [f for f, _ in plan.capture_failures] == ["torch.export (non-strict)", "dynamo"]
    assert "data-dependent" in plan.capture_failures[0][1]
    assert "Data-dependent branching" in plan.capture_failures[1][1], plan.capture_failures
    assert {b.name: (b.readers, b.writer) for b in plan.branches} == NETS_BRANCHES
    assert list(dict(plan.skipped)) == ["head"]
    assert dict(plan.skipped)["head"].startswith("reads the residual stream but feeds no residual branch"), plan.skipped
    assert_close(_out(model, (_ids(),)), _out(ref, (_ids(),)), "dynamo-captured model, delta=1")


def test_dynamo_module_paths_match_real_modules():
    """module_path normalises dynamo's nn_module_stack paths of the compiled model (rooted at the frame's
    locals, L[...]) to real module names: each names a submodule of the model, the same one dynamo's key
    (id(module)) points at where that id is one of the model's. In the full suite dynamo also hands entries
    reached through a global (G[...]) whose ids are no module of this model (cause not found); capture
    names modules by id first (capture._name_module_stacks), so those never name a module of the plan."""
    torch._dynamo.reset()
    model, inputs = EXTRA["mistral"].build()
    by_id = {str(id(m)): n for n, m in model.named_modules()}
    paths = []

    def backend(gm, example_inputs):
        paths.extend(v for n in gm.graph.nodes for v in (n.meta.get("nn_module_stack") or {}).items())
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(**inputs)
    own = [(key, p) for key, (p, _) in paths if p.startswith("L[")]
    foreign = [(key, p) for key, (p, _) in paths if not p.startswith("L[")]
    assert own and all(p.startswith("G[") and key not in by_id for key, p in foreign), foreign[:3]
    for _, p in own:
        model.get_submodule(module_path(p))                 # raises when the path names no submodule
    assert all(module_path(p) == by_id[key] for key, p in own), own[:3]
    assert "model.layers.1.mlp.down_proj" in {module_path(p) for _, p in own}


def test_hf_model_through_dynamo_gives_the_export_plan(monkeypatch):
    model, inputs = EXTRA["gemma2"].build()
    want = mohdify.explain(model, inputs, DENSE)

    def no_export(*args, **kwargs):
        raise RuntimeError("export disabled by the test")
    monkeypatch.setattr(capture_mod, "_export", no_export)
    plan = mohdify.explain(model, inputs, DENSE)
    assert plan.frontend == "dynamo" and plan.capture_failures[0][1] == "RuntimeError: export disabled by the test"
    assert [(b.name, b.readers, b.writer, b.input) for b in plan.branches] == \
        [(b.name, b.readers, b.writer, b.input) for b in want.branches]
    assert plan.skipped == want.skipped


def test_per_block_export_fallback():
    torch.manual_seed(0)
    model = EagerOnlyNet().eval()
    ref = copy.deepcopy(model)
    mohdify.mohdify(model, DENSE, example_inputs=(_ids(),))
    plan = model.mohd_plan
    assert plan.frontend == "torch.export per block"
    assert [f for f, _ in plan.capture_failures] == ["torch.export (non-strict)", "dynamo"]
    assert "dynamo produced no graph" in plan.capture_failures[1][1]
    assert {b.name: (b.readers, b.writer) for b in plan.branches} == NETS_BRANCHES
    assert dict(plan.skipped) == {"head": OUTSIDE_BLOCKS}
    assert_close(_out(model, (_ids(),)), _out(ref, (_ids(),)), "per-block-captured model, delta=1")


def test_every_frontend_failing_raises_capture_error_and_changes_nothing(monkeypatch):
    import mohdify.passes.capture_real as real

    def refuse(*args, **kwargs):
        raise RuntimeError("real-value trace disabled by the test")
    monkeypatch.setattr(real, "capture_real", refuse)
    torch.manual_seed(0)
    model = Uncapturable().eval()
    before, modules = _state(model), [(n, type(m)) for n, m in model.named_modules()]
    with pytest.raises(mohdify.CaptureError) as err:
        mohdify.mohdify(model, DENSE, example_inputs=(_ids(),))
    msg = str(err.value)
    assert "Uncapturable" in msg and "Tensor(2, 7):int64" in msg
    for frontend, why in (("torch.export (non-strict)", "data-dependent"), ("dynamo", "dynamo produced no graph"),
                          ("torch.export per block", "no ModuleList of repeated blocks"),
                          ("real-value trace", "disabled by the test")):
        line = next(line for line in msg.splitlines() if line.startswith(f"  - {frontend}:"))
        assert why in line, line
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
