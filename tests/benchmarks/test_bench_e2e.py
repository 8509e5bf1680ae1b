"""The end-to-end benchmarks (benchmarks/bench_e2e.py, bench_train.py) run on CPU in --smoke mode and
write the JSON the GPU session reads; at delta 1 with zero-initialised routers MoHD decodes exactly
the dense model's tokens and has its first training loss. The model pieces (the self-written llama,
the ideal stand-in, MoHD configs at a density) are checked directly. Timings need a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"   # on sys.path via pyproject's pytest pythonpath

from e2e_models import SHAPES, Decoder, active_width, build_model, mohd_config  # noqa: E402
from lite_llama import LiteConfig, LiteLlama  # noqa: E402


def assert_fused(counters: dict) -> bool:
    """One mohdified graph of 2 llama layers, fused: per layer q|k|v and gate|up -> 2 read_multi,
    2 writes + residual adds -> write_add (routing is computed once per branch already)."""
    assert dict(counters) == {"graphs": 1, "mohdified_graphs": 1, "reads_merged": 10, "read_multi": 4,
                              "writes_fused": 4}, counters
    return True


@pytest.mark.parametrize("impl", ["hf", "lite"])
def test_e2e_smoke_mohd_at_delta_1_decodes_the_dense_tokens(tmp_path, impl):
    args = ["--smoke", "--out", str(tmp_path), "--densities", "1", "--router-std", "0", "--model", impl,
            "--prompt", "8", "--new-tokens", "6", "--runs", "1", "--providers", "dense,mohd"]
    if impl == "hf":   # the script itself, as the GPU session runs it
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, str(BENCH / "bench_e2e.py"), *args], capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 0, (f"bench_e2e.py exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                                      f"{proc.stderr[-3000:]}")
    else:              # in-process, to spare an interpreter start
        import bench_e2e

        assert bench_e2e.main(args) == 0
    out = json.loads((tmp_path / "e2e_smoke.json").read_text())
    assert {"gpu", "torch", "triton", "git_sha"} <= set(out["env"])
    assert (out["model_impl"], out["model_fallback_reason"], out["dtype"]) == (impl, None, "torch.float32")
    assert out["shape"] == {"name": "smoke", "dim": 64, "layers": 2, "ffn": 96, "heads": 4, "kv_heads": 2,
                            "vocab": 128, "head_dim": 16}
    rows = {r["provider"]: r for r in out["rows"]}
    assert sorted(rows) == ["dense", "mohd"] and len(out["rows"]) == 2
    for r in out["rows"]:
        assert r.get("error") is None and r.get("warning") is None, r
        assert r["tok_per_s"] > 0 and r["runs_identical"] and len(r["tokens"]) == 7, r
        assert r["graphs_compiled"] == 1, r   # one compiled decode step, no recompilation
        assert r["eager_tokens_agree"] == 1.0 and r["prefill_logits_finite"] is True, r
    dense, mohd = rows["dense"], rows["mohd"]
    assert mohd["tokens"] == dense["tokens"] and mohd["tokens_equal_dense"] == 1.0
    assert_fused(mohd["backend_counters"])
    assert mohd["branches"] == 4 and mohd["routers_drawn"] == 0 and mohd["distinct_routings"] == 1
    assert mohd["mohd_config"]["num_groups"] == 4 and mohd["mohd_config"]["top_k"] == 2
    assert mohd["compile"] == {"backend": "mohd", "options": {"compiler": "aot_eager"}}
    assert out["params"]["dense"] == {"total": 78144, "read_per_token": 69952}


def test_summary_fractions_of_the_ideal():
    from bench_e2e import summarise

    rows = [{"provider": "dense", "delta": 1.0, "tok_per_s": 100.0, "tokens": [1, 2, 3, 4]},
            {"provider": "ideal", "delta": 0.5, "tok_per_s": 150.0, "tokens": [1, 2, 0, 0]},
            {"provider": "mohd", "delta": 0.5, "tok_per_s": 140.0, "tokens": [1, 0, 0, 0]},
            {"provider": "mohd", "delta": 0.25, "error": "RuntimeError: x"}]
    summarise(rows)
    ideal, mohd, failed = rows[1], rows[2], rows[3]
    assert ideal["speedup_vs_dense"] == 1.5 and ideal["tokens_equal_dense"] == 0.5
    assert mohd["speedup_vs_dense"] == pytest.approx(1.4) and mohd["ideal_speedup"] == 1.5
    assert mohd["frac_of_ideal"] == pytest.approx(1.4 / 1.5) and mohd["target_met"] is True
    assert mohd["frac_of_ideal_gain"] == pytest.approx(0.4 / 0.5) and mohd["tokens_equal_dense"] == 0.25
    assert "frac_of_ideal" not in failed and "target_met" not in failed


def test_ideal_at_delta_1_is_the_dense_model():
    shape = SHAPES["smoke"]
    for impl in ("hf", "lite"):
        dense = build_model(impl, shape, device="cpu", dtype=torch.float32, seed=0).state_dict()
        ideal = build_model(impl, shape, dim=active_width(64, 1.0, 4), device="cpu", dtype=torch.float32,
                            seed=0).state_dict()
        assert list(dense) == list(ideal)
        for name, value in dense.items():
            assert torch.equal(value, ideal[name]), f"{impl}: {name} {tuple(value.shape)} differs"


def test_train_smoke_mohd_at_delta_1_has_the_dense_first_loss(tmp_path):
    # In-process (main(argv)), to spare a second interpreter start; the e2e test above runs its script.
    import bench_train

    # 16 tokens: the MoHD ops (fused below); more tokens on CPU take the masked path, whose graph has no
    # read / write op to fuse (codegen/cpu/masked.py, tested in tests/codegen/test_cpu_masked.py)
    assert bench_train.main(["--smoke", "--out", str(tmp_path), "--density", "1", "--router-std", "0", "--model",
                             "hf", "--batch", "2", "--seq", "8", "--steps", "1", "--warmup", "1"]) == 0
    out = json.loads((tmp_path / "train.json").read_text())
    rows = {r["provider"]: r for r in out["rows"]}
    assert sorted(rows) == ["dense", "mohd"] and out["tokens_per_step"] == 16
    for r in out["rows"]:
        assert r.get("error") is None, r
        assert r["ms_per_step"] > 0 and r["losses_finite"] and len(r["losses"]) == 2, r
        assert r["gradient_checkpointing"] is False and r["kernel_fallbacks"] == [] and "warning" not in r
    dense, mohd = rows["dense"], rows["mohd"]
    assert mohd["first_loss"] == pytest.approx(dense["first_loss"], abs=1e-5)
    assert abs(dense["first_loss"] - torch.log(torch.tensor(128.0)).item()) < 0.5   # random weights: ~ln V
    # Zero routers, k = N_r = 2: every token takes both routed groups (f_i = 1) with P_i = 1/2, so each
    # branch's loss is N_r * sum_i f_i P_i = 2; 4 branches times the coefficient 0.01 give 0.08.
    assert mohd["aux_loss"] == pytest.approx(0.08, rel=1e-5)
    assert_fused(mohd["backend_counters"]) and mohd["branches"] == 4


def test_lite_llama_static_cache_decode_equals_full_forward():
    torch.manual_seed(0)
    model = LiteLlama(LiteConfig(vocab=50, dim=32, layers=2, heads=4, kv_heads=2, head_dim=8, ffn=48)).eval()
    ids = torch.randint(0, 50, (1, 9))
    dec = Decoder(model, "lite", 12)
    with torch.no_grad():
        full = model(ids)                                                    # [1, 9, V]
        dec.cache.reset()
        parts = [dec.logits(ids[:, :6], torch.arange(6))] + [dec.logits(ids[:, t:t + 1], torch.arange(t, t + 1))
                                                            for t in range(6, 9)]
    err = (torch.cat(parts, dim=1) - full).abs().max().item()
    assert err < 1e-5, f"cached decode logits [1, 9, 50] differ from the full forward by {err:.2e}"


@pytest.mark.parametrize("impl", ["lite", "hf"])
def test_ideal_stand_in_cuts_readers_and_writers_only(impl):
    shape = SHAPES["smoke"]
    width = active_width(shape.dim, 0.5, 4)
    model = build_model(impl, shape, dim=width, device="cpu", dtype=torch.float32, seed=0)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    layer = "model.layers.0" if impl == "hf" else "layers.0"
    assert linears[f"{layer}.self_attn.q_proj"].weight.shape == (64, 32)     # [heads * head_dim, a]
    assert linears[f"{layer}.self_attn.k_proj"].weight.shape == (32, 32)     # [kv_heads * head_dim, a]
    assert linears[f"{layer}.self_attn.o_proj"].weight.shape == (32, 64)     # [a, heads * head_dim]
    assert linears[f"{layer}.mlp.up_proj"].weight.shape == (96, 32)
    assert linears[f"{layer}.mlp.down_proj"].weight.shape == (32, 96)
    head = [m for n, m in linears.items() if "lm_head" in n]
    assert len(head) == 1 and head[0].weight.shape == (128, 64)              # the head keeps width D
    with torch.no_grad():
        logits = model(input_ids=torch.zeros(1, 3, dtype=torch.long)) if impl == "hf" else \
            model(torch.zeros(1, 3, dtype=torch.long))
    logits = logits.logits if impl == "hf" else logits
    assert logits.shape == (1, 3, 128)


def test_mohd_config_at_a_density_and_bad_densities():
    assert (mohd_config(0.5, 16, "learned").num_shared, mohd_config(0.5, 16, "learned").top_k) == (4, 4)
    assert (mohd_config(0.25, 16, "learned").num_shared, mohd_config(0.25, 16, "learned").top_k) == (2, 2)
    assert mohd_config(0.25, 16, "learned").density == 0.25
    assert active_width(4096, 0.25, 16) == 1024 and active_width(2048, 0.5, 16) == 1024
    with pytest.raises(ValueError, match=r"density 0\.3 is not a whole number of active groups out of 16"):
        active_width(2048, 0.3, 16)


def test_cpu_benchmarks_smoke_write_their_json(tmp_path):
    """The CPU benchmarks (bench_cpu_ops.py, bench_cpu_e2e.py) run in --smoke mode and record every
    provider's ratio; the e2e MoHD model decodes finite tokens. Plumbing only: no speed is asserted."""
    import bench_cpu_e2e
    import bench_cpu_ops

    assert bench_cpu_ops.main(["--smoke", "--dtypes", "float32", "--tokens", "1,33", "--deltas", "0.5",
                               "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "cpu_ops.json").read_text())["results"]
    assert [(r["kind"], r["tokens"]) for r in rows] == [("read", 1), ("read", 33), ("write", 1), ("write", 33)]
    assert all(r["kernel"] > 0 and r["ideal"] > 0 and r["ref"] > 0 for r in rows)
    assert rows[0]["path"] == "decode" and rows[0]["target"] == 1.7
    assert bench_cpu_e2e.main(["--smoke", "--no-compile", "--out", str(tmp_path)]) == 0
    e2e = json.loads((tmp_path / "cpu_e2e_smoke.json").read_text())
    names = [r["provider"] for r in e2e["rows"]]
    assert names == ["dense_eager", "ideal_eager", "mohd_eager", "peak_rss_so_far"], names
    mohd = e2e["rows"][2]
    assert mohd["tok_per_s"] > 0 and "prefill_vs_dense" in mohd
    assert len(mohd["tokens"]) == 1 and len(mohd["tokens"][0]) > 1        # [batch][new tokens]
