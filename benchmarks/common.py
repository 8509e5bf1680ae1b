"""Shared benchmark plumbing: environment record, timing, table and JSON output.

Timing on CUDA is `triton.testing.do_bench` (median, L2 flushed between runs by do_bench) or, for
decode, `do_bench_cudagraph` (median over CUDA-graph replays, which removes launch overhead as a
served decode step would). On CPU (the --smoke mode) it is a plain wall-clock median.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

# Measured H100 SXM ceilings (shared/notes/kernel-anchors.md §3): the denominators for "% of ceiling".
COPY_TBPS = 3.0
BF16_TFLOPS = 700.0


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.CalledProcessError) as err:
        # A copy of the tree without .git (the GPU machines): gpu_session.sh passes the sha in MOHD_GIT_SHA.
        given = os.environ.get("MOHD_GIT_SHA")
        return f"{given} (from MOHD_GIT_SHA)" if given else f"unknown ({err.__class__.__name__})"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=Path(__file__).resolve().parent).stdout.strip()
    return out.stdout.strip() + ("-dirty" if dirty else "")


def environment() -> dict:
    import triton

    cuda = torch.cuda.is_available()
    return {
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_sha": git_sha(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ceilings": {"copy_tbps": COPY_TBPS, "bf16_tflops": BF16_TFLOPS, "source": "H100 SXM, measured"},
    }


def bench_ms(fn: Callable[[], object], *, device: str, graph: bool, reps: int) -> float:
    """Median milliseconds of one call of `fn`."""
    if device == "cuda":
        from triton.testing import do_bench, do_bench_cudagraph

        fn()   # compile / autotune outside the timed region
        torch.cuda.synchronize()
        if graph:
            return float(do_bench_cudagraph(fn, rep=reps, return_mode="median"))
        return float(do_bench(fn, warmup=25, rep=reps, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """`columns`: (key, header, format spec). Missing values print as '-'."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append([("-" if row.get(k) is None else format(row[k], f)) for k, _, f in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=False))


def report_problems(rows: list[dict], label) -> int:
    """Print every row's error and warning (`label(row)` names the row); 1 if any row failed."""
    for r in rows:
        for kind in ("error", "warning"):
            if r.get(kind):
                print(f"{kind.upper()} {label(r)}: {r[kind]}")
    return 1 if any(r.get("error") for r in rows) else 0


def run_provider(provider: str, delta, fn: Callable[[], dict]) -> dict:
    """One provider's row: what `fn` measured, or its error (with the traceback printed), so that the
    other providers still run; `delta` is recorded either way."""
    try:
        row = fn()
    except Exception as err:   # noqa: BLE001 - any failure becomes the row's error
        traceback.print_exc()
        row = {"provider": provider, "error": f"{type(err).__name__}: {err}"}
    row["delta"] = delta
    return row
