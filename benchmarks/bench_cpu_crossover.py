"""CPU crossover of the grouped and the dense path for many tokens (prefill, training), forward and backward.

    python benchmarks/bench_cpu_crossover.py --threads 2 --out benchmarks/results/cpu     # minutes
    python benchmarks/bench_cpu_crossover.py --smoke --out /tmp/xover                     # seconds

For each model width D (N = 16 groups of G = D / 16; FFN width F), token count T and density delta
(half of the active groups shared, the rest drawn at random per token), it times, interleaved per
round, the MoHD ops with the path forced to "grouped" and to "dense" (the dense-equivalent path of
codegen/cpu: a masked dense matmul), and plain dense F.linear / its two backward matmuls:
  read            mohdify::read, reader D -> F (gate / up); read_multi is read per weight (same path)
  write           mohdify::write, writer F -> D; write_add is write + the residual add (same path)
  read_backward   mohdify::read_backward (grad_x, grad_w, grad_alpha)
  write_backward  mohdify::write_backward (grad_u, grad_w, grad_gates)
A figure is the median over rounds of dense-path time / grouped-path time ("grouped x"; > 1: grouped
pays) and of plain-linear time / the path the dispatch picks ("chosen x"). The dispatch table is
codegen/cpu/crossover.py; this script prints the rows that table should hold.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # run as a script: import the sibling modules

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from common import environment, format_table, write_json  # noqa: E402

import mohdify.codegen  # noqa: E402,F401  (registers torch.ops.mohdify.*)
from mohdify.codegen.cpu import crossover  # noqa: E402
from mohdify.codegen.cpu.plan import plan_groups  # noqa: E402

OPS = torch.ops.mohdify
WIDTHS = {128: 352, 512: 1408, 1024: 2816, 2048: 5632}
KINDS = ("read", "write", "read_backward", "write_backward")
COLUMNS = [("dim", "D", "d"), ("group_size", "G", "d"), ("kind", "op", ""), ("tokens", "T", "d"),
           ("delta", "delta", ".2f"), ("linear_ms", "linear ms", ".2f"), ("dense_ms", "dense ms", ".2f"),
           ("grouped_ms", "grouped ms", ".2f"), ("grouped_x", "grouped x", ".2f"), ("chosen", "chosen", ""),
           ("chosen_x", "chosen x", ".2f")]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dims", default="512,2048")
    p.add_argument("--tokens", default="128,512,2048,8192")
    p.add_argument("--deltas", default="0.25,0.5,0.75")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-seconds", type=float, default=270.0, help="stop adding rows after this long")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--out", required=True)
    return p


def routing(tokens: int, groups: int, delta: float, gen: torch.Generator) -> torch.Tensor:
    """`[T, N]` bool: half of delta * N groups shared (0..), the rest random per token."""
    active = round(delta * groups)
    shared = active // 2
    mask = torch.zeros(tokens, groups, dtype=torch.bool)
    mask[:, :shared] = True
    routed = torch.rand(tokens, groups - shared, generator=gen).argsort(1)[:, :active - shared] + shared
    return mask.scatter_(1, routed, True)


def case(kind: str, dim: int, tokens: int, delta: float, dtype: torch.dtype, gen: torch.Generator):
    """(op call, plain-linear call, plan kind, active mask) for one row."""
    ffn, groups = WIDTHS[dim], 16
    mask = routing(tokens, groups, delta, gen)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)   # noqa: E731
    if kind.startswith("read"):
        x, w = r(tokens, dim), (r(ffn, dim) / math.sqrt(dim)).t().contiguous().t()   # column-major reader
        if kind == "read":
            return (lambda: OPS.read(x, w, None, mask, None)), (lambda: F.linear(x, w)), mask
        g = r(tokens, ffn)
        return (lambda: OPS.read_backward(g, x, w, False, mask, None)), (lambda: (g @ w, g.t() @ x)), mask
    u, w = r(tokens, ffn), r(dim, ffn) / math.sqrt(ffn)
    gates = mask.to(dtype) * (torch.rand(tokens, groups, generator=gen) + 0.5).to(dtype)
    if kind == "write":
        return (lambda: OPS.write(u, w, None, gates, None)), (lambda: F.linear(u, w)), mask
    g = r(tokens, dim)
    return (lambda: OPS.write_backward(g, u, w, None, gates, None, True)), (lambda: (g @ w, g.t() @ u)), mask


def forced(kind: str, dtype: torch.dtype, path: str):
    """Context: the crossover tables (torch loops and native kernels) set so that `kind` always
    (grouped) or never (dense) groups."""
    tables = (crossover.GROUPED_WHEN, crossover.GROUPED_WHEN_NATIVE)

    class Force:
        def __enter__(self):
            self.saved = [dict(t) for t in tables]
            for t in tables:
                t[(kind, dtype)] = [(0, 0, 1 << 62, 1.0)] if path == "grouped" else []

        def __exit__(self, *exc):
            for t, saved in zip(tables, self.saved):
                t.clear()
                t.update(saved)
    return Force()


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(kind: str, dim: int, tokens: int, delta: float, dtype: torch.dtype, rounds: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    op, linear, mask = case(kind, dim, tokens, delta, dtype, gen)
    base = kind.split("_")[0] if kind.endswith("backward") else kind
    chosen = plan_groups(mask, dtype, kind, dim // 16).path
    times = {"linear": [], "dense": [], "grouped": []}
    for i in range(rounds + 1):
        for name in times:
            if name == "linear":
                t = timed(linear)
            else:
                with forced(kind, dtype, name):
                    t = timed(op)
            if i:   # round 0 warms up
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = lambda a, b: statistics.median(x / y for x, y in zip(times[a], times[b]))   # noqa: E731
    return {"dim": dim, "group_size": dim // 16, "kind": kind, "base": base, "tokens": tokens, "delta": delta,
            "dtype": str(dtype), "linear_ms": 1e3 * med["linear"], "dense_ms": 1e3 * med["dense"],
            "grouped_ms": 1e3 * med["grouped"], "grouped_x": ratio("dense", "grouped"), "chosen": chosen,
            "chosen_x": ratio("linear", "grouped" if chosen == "grouped" else "dense"),
            "dense_x": ratio("linear", "dense")}


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.smoke:
        args.dims, args.tokens, args.rounds = "128", "32,64", 2
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    rows, start = [], time.time()
    for dim in (int(d) for d in args.dims.split(",")):
        for tokens in (int(t) for t in args.tokens.split(",")):
            for delta in (float(d) for d in args.deltas.split(",")):
                for kind in args.kinds.split(","):
                    if time.time() - start > args.max_seconds:
                        print(f"stopped after {args.max_seconds:.0f} s", file=sys.stderr)
                        break
                    rows.append(measure(kind, dim, tokens, delta, dtype, args.rounds, seed=len(rows)))
                    print(format_table(rows[-1:], COLUMNS), flush=True)
    out = Path(args.out) / f"cpu_crossover_{args.dtype}.json"
    write_json(out, {"env": environment(), "threads": args.threads, "args": vars(args), "rows": rows,
                     "table": format_table(rows, COLUMNS)})
    print(format_table(rows, COLUMNS))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
