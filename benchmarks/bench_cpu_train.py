"""CPU training step: dense (eager / inductor) vs MoHD (eager / backend "mohd"), providers interleaved.

    python benchmarks/bench_cpu_train.py --shape d512 --threads 2 --out benchmarks/results/cpu
    python benchmarks/bench_cpu_train.py --shape lm128 --threads 1 --out benchmarks/results/cpu
    python benchmarks/bench_cpu_train.py --smoke --out /tmp/cpu_train

One step = forward of HF `LlamaForCausalLM` (random weights), next-token cross-entropy, plus
`mohdify.aux_loss` (the balance loss) for MoHD, backward, AdamW step. Shapes:
  d512   D 512, 4 layers, FFN 1408, 8 heads of 64, vocab 8192, 8 x 256 tokens (issue 12's target shape)
  lm128  examples/train_lm.py's default model: D 128, 4 layers, FFN 352, 4 heads of 32, vocab 256,
         16 x 128 tokens
MoHD: `mohdify.mohdify` on a copy of the dense model (same weights), MoHDConfig(num_groups=16, half
of the delta * 16 active groups shared, learned router drawn N(0, 1/D)). Providers, all in one
process and interleaved per round (each round runs one step of each, in turn):
  dense_eager, dense_inductor (torch.compile(loss)), mohd_eager, mohd_backend (torch.compile(loss,
  backend="mohd"): inductor around the MoHD ops, whose CPU kernels run forward and backward).
Each provider has its own AdamW; lr 0 so every step does the same work from the same weights.
Figures: median over rounds of the per-round ratio best-dense time / provider time, and the
headline "best MoHD / best dense" (best of eager / compiled on each side). The path counts of the last
round (codegen/cpu/backward.PATHS: kernel backward paths, and "read:masked" / "write:masked" for the
modules' masked path, codegen/cpu/masked.py, counted per eager call; a compiled step that traced
nothing and called no kernel records none) are recorded per provider.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # run as a script: import the sibling modules

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import environment, format_table, write_json  # noqa: E402
from e2e_models import Shape, build_model, mohd_config, randomise_routers  # noqa: E402

import mohdify  # noqa: E402
from mohdify.codegen.cpu.backward import PATHS  # noqa: E402

SHAPES = {
    "d512": (Shape("d512", dim=512, layers=4, ffn=1408, heads=8, kv_heads=8, vocab=8192), 8, 256),
    "lm128": (Shape("lm128", dim=128, layers=4, ffn=352, heads=4, kv_heads=4, vocab=256), 16, 128),
    "smoke": (Shape("smoke", dim=64, layers=2, ffn=96, heads=4, kv_heads=2, vocab=128), 2, 32),
}
PROVIDERS = ("dense_eager", "dense_inductor", "mohd_eager", "mohd_backend")
COLUMNS = [("provider", "provider", ""), ("delta", "delta", ".2f"), ("ms", "ms/step", ".1f"),
           ("vs_best_dense", "vs best dense", ".3f"), ("warmup_s", "warm-up s", ".1f"), ("loss0", "loss[0]", ".4f")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="d512")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", required=True)
    return p


def make_step(model, provider: str, ids: torch.Tensor):
    mohd = provider.startswith("mohd")

    def loss_fn(ids):
        logits = model(input_ids=ids, use_cache=False).logits                 # [B, S, V]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())

    if provider == "dense_inductor":
        loss_fn = torch.compile(loss_fn, fullgraph=True)
    elif provider == "mohd_backend":
        loss_fn = torch.compile(loss_fn, backend="mohd", fullgraph=True)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)
    model.train()

    def step() -> float:
        loss = loss_fn(ids)
        total = loss + mohdify.aux_loss(model) if mohd else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return loss.item()
    return step


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.smoke:
        args.shape, args.rounds, args.warmup = "smoke", 2, 1
    torch.set_num_threads(args.threads)
    shape, batch, seq = SHAPES[args.shape]
    providers = [p for p in args.providers.split(",") if p]
    dense = build_model("hf", shape, device="cpu", dtype=torch.float32, seed=args.seed)
    ids = torch.randint(0, shape.vocab, (batch, seq + 1), generator=torch.Generator().manual_seed(args.seed))
    mohd = copy.deepcopy(dense)
    groups = 4 if args.smoke else 16
    config = mohd_config(args.density, groups, "learned")
    mohdify.mohdify(mohd, config, example_inputs={"input_ids": ids[:1, :8]})
    randomise_routers(mohd, 1 / math.sqrt(shape.dim), args.seed + 1)
    models = {p: (mohd if p.startswith("mohd") else dense) for p in providers}
    steps, warm, paths, loss0 = {}, {}, {}, {}
    for p in providers:   # warm-up (compiles)
        steps[p] = make_step(models[p], p, ids)
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            loss0[p] = steps[p]()
        warm[p] = time.perf_counter() - t0
    times = {p: [] for p in providers}
    for _ in range(args.rounds):
        for p in providers:
            PATHS.clear()
            t0 = time.perf_counter()
            steps[p]()
            times[p].append(time.perf_counter() - t0)
            paths[p] = dict(PATHS)
    dense_ps = [p for p in providers if p.startswith("dense")]
    best_dense = [min(times[p][i] for p in dense_ps) for i in range(args.rounds)] if dense_ps else None
    rows = []
    for p in providers:
        row = {"provider": p, "delta": args.density if p.startswith("mohd") else 1.0,
               "ms": 1e3 * statistics.median(times[p]), "times_s": times[p], "warmup_s": warm[p],
               "loss0": loss0[p], "backward_paths": paths[p]}
        if best_dense:
            row["vs_best_dense"] = statistics.median(d / t for d, t in zip(best_dense, times[p]))
        rows.append(row)
    mohd_ps = [p for p in providers if p.startswith("mohd")]
    headline = None
    if best_dense and mohd_ps:
        best_mohd = [min(times[p][i] for p in mohd_ps) for i in range(args.rounds)]
        headline = statistics.median(d / m for d, m in zip(best_dense, best_mohd))
    table = format_table(rows, COLUMNS)
    out = Path(args.out) / f"cpu_train_{args.shape}_d{args.density}_t{args.threads}.json"
    write_json(out, {"env": environment(), "args": vars(args), "shape": shape.to_dict(), "batch": batch,
                     "seq": seq, "mohd_config": config.to_dict(), "rows": rows,
                     "best_mohd_over_best_dense": headline, "table": table})
    print(f"training step, {args.shape}, {batch} x {seq} tokens, delta {args.density}, {args.threads} threads, "
          f"torch {torch.__version__}\n{table}\nbest MoHD / best dense: "
          f"{'-' if headline is None else f'{headline:.3f}x'}\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
