"""Why the 16-group magnitude conversions of the byte-level Llama report one group load for 7 of 8 branches.

    python experiments/routing_lockin.py --init /work/results/r1-tuned/dense-d128-lr0.003-s0.ckpt \
        --out docs/results/r5-causal-lockin/lockin.json

Converts the dense checkpoint as the R5 causal runs do (re-basis by energy, 8 calibration batches, magnitude
router), runs validation windows once, and per branch records, straight from the modules:
- the active set that `mohdify.trace_routing` reports, and whether it equals the top-k recomputed from the
  energy of the input its first reader received (a check of the trace);
- the share of tokens whose active set equals the previous branch's;
- the share whose routed top-k equals the top-k of the raw stream h (the norm's input);
- the mean stream norm ||h|| at the branch.
The same figures for the dense re-based model (top-k of the energies it would route on, nothing masked) show
what routing would pick without MoHD's masked writes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import train_lm  # noqa: E402
from corpora import load_corpus  # noqa: E402
from provenance import provenance  # noqa: E402

import mohdify  # noqa: E402


def topk_mask(x: torch.Tensor, groups: int, routed: torch.Tensor, k: int) -> torch.Tensor:
    """[T, N_r] bool: the k routed groups of largest energy of x [T, D]."""
    e = x.view(x.shape[0], groups, -1).pow(2).sum(-1)[:, routed]                # [T, N_r]
    return torch.zeros_like(e, dtype=torch.bool).scatter(1, e.topk(k, -1).indices, True)


@torch.no_grad()
def branch_figures(model, windows: torch.Tensor, args) -> list[dict]:
    """Per branch (in order): the figures of the module docstring."""
    seen_in, seen_h = {}, {}
    keep = (lambda store, key: lambda m, a: store.__setitem__(key, a[0].reshape(-1, a[0].shape[-1])))
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for kind, norm, reader in (("self_attn", layer.input_layernorm, layer.self_attn.q_proj),
                                   ("mlp", layer.post_attention_layernorm, layer.mlp.gate_proj)):
            name = f"model.layers.{i}.{kind}"
            hooks += [norm.register_forward_pre_hook(keep(seen_h, name)),
                      reader.register_forward_pre_hook(keep(seen_in, name))]
    branches = {b.name: b for b in mohdify.branches(model)}
    traced = {}
    try:
        if branches:
            with mohdify.trace_routing(model) as traced:
                model(input_ids=windows[:, :-1])
        else:
            model(input_ids=windows[:, :-1])
    finally:
        for h in hooks:
            h.remove()
    routed = torch.arange(args.shared, args.groups)
    rows, prev = [], None
    for name, x in seen_in.items():
        if name in branches:
            routed = branches[name].routed_idx
        sel = topk_mask(x, args.groups, routed, args.top_k)                        # [T, N_r]
        row = {"branch": name, "stream_norm": round(seen_h[name].norm(dim=-1).mean().item(), 3),
               "same_as_previous": None if prev is None else round((sel == prev).all(1).float().mean().item(), 4),
               "same_as_stream_topk": round((sel == topk_mask(seen_h[name], args.groups, routed, args.top_k))
                                            .all(1).float().mean().item(), 4),
               "routed_load": [round(v, 4) for v in sel.float().mean(0).tolist()]}
        if name in traced:
            row["trace_equals_direct"] = bool((traced[name][-1].mask[:, routed] == sel).all())
        rows.append(row)
        prev = sel
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--init", type=Path, required=True)
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--shared", type=int, default=4)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--windows", type=int, default=16, help="validation windows of 128 bytes")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    train, val, _ = load_corpus("kjv")
    windows = train_lm.validation_windows(val, a.windows, 128)
    result = {"command": "python " + " ".join(sys.argv), **provenance(1)}
    for mohd in (False, True):
        targs = train_lm.parse_args(["--init", str(a.init), "--rebasis", "energy", "--calibrate", "8", "--router",
                                     "magnitude", "--groups", str(a.groups), "--shared", str(a.shared), "--top-k",
                                     str(a.top_k), "--out", str(a.out)] + (["--mohd"] if mohd else []))
        model = train_lm.build_model(targs, train_lm.calibration(train, targs))[0].eval()
        if mohd:
            result["shared_idx"] = {b.name: b.shared_idx.tolist() for b in mohdify.branches(model)}
        result["mohd" if mohd else "dense"] = branch_figures(model, windows, targs)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    for kind in ("dense", "mohd"):
        for r in result[kind]:
            print(kind, r["branch"], r["same_as_previous"], r["same_as_stream_topk"], r["stream_norm"],
                  r.get("trace_equals_direct", ""))


if __name__ == "__main__":
    main()
