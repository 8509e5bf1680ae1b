"""lm-evaluation-harness on a saved MoHD model: the documented command (`python -m mohdify.lm_eval run
--model hf ...`, a local JSON-lines task, hub offline) scores the mohdified model, the number it
prints is the rolling log-likelihood recomputed here, and it differs from the dense model's."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mohdify

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")
pytestmark = pytest.mark.slow   # one lm-eval process: ~15-45 s on 2 cores

ROOT = Path(__file__).resolve().parents[2]


def _bits_per_byte(model, texts):
    """lm-eval's loglikelihood_rolling for short documents: every byte predicted after end-of-text (id 0)."""
    nats, size = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([0, *text.encode()])
            logp = torch.log_softmax(model(input_ids=ids[None, :-1]).logits[0].float(), -1)   # [L, V]
            nats -= logp.gather(1, ids[1:, None]).sum().item()
            size += len(text.encode())
    return nats / math.log(2) / size


def test_lm_eval_scores_the_saved_mohd_model(tmp_path):
    from mohdify.cli_models import load_model
    loaded = load_model("tiny-llama")
    mohdify.mohdify(loaded.model, mohdify.MoHDConfig(num_groups=8, num_shared=2, top_k=2, router="magnitude"),
                    example_inputs={"input_ids": torch.randint(0, 256, (1, 16))})
    loaded.model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(tmp_path / "ds")}
    cmd = [sys.executable, "-m", "mohdify.lm_eval", "run", "--model", "hf", "--model_args",
           f"pretrained={tmp_path / 'm'},dtype=float32", "--include_path", "examples/lm_eval", "--tasks",
           "mohd_local_text", "--device", "cpu", "--batch_size", "1", "--output_path", str(tmp_path / "out")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "|mohd_local_text|" in done.stdout and "bits_per_byte" in done.stdout
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["mohd_local_text"]
    texts = [json.loads(line)["text"] for line in (ROOT / "examples/lm_eval/sample.jsonl").read_text().splitlines()]
    mohd = _bits_per_byte(loaded.model, texts)
    dense = _bits_per_byte(mohdify.demohdify(loaded.model), texts)
    assert results["bits_per_byte,none"] == pytest.approx(mohd, rel=1e-5)
    assert abs(mohd - dense) > 1e-3   # so the score above is the MoHD model's, not the dense one's
