"""R4: activation flow of MiniLM (pretrained) and of the R1 models (trained by run_research.py).

    HF_HUB_OFFLINE=1 python experiments/flow_r4.py            # writes docs/results/r4/<model>/*.png and r4.json

MiniLM: 128 held-out KJV verses (padding left out). R1 models: their final checkpoints
(docs/results/r1/<run>.ckpt, kept by run_research.py; not committed), 32 validation windows of 128 bytes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import mohdify  # noqa: E402

OUT = ROOT / "docs" / "results" / "r4"


def minilm_flow(n_verses: int) -> mohdify.Flow:
    from convert_minilm import load_minilm, spaced
    from corpora import KJV_VALIDATION_BOOKS, kjv_verses
    tok, model = load_minilm()
    verses = spaced(kjv_verses(books=KJV_VALIDATION_BOOKS), n_verses)
    batches = []
    for i in range(0, len(verses), 32):
        b = tok(verses[i: i + 32], padding=True, truncation=True, max_length=64, return_tensors="pt")
        batches.append({k: b[k] for k in ("input_ids", "attention_mask")})
    return mohdify.flow(model, batches, num_groups=16)


def r1_flow(ckpt: Path, windows: int) -> mohdify.Flow:
    import train_lm
    from corpora import load_corpus
    saved = torch.load(ckpt, weights_only=False)
    args = argparse.Namespace(**saved["args"])
    model, _, cfg, _ = train_lm.build_model(args)
    model.load_state_dict(saved["model"])
    _, val, _ = load_corpus(args.corpus)
    w = train_lm.validation_windows(val, windows, args.context)[:, :-1]
    return mohdify.flow(model, [{"input_ids": w[i: i + 16]} for i in range(0, windows, 16)],
                        num_groups=cfg.num_groups if cfg else 16)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--verses", type=int, default=128)
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--runs", nargs="*", default=["dense-d128-s0", "mohd-d128-delta0.5-s0", "dense-d64-s0"])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    summary = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "models": {}}
    flows = {"minilm": lambda: minilm_flow(args.verses)}
    for run in args.runs:
        ckpt = ROOT / "docs" / "results" / "r1" / f"{run}.ckpt"
        if ckpt.exists():
            flows[f"r1-{run}"] = lambda ckpt=ckpt: r1_flow(ckpt, args.windows)
        else:
            print(f"skipping {run}: no checkpoint {ckpt} (run experiments/run_research.py first)", flush=True)
    for name, make in flows.items():
        f = make()
        print(f"== {name}\n{f}", flush=True)
        f.plot(OUT / name, title=name)
        summary["models"][name] = {"tokens": f.tokens, "hidden": f.energy.shape[1], "num_groups": f.num_groups,
                                   "top_fraction": f.top_fraction, "branches": f.summary()}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "r4.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
