"""Training step: dense compiled vs MoHD compiled, llama-style model with random weights.

    python benchmarks/bench_train.py --out results/h100      # D 2048 model, 8 x 2048 tokens, delta 0.5
    python benchmarks/bench_train.py --smoke --out /tmp/tr    # CPU plumbing check, fp32, aot_eager

One step = forward (next-token cross-entropy, plus mohdify.aux_loss for MoHD) + backward + AdamW
step (fused on CUDA); parameters, gradients and optimizer state in bf16 on CUDA.
Providers:
  dense  torch.compile(loss) with inductor (default mode: no CUDA graphs in training);
  mohd   the same model after mohdify.mohdify(MoHDConfig(num_groups=16, learned router, half the
         active groups shared)), routers drawn at random, torch.compile(loss, backend="mohd");
  ideal  (optional) the ideal stand-in of bench_e2e (readers / writers at the active width).
The learning rate is 0 by default: the optimizer does the same work for any rate, and every provider
then steps from the same weights, so the first losses compare (equal at --density 1 --router-std 0).
Timing: median over --steps steps after --warmup steps, each between two CUDA synchronizations.
Gradient checkpointing is off unless --grad-ckpt (HF models only); the JSON says which.
Writes `<out>/train.json` after every provider and prints a table.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # run as a script: import the sibling modules

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from bench_e2e import free_memory, model_dim, transformers_version  # noqa: E402
from common import environment, format_table, report_problems, run_provider, write_json  # noqa: E402
from e2e_models import SHAPES, active_width, build_model, choose_impl, count_params, mohd_config, randomise_routers  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

COLUMNS = [("provider", "provider", ""), ("delta", "delta", ".2f"), ("ms_per_step", "ms/step", ".1f"),
           ("tokens_per_s", "tok/s", ".0f"), ("speedup_vs_dense", "vs dense", ".3f"),
           ("first_loss", "loss[0]", ".4f"), ("aux_loss", "aux", ".4f"), ("warmup_s", "warm-up s", ".1f"),
           ("peak_gb", "peak GB", ".1f")]
TARGET_SPEEDUP = 1.3


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--providers", default="dense,mohd", help="dense, mohd and optionally ideal")
    p.add_argument("--model", default="auto", help="auto (HF LlamaForCausalLM if usable, else lite), hf or lite")
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--router-std", type=float, default=None,
                   help="std of the random learned routers (default 1/sqrt(D)); 0 keeps them zero-initialised")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--lr", type=float, default=0.0)
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (HF models)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU, fp32, aot_eager, tiny shape and batch")
    p.add_argument("--out", required=True)
    return p


def make_loss(model, impl: str):
    def loss_fn(ids: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=ids, use_cache=False).logits if impl == "hf" else model(ids)   # [B, S, V]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    return loss_fn


def train(model, impl: str, provider: str, args, ids: torch.Tensor, cuda: bool) -> dict:
    import mohdify

    mohd = provider == "mohd"
    if args.grad_ckpt:
        if impl != "hf":
            raise ValueError("--grad-ckpt needs the HF model (--model hf or auto with transformers)")
        model.gradient_checkpointing_enable()
    model.train()
    if cuda:
        kwargs = {"backend": "mohd" if mohd else "inductor"}
    else:
        kwargs = {"backend": "mohd", "options": {"compiler": "aot_eager"}} if mohd else {"backend": "aot_eager"}
    step_loss = torch.compile(make_loss(model, impl), fullgraph=True, **kwargs)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, fused=cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, aux_losses, durations = [], [], []
    with warnings.catch_warnings(record=True) as caught:   # MoHD ops that fall back to the reference on CUDA
        warnings.simplefilter("always")
        for _ in range(args.warmup + max(1, args.steps)):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            loss = step_loss(ids)
            aux = mohdify.aux_loss(model) if mohd else None
            (loss + aux if aux is not None else loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            durations.append(time.perf_counter() - t0)
            losses.append(loss.item())
            aux_losses.append(aux.item() if aux is not None else None)
    fallbacks = sorted({str(w.message) for w in caught if "runs the reference path" in str(w.message)})
    warmup, times = sum(durations[:args.warmup]), durations[args.warmup:]
    median = statistics.median(times)
    tokens = ids.numel()
    del opt
    model.eval()
    if args.grad_ckpt:
        model.gradient_checkpointing_disable()
    return {"provider": provider, "compile": kwargs, "ms_per_step": 1e3 * median, "tokens_per_s": tokens / median,
            "step_seconds": times, "warmup_s": warmup, "first_loss": losses[0], "losses": losses,
            "aux_loss": aux_losses[0], "losses_finite": all(math.isfinite(x) for x in losses),
            "gradient_checkpointing": args.grad_ckpt, "kernel_fallbacks": fallbacks[:5],
            **({"warning": f"{len(fallbacks)} MoHD op(s) ran the reference instead of the fused kernel: "
                           f"{fallbacks[0]}"} if fallbacks else {}),
            "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def run_mohd(model, impl: str, args, ids, cuda: bool) -> dict:
    import mohdify

    config = mohd_config(args.density, args.groups, "learned")
    example = {"input_ids": ids[:1, :8]} if impl == "hf" else (ids[:1, :8],)
    mohdify.mohdify(model, config, example_inputs=example)
    try:
        std = 1 / math.sqrt(model_dim(model)) if args.router_std is None else args.router_std
        randomise_routers(model, std, args.seed + 1)
        counters["mohdify"].clear()
        row = train(model, impl, "mohd", args, ids, cuda)
        row.update(mohd_config=config.to_dict(), router_std=std, branches=len(mohdify.branches(model)),
                   backend_counters=dict(counters["mohdify"]))
        if row["backend_counters"].get("mohdified_graphs", 0) < 1:
            row["error"] = f"the mohd backend compiled no mohdified graph: counters {row['backend_counters']}"
        return row
    finally:
        mohdify.demohdify(model)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.smoke:
        args.shape = "smoke"
        args.groups = 4 if args.groups == 16 else args.groups
        device, dtype = "cpu", torch.float32
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --smoke on CPU", file=sys.stderr)
            return 2
        device, dtype = "cuda", torch.bfloat16
    cuda = device == "cuda"
    shape = SHAPES[args.shape]
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = set(providers) - {"dense", "ideal", "mohd"}
    if unknown:
        parser().error(f"--providers: unknown {sorted(unknown)}; choose from dense, ideal, mohd")
    width = active_width(shape.dim, args.density, args.groups)
    impl, why_not_hf = choose_impl(args.model)
    out = Path(args.out) / "train.json"
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, shape.vocab, (args.batch, args.seq), generator=gen).to(device)
    payload = {"env": environment(), "transformers": transformers_version(), "args": vars(args),
               "model_impl": impl, "model_fallback_reason": why_not_hf,
               "shape": shape.to_dict(), "dtype": str(dtype), "device": device, "tokens_per_step": ids.numel(),
               "target_speedup": TARGET_SPEEDUP, "params": {}, "rows": []}
    rows = payload["rows"]

    def attempt(provider: str, delta: float, fn) -> None:
        row = run_provider(provider, delta, fn)
        rows.append(row)
        dense = next((r for r in rows if r["provider"] == "dense" and "ms_per_step" in r), None)
        for r in rows:
            if dense is not None and "ms_per_step" in r:
                r["speedup_vs_dense"] = dense["ms_per_step"] / r["ms_per_step"]
                if r["provider"] == "mohd":
                    r["target_met"] = r["speedup_vs_dense"] >= TARGET_SPEEDUP and not r.get("error")
        write_json(out, payload)
        print(format_table([row], COLUMNS), flush=True)

    model = build_model(impl, shape, device=device, dtype=dtype, seed=args.seed)
    payload["params"]["dense"] = count_params(model)
    if "dense" in providers:
        attempt("dense", 1.0, lambda m=model: train(m, impl, "dense", args, ids, cuda))
        free_memory(cuda)
    if "mohd" in providers:
        attempt("mohd", args.density, lambda m=model: run_mohd(m, impl, args, ids, cuda))
        free_memory(cuda)
    del model
    free_memory(cuda)
    if "ideal" in providers:
        ideal = build_model(impl, shape, dim=width, device=device, dtype=dtype, seed=args.seed)
        payload["params"]["ideal"] = count_params(ideal)
        attempt("ideal", args.density, lambda: train(ideal, impl, "ideal", args, ids, cuda))
        del ideal
        free_memory(cuda)
    payload["table"] = format_table(rows, COLUMNS)
    write_json(out, payload)
    print(f"\ntraining step: {shape.name} (D {shape.dim}, {shape.layers} layers), {impl} model, {dtype}, "
          f"{args.batch} x {args.seq} tokens, delta {args.density}\n{payload['table']}")
    failed = report_problems(rows, lambda r: r["provider"])
    print(f"wrote {out}")
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
