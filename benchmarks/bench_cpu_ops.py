"""CPU op benchmark: the MoHD reader and writer CPU kernels against dense, the ideal and the reference.

    python benchmarks/bench_cpu_ops.py --out results/cpu            # the issue's cases (minutes)
    python benchmarks/bench_cpu_ops.py --smoke --out /tmp/cpu_ops   # tiny shapes, seconds

Layers (issue 8): reader D -> FFN (gate / up) and writer FFN -> D, for D 2048 x FFN 5632 and
D 4096 x FFN 11008, N = 16 groups; T = 1, 4, 512; delta 0.5 and 0.25 (half of a token's active
groups shared, the rest drawn at random per token); fp32 and bf16. Providers:
  dense   F.linear with the full weight, nn.Linear's row-major layout: what MoHD must beat;
  ideal   F.linear with a dense weight cut to the active width (delta * D): the limit;
  ref     the reference op (read_naive / write_naive: masked dense);
  kernel  torch.ops.mohdify.read / write on CPU (codegen/cpu), reader weight column-major as
          mohdify lays it out at rewrite time.
Decode is bound by reading weights, so each provider cycles over enough copies of its weights
(--cycle-mb, default 1000 MB, twice the 480 MB L3 this machine reports) that the cache cannot
help: the ideal gets 1/delta as many (cut) copies, and the reference and the kernel draw new
routing per weight copy and per round, so the blocks they touch change as a decode's do. Each round times every
provider once, in turn (interleaved); a figure is the median over
rounds of the per-round ratio dense time / provider time. Targets (fp32, decode, delta 0.5 / 0.25):
kernel >= 1.7x / >= 3x dense; rows that miss say by how much.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # run as a script: import the sibling modules
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "examples"))   # provenance.cpu_name

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import format_table, git_sha, write_json  # noqa: E402
from provenance import cpu_name  # noqa: E402

SHAPES = {"d2048": (2048, 5632), "d4096": (4096, 11008)}
TARGETS = {0.5: 1.7, 0.25: 3.0}
GROUPS = 16
COLUMNS = [("shape", "shape", ""), ("kind", "kind", ""), ("dtype", "dtype", ""), ("tokens", "T", "d"),
           ("delta", "delta", ".2f"), ("path", "path", ""), ("dense_ms", "dense ms", ".3f"),
           ("ideal", "ideal x", ".2f"), ("ref", "ref x", ".2f"), ("kernel", "kernel x", ".2f"),
           ("of_ideal", "kernel/ideal", ".0%"), ("target", "target", ".1f"), ("miss", "missed by", "")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="d2048,d4096")
    p.add_argument("--kinds", default="read,write")
    p.add_argument("--tokens", default="1,4,512")
    p.add_argument("--deltas", default="0.5,0.25")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--cycle-mb", type=float, default=1000.0,
                   help="weight bytes dense cycles over at decode (the others: the same footprint)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, 2 rounds: a plumbing check")
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads (0: torch's default). On a shared 2-core machine 1 thread avoids "
                        "OpenMP barriers waiting on a core another process holds (codegen/README.md)")
    p.add_argument("--out", required=True)
    return p


def routing(tokens: int, delta: float, gen: torch.Generator) -> torch.Tensor:
    """`[T, N]` bool: half of the active groups shared (0..), the rest random per token."""
    active = round(delta * GROUPS)
    shared = active // 2
    chosen = torch.rand(tokens, GROUPS - shared, generator=gen).argsort(dim=1)[:, :active - shared] + shared
    mask = torch.zeros(tokens, GROUPS, dtype=torch.bool)
    mask[:, :shared] = True
    return mask.scatter_(1, chosen, True)


def time_rounds(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each provider, per round; providers interleaved within a round."""
    for fn in fns.values():
        fn()                                                                  # warm-up
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            calls = fn()
            times[name].append((time.perf_counter() - start) / calls)
    return times


