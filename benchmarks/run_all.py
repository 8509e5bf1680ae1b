"""Run every MoHD op benchmark in one call; print tables and write JSON into --out.

    python benchmarks/run_all.py --out results/h100           # on a GPU machine
    python benchmarks/run_all.py --dry-run                    # list cases, run nothing
    TRITON_INTERPRET=1 python benchmarks/run_all.py --smoke --out /tmp/smoke   # CPU plumbing check

Writes `<out>/mohd_ops.json` ({"env": ..., "args": ..., "results": [row, ...]}) and
`<out>/mohd_ops.txt` (the printed tables).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # run as a script: import the sibling modules

from bench_ops import PROVIDERS, issue_cases, parser, run_case, smoke_cases  # noqa: E402
from common import environment, format_table, write_json  # noqa: E402

COLUMNS = [("layer", "layer", ""), ("tokens", "T", "d"), ("delta", "delta", ".2f"), ("union", "union", ".2f"),
           ("provider", "provider", ""), ("ms", "ms", ".4f"), ("tbps", "TB/s", ".2f"), ("tflops", "TFLOP/s", ".0f"),
           ("frac_ceiling", "of ceiling", ".0%"), ("speedup_vs_dense", "vs dense", ".2f"),
           ("rel_err_vs_naive", "err vs naive", ".1e")]


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    only = {p.strip() for p in args.providers.split(",") if p.strip()}
    unknown = only - set(PROVIDERS)
    if unknown:
        parser().error(f"--providers: unknown {sorted(unknown)}; choose from {list(PROVIDERS)}")
    import torch

    cases = smoke_cases() if args.smoke else issue_cases()
    cases = [c for c in cases if args.phase in ("all", c.phase)]
    if args.dry_run:
        for c in cases:
            print(f"{c.phase:8s} {c.layer.name:13s} {c.layer.kind:5s} T={c.tokens:<5d} D={c.dim} "
                  f"inner={c.layer.inner:<6d} N={c.groups} delta={c.delta} providers={sorted(only)}")
        return 0
    if args.smoke:
        device, dtype = "cpu", torch.float32
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--smoke runs the Triton kernels on CPU: set TRITON_INTERPRET=1", file=sys.stderr)
            return 2
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --smoke (with TRITON_INTERPRET=1) or --dry-run on CPU", file=sys.stderr)
            return 2
        device, dtype = "cuda", torch.bfloat16
    compile_ref = not args.no_compile and not args.smoke
    rows = []
    for case in cases:
        case_rows = run_case(case, device, dtype, args.reps, only, compile_ref)
        rows += case_rows
        print(format_table(case_rows, COLUMNS) + "\n", flush=True)
    out = Path(args.out)
    env = environment()
    write_json(out / "mohd_ops.json", {"env": env, "args": vars(args), "dtype": str(dtype), "results": rows})
    header = "  ".join(f"{k}={v}" for k, v in env.items() if k != "ceilings")
    (out / "mohd_ops.txt").write_text(header + "\n\n" + format_table(rows, COLUMNS) + "\n")
    print(f"wrote {out / 'mohd_ops.json'} and {out / 'mohd_ops.txt'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
