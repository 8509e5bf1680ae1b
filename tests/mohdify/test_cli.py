"""The `mohdify` command line (mohdify/cli.py): each subcommand run on a tiny model, its output
checked against what it claims (branch names, the saved plan, the scores recomputed here)."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys

import pytest
import torch

import mohdify

pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from mohdify.cli import app  # noqa: E402
from mohdify.cli_models import DecodeSpeed, decode_speed  # noqa: E402

SMALL = ["--groups", "8", "--shared", "2", "--top-k", "2"]
TEXT = "In the beginning God created the heaven and the earth. And the earth was without form, and void. " * 12


def _run(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """tiny-llama converted with calibration on a text file: (folder, text file, output)."""
    root = tmp_path_factory.mktemp("cli")
    (root / "text.txt").write_text(TEXT)
    code, out = _run("convert", "tiny-llama", root / "m", *SMALL, "--calibrate", root / "text.txt",
                     "--calibration-tokens", 512, "--seq-len", 128)
    assert code == 0, out
    return root / "m", root / "text.txt", out


def test_help_explains_each_command():
    code, out = _run("--help")
    assert code == 0 and all(c in out for c in ("explain", "convert", "bench", "eval"))
    for command, words in (("explain", "left dense"), ("convert", "save_pretrained"), ("bench", "tokens/s"),
                           ("eval", "bits per byte")):
        code, out = _run(command, "--help")
        assert code == 0 and words in " ".join(out.split()), (command, out)


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-c", "from mohdify.cli import main; import sys; sys.argv=['mohdify',"
                          "'--help']; main()"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "convert" in out.stdout


def test_explain_a_named_config_lists_its_branches():
    code, out = _run("explain", "tiny-gpt2", *SMALL)
    assert code == 0, out
    assert "hidden size D=256, 8 branches" in out and "density=0.500" in out
    for i in range(4):
        assert re.search(rf"transformer\.h\.{i}\.attn\s+c_attn\s+c_proj", out)
        assert re.search(rf"transformer\.h\.{i}\.mlp\s+c_fc\s+c_proj", out)
    assert "lm_head: " in out


def test_convert_saves_a_calibrated_mohd_model_that_transformers_loads(saved):
    folder, _, out = saved
    assert "calibrated on 512 tokens" in out and "8 branches, density 0.500" in out and f"saved to {folder}" in out
    entry = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert entry["quant_method"] == "mohd" and entry["config"]["router"] == "magnitude"
    model = AutoModelForCausalLM.from_pretrained(folder)
    shared = [b.shared_idx.tolist() for b in mohdify.branches(model)]
    assert len(shared) == 8 and any(s != [0, 1] for s in shared)   # chosen by energy, not the default 0, 1


def test_explain_a_saved_folder_shows_its_saved_plan(saved):
    code, out = _run("explain", saved[0])
    assert code == 0 and "the plan saved with it" in out and "8 branches" in out
    assert "model.layers.3.mlp" in out


def test_eval_prints_the_scores_recomputed_here(saved):
    folder, text, _ = saved
    code, out = _run("eval", folder, text, "--seq-len", 64, "--max-tokens", 256, "--compare-dense")
    assert code == 0, out
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor(list(TEXT.encode())[:256])
    for name in ("model", "dense"):
        m = mohdify.demohdify(model) if name == "dense" else model
        nats = 0.0
        with torch.no_grad():
            for w in ids.split(64):
                nats += torch.nn.functional.cross_entropy(m(input_ids=w[None]).logits[0, :-1], w[1:],
                                                          reduction="sum").item()
        line = next(line for line in out.splitlines() if line.startswith(f"{name}:"))
        assert "252 tokens (252 bytes" in line
        assert f"bits per byte {nats / math.log(2) / 252:.4f}" in line
        assert f"perplexity {math.exp(nats / 252):.3f}" in line


def test_bench_prints_both_rates_and_their_ratio():
    code, out = _run("bench", "tiny-llama", *SMALL, "--tokens", 3, "--rounds", 2, "--prompt-len", 4)
    assert code == 0, out
    rates = {k: float(v) for k, v in re.findall(r"^(dense|MoHD):\s+([\d.]+) tokens/s", out, re.M)}
    assert set(rates) == {"dense", "MoHD"} and all(v > 0 for v in rates.values())
    assert re.search(r"MoHD / dense: [\d.]+x \(median of 2 interleaved rounds\)", out)
    assert "1 thread(s)" in out and "density 0.500" in out


def test_decode_speed_alternates_the_two_models():
    calls = []

    class Stub(torch.nn.Module):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def generate(self, prompt, **kw):
            calls.append((self.name, kw["max_new_tokens"]))

    speed = decode_speed(Stub("dense"), Stub("mohd"), torch.zeros(1, 2, dtype=torch.long), tokens=5, rounds=3)
    assert calls == [("dense", 4), ("mohd", 4), ("dense", 5), ("mohd", 5), ("mohd", 5), ("dense", 5),
                     ("dense", 5), ("mohd", 5)]
    assert len(speed.dense) == len(speed.mohd) == 3
    assert DecodeSpeed([1.0, 2.0, 4.0], [2.0, 2.0, 2.0]).ratio == 1.0


def test_bad_input_is_a_clear_error(saved):
    code, out = _run("explain", "no-such-model")
    assert code == 2 and "named configs are" in out and "tiny-llama" in out
    code, out = _run("convert", saved[0], saved[0].parent / "again")
    assert code == 2 and "already mohdified" in out
    code, out = _run("convert", "tiny-llama", saved[0].parent / "g7", "--groups", "7", "--shared", "2", "--top-k", "2")
    assert code == 2 and "num_groups=7 must divide" in out
