"""CPU routing cost at decode: one branch's routing (router, top-k, gates, scale) against the
MoHD ops of an MLP branch it serves (gate|up read_multi + down write, D 2048 x FFN 5632).

    python benchmarks/bench_cpu_routing.py --out results/cpu

Routing is `MoHDBranch.route` (mohdify/modules.py), the code a mohdified model runs eagerly:
magnitude or learned router, scaling none / density / norm, N = 16 groups at delta 0.5 and 0.25.
Each round times every variant in turn (interleaved); figures are medians over rounds, in
microseconds per token, with the branch's kernel time (weights cycled past the cache) beside them.
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
from common import format_table, git_sha, write_json  # noqa: E402

COLUMNS = [("what", "what", ""), ("delta", "delta", ".2f"), ("us", "us / token", ".1f"),
           ("frac_of_branch", "of branch ops", ".1%")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--ffn", type=int, default=5632)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=200, help="routing calls per round")
    p.add_argument("--copies", type=int, default=8, help="weight copies the branch ops cycle over")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from mohdify import MoHDConfig
    from mohdify.modules import MoHDBranch

    gen = torch.Generator().manual_seed(0)
    dim, ffn = args.dim, args.ffn
    x = torch.randn(1, dim, generator=gen)                                    # [T, D]
    rows = []
    for delta in (0.5, 0.25):
        active = round(16 * delta)
        fns = {}
        for router in ("magnitude", "learned"):
            for scaling in ("none", "density", "norm"):
                cfg = MoHDConfig(num_groups=16, num_shared=active // 2, top_k=active - active // 2, router=router,
                                 scaling=scaling)
                branch = MoHDBranch(dim, cfg)
                if branch.router is not None:
                    with torch.no_grad():
                        branch.router.normal_(0, 1 / math.sqrt(dim), generator=gen)

                def route(b=branch):
                    with torch.no_grad():
                        for _ in range(args.calls):
                            b.route(x)
                    return args.calls
                fns[f"route {router}/{scaling}"] = route
        ups = [(torch.randn(ffn, dim, generator=gen) / math.sqrt(dim)).t().contiguous().t() for _ in range(args.copies)]
        gates_w = [(torch.randn(ffn, dim, generator=gen) / math.sqrt(dim)).t().contiguous().t()
                   for _ in range(args.copies)]
        downs = [torch.randn(dim, ffn, generator=gen) / math.sqrt(ffn) for _ in range(args.copies)]
        mask = torch.zeros(1, 16, dtype=torch.bool)
        mask[0, :active // 2] = True
        mask[0, torch.randperm(16 - active // 2, generator=gen)[:active - active // 2] + active // 2] = True
        u = torch.randn(1, ffn, generator=gen)

        def branch_ops(gates_w=gates_w, ups=ups, downs=downs, mask=mask, u=u):
            with torch.no_grad():
                for g, up, down in zip(gates_w, ups, downs):
                    torch.ops.mohdify.read_multi(x, [g, up], [None, None], mask, None)
                    torch.ops.mohdify.write(u, down, None, mask.float(), None)
            return args.copies
        fns["branch ops (kernel)"] = branch_ops
        times = {k: [] for k in fns}
        for fn in fns.values():
            fn()
        for _ in range(args.rounds):
            for k, fn in fns.items():
                start = time.perf_counter()
                n = fn()
                times[k].append((time.perf_counter() - start) / n * 1e6)
        branch_us = statistics.median(times["branch ops (kernel)"])
        for k, v in times.items():
            rows.append({"what": k, "delta": delta, "us": statistics.median(v),
                         "frac_of_branch": statistics.median(v) / branch_us})
    print(format_table(rows, COLUMNS))
    write_json(Path(args.out) / "cpu_routing.json", {"env": {"torch": torch.__version__, "threads":
                                                             torch.get_num_threads(), "git_sha": git_sha()},
                                                     "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
