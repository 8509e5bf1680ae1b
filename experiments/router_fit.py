"""Can a learned (linear) router start where magnitude routing is? Issue 13 asks for the learned router initialised
from calibration. The magnitude router picks the routed groups of largest energy ||x[group]||^2, an even function
of x (x and -x get the same groups); a linear router's scores W x are odd (-x gets the reverse order). So no W
reproduces magnitude routing on a sign-symmetric input; this measures how close the best least-squares fit gets.

Per branch of MiniLM (re-based by energy, mohdified with the magnitude router, shared groups calibrated): W is
fitted by least squares to each token's standardised routed-group energies on fitting verses, then on other
verses we count the tokens whose top-k set under W equals magnitude routing's ("exact") and the mean share of
the k groups both pick ("overlap"); a random router's overlap is k / N_r.

    HF_HUB_OFFLINE=1 python experiments/router_fit.py --out docs/results/r5-router-fit/minilm.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from convert_minilm import load_minilm, spaced  # noqa: E402
from corpora import KJV_VALIDATION_BOOKS, kjv_verses  # noqa: E402
from provenance import provenance  # noqa: E402

import mohdify  # noqa: E402
from mohdify import rebasis  # noqa: E402
from mohdify.modules import MoHDReader  # noqa: E402


def branch_inputs(model, batches) -> dict:
    """{branch: [T, D] the inputs of its first reader over the batches' real (unpadded) tokens}."""
    first = {}
    for m in model.modules():
        if isinstance(m, MoHDReader):
            first.setdefault(m.branch, m)
    xs, mask = {b: [] for b in first}, {}
    hooks = [r.register_forward_pre_hook(lambda mod, a: xs[mod.branch].append(a[0][mask["m"]].detach()))
             for r in first.values()]
    with torch.no_grad():
        for b in batches:
            mask["m"] = b["attention_mask"].bool()
            model(**b)
    for h in hooks:
        h.remove()
    return {b: torch.cat(v) for b, v in xs.items()}


def top_sets(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros_like(scores).scatter(1, scores.topk(k, -1).indices, 1.0)      # [T, N_r] 0/1


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--densities", nargs="*", type=float, default=[0.75, 0.5])
    p.add_argument("--fit-verses", type=int, default=256)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    c0 = time.process_time()
    tok, dense = load_minilm()
    train = kjv_verses(exclude=KJV_VALIDATION_BOOKS)

    def batches(verses):
        out = []
        for i in range(0, len(verses), 64):
            b = tok(verses[i: i + 64], padding=True, truncation=True, max_length=64, return_tensors="pt")
            out.append({k: b[k] for k in ("input_ids", "attention_mask")})
        return out
    calib, fit, test = (batches(spaced(v, n)) for v, n in ((train, 128), (train[1::2], args.fit_verses),
                                                           (train[3::7], 128)))
    example = {k: v[:2] for k, v in calib[0].items()}
    rows = []
    for density in args.densities:
        top_k = round(density * 16) - 4
        model = copy.deepcopy(dense)
        rebasis.permute_stream(model, rebasis.energy_order(model, calib, example), example)
        model = mohdify.mohdify(model, mohdify.MoHDConfig(num_groups=16, num_shared=4, top_k=top_k, router="magnitude"),
                                example_inputs=example)
        mohdify.calibrate(model, calib)
        xf, xt = branch_inputs(model, fit), branch_inputs(model, test)
        for b in xf:
            def energy(x, b=b):
                return x.view(x.shape[0], -1, b.group_size).pow(2).sum(-1)[:, b.routed_idx]   # [T, N_r]
            e = energy(xf[b])
            target = (e - e.mean(1, keepdim=True)) / e.std(1, keepdim=True)
            w = torch.linalg.lstsq(xf[b], target).solution                                   # [D, N_r]
            want, got = top_sets(energy(xt[b]), top_k), top_sets(xt[b] @ w, top_k)
            rows.append({"density": density, "branch": b.name, "tokens": xt[b].shape[0],
                         "exact": round((want == got).all(1).float().mean().item(), 4),
                         "overlap": round(((want * got).sum(1) / top_k).mean().item(), 4),
                         "random_overlap": round(top_k / len(b.routed_idx), 4)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"command": "python " + " ".join(sys.argv), "cpu_s": round(time.process_time() - c0, 1),
              **provenance(1), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
