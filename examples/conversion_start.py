"""Where a conversion starts: the validation bits per byte of a dense train_lm checkpoint converted to MoHD
(re-basis by calibrated energy, magnitude router, calibrated shared groups) before any training, for several
group layouts at the same density, next to the dense model's own figure. Cheap (one evaluation per layout), so
it chooses the layout before spending training steps on it.

    python examples/conversion_start.py --init runs/dense.ckpt --layouts 16:4:4 16:0:8 16:6:2 32:8:8 \
        --out docs/results/r5-causal-start/start.json

A layout is groups:shared:top_k. The model flags (--hidden, --layers, ...) are train_lm's and must match the
checkpoint's; the validation windows and calibration batches are train_lm's too.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_lm  # noqa: E402
from corpora import load_corpus  # noqa: E402
from provenance import provenance  # noqa: E402


def layout(text: str) -> tuple[int, int, int]:
    try:
        groups, shared, top_k = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"layout {text!r}: expected groups:shared:top_k, e.g. 16:4:4") from None
    return groups, shared, top_k


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", type=Path, required=True, help="the dense train_lm checkpoint")
    p.add_argument("--layouts", nargs="+", type=layout, default=[(16, 4, 4)])
    p.add_argument("--rebasis", default="energy", choices=("none", "energy"))
    p.add_argument("--out", type=Path, required=True)
    args, model_flags = p.parse_known_args(argv)
    base = train_lm.parse_args(model_flags + ["--out", str(args.out), "--init", str(args.init), "--calibrate", "8"])
    torch.set_num_threads(base.threads)
    train_data, val_data, _ = load_corpus(base.corpus)
    windows = train_lm.validation_windows(val_data, base.eval_windows, base.context)
    calib = train_lm.calibration(train_data, base)
    c0 = time.process_time()
    dense = train_lm.build_model(base)[0]
    rows = [{"layout": "dense", "density": 1.0, "val_bpb": round(train_lm.evaluate(dense, windows, base.batch)[0], 5)}]
    print(f"dense: {rows[0]['val_bpb']:.4f} bpb", flush=True)
    for groups, shared, top_k in args.layouts:
        conv = argparse.Namespace(**{**vars(base), "mohd": True, "router": "magnitude", "rebasis": args.rebasis,
                                     "groups": groups, "shared": shared, "top_k": top_k})
        model, _, cfg, _ = train_lm.build_model(conv, calib)
        bpb = train_lm.evaluate(model, windows, base.batch)[0]
        rows.append({"layout": f"{groups}:{shared}:{top_k}", "groups": groups, "shared": shared, "top_k": top_k,
                     "density": cfg.density, "val_bpb": round(bpb, 5)})
        print(f"{groups} groups, {shared} shared, top-{top_k} (delta {cfg.density}): {bpb:.4f} bpb", flush=True)
    result = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "init": str(args.init),
              "rebasis": args.rebasis, "router": "magnitude", "eval_windows": base.eval_windows,
              "cpu_s": round(time.process_time() - c0, 1), **provenance(base.threads), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