def providers(kind: str, dim: int, ffn: int, tokens: int, delta: float, dtype, weights, ideal_copies: int,
              rounds: int, gen):
    """weights: (row-major copies, column-major copies) of the full weight. Routing is drawn per weight
    copy and per round (decode routing changes every token), so the kernel's touched blocks change
    and it cannot live in the cache; the ideal gets its own copies, as many as make its footprint
    that of dense. Each fn returns its number of layer calls."""
    from mohdify.codegen.read.naive import read_naive
    from mohdify.codegen.write.naive import write_naive

    rows, cols = weights
    masks = [[routing(tokens, delta, gen) for _ in rows] for _ in range(rounds + 1)]   # [T, N] each
    calls = {"ref": 0, "kernel": 0}

    def next_masks(name):
        calls[name] += 1
        return masks[(calls[name] - 1) % len(masks)]

    width = round(delta * dim)
    ops = torch.ops.mohdify
    if kind == "read":
        x = torch.randn(tokens, dim, generator=gen).to(dtype)                 # [T, D]
        x_cut = x[:, :width].contiguous()                                     # [T, delta D]
        cut = [(torch.randn(ffn, width, generator=gen) / math.sqrt(dim)).to(dtype) for _ in range(ideal_copies)]
        fns = {"dense": lambda: [F.linear(x, w) for w in rows] and len(rows),
               "ideal": lambda: [F.linear(x_cut, w) for w in cut] and len(cut),
               "ref": lambda: [read_naive(x, w, None, m, None) for w, m in zip(cols, next_masks("ref"))] and len(cols),
               "kernel": lambda: [ops.read(x, w, None, m, None) for w, m in zip(cols, next_masks("kernel"))]
               and len(cols)}
    else:
        u = torch.randn(tokens, ffn, generator=gen).to(dtype)                 # [T, I]
        gates = [[m.to(dtype) for m in ms] for ms in masks]                   # [T, N] each
        masks = gates
        cut = [(torch.randn(width, ffn, generator=gen) / math.sqrt(ffn)).to(dtype) for _ in range(ideal_copies)]
        fns = {"dense": lambda: [F.linear(u, w) for w in rows] and len(rows),
               "ideal": lambda: [F.linear(u, w) for w in cut] and len(cut),
               "ref": lambda: [write_naive(u, w, None, g, None) for w, g in zip(rows, next_masks("ref"))] and len(rows),
               "kernel": lambda: [ops.write(u, w, None, g, None) for w, g in zip(rows, next_masks("kernel"))]
               and len(rows)}
    return fns, masks[0][0] != 0


def run(args) -> list[dict]:
    import mohdify.codegen  # noqa: F401  (registers the ops)
    from mohdify.codegen.cpu.plan import plan_groups

    gen = torch.Generator().manual_seed(0)
    shapes = {"smoke": (256, 384)} if args.smoke else {k: SHAPES[k] for k in args.shapes.split(",")}
    rows_out = []
    for shape, (dim, ffn) in shapes.items():
        for kind in args.kinds.split(","):
            for dtype in (getattr(torch, d) for d in args.dtypes.split(",")):
                wshape = (ffn, dim) if kind == "read" else (dim, ffn)
                nbytes = math.prod(wshape) * dtype.itemsize
                copies = 1 if args.smoke else max(2, math.ceil(args.cycle_mb * 2**20 / nbytes))
                base = [(torch.randn(*wshape, generator=gen) / math.sqrt(wshape[1])).to(dtype) for _ in range(copies)]
                colmajor = [w.t().contiguous().t() for w in base] if kind == "read" else base
                for tokens in (int(t) for t in args.tokens.split(",")):
                    use = base if tokens <= 16 else base[:2]                  # prefill is compute-bound
                    use_c = colmajor if tokens <= 16 else colmajor[:2]
                    for delta in (float(d) for d in args.deltas.split(",")):
                        n_ideal = len(use) if tokens > 16 else max(2, math.ceil(len(use) / delta))
                        fns, mask = providers(kind, dim, ffn, tokens, delta, dtype, (use, use_c), n_ideal,
                                              2 if args.smoke else args.rounds, gen)
                        times = time_rounds(fns, 2 if args.smoke else args.rounds)
                        ratio = {k: statistics.median(d / t for d, t in zip(times["dense"], v))
                                 for k, v in times.items()}
                        row = {"shape": shape, "kind": kind, "dtype": str(dtype).replace("torch.", ""),
                               "tokens": tokens, "delta": delta, "D": dim, "FFN": ffn, "copies": len(use),
                               "path": plan_groups(mask, dtype, kind).path,
                               "union": mask.any(0).float().mean().item(),
                               "dense_ms": statistics.median(times["dense"]) * 1e3,
                               "ms": {k: statistics.median(v) * 1e3 for k, v in times.items()},
                               "ideal": ratio["ideal"], "ref": ratio["ref"], "kernel": ratio["kernel"],
                               "of_ideal": ratio["kernel"] / ratio["ideal"]}
                        if dtype == torch.float32 and tokens == 1 and delta in TARGETS:
                            row["target"] = TARGETS[delta]
                            gap = row["kernel"] / TARGETS[delta] - 1
                            row["miss"] = "met" if gap >= 0 else f"{-gap:.0%} short"
                        rows_out.append(row)
                        print(format_table([row], COLUMNS).splitlines()[-1], flush=True)
                del base, colmajor
    return rows_out


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(format_table([], COLUMNS))
    rows = run(args)
    print()
    print(format_table(rows, COLUMNS))
    env = {"loadavg_end": os.getloadavg(), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "git_sha": git_sha(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpu": cpu_name()}
    write_json(Path(args.out) / "cpu_ops.json", {"env": env, "args": vars(args), "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
