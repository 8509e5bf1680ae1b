"""Run the training experiments R1-R3 of docs/RESULTS.md, one JSON per run, skipping runs whose JSON exists.

    python experiments/run_research.py --jobs 2                 # everything, in priority order, resumable
    python experiments/run_research.py --only r1 --seeds 0      # a subset
    python experiments/run_research.py --list                   # what would run
    python experiments/summarize.py                             # tables and plots from the JSONs

Each run is `examples/train_lm.py` in its own process (1 thread), writing docs/results/<experiment>/<run>.json
(+ .png); its log goes to --logs. A run interrupted keeps its checkpoint (<run>.ckpt) and resumes from it.

R1 compression: dense D=128; MoHD at delta 0.5 (16 groups, 4 shared, top-4); dense D=64 with the same inner
   widths (heads x head_dim, FFN), i.e. the same activated reader/writer parameters per token as the MoHD model.
R2 expansion: MoHD at D=256 (mohdify.expand_config x2) at density 1/2 (16 groups, 4 shared, top-4) vs dense
   D=128 (the R1 dense runs): same activated reader/writer parameters per token.
R3 ablations at D=128, density 0.5, one seed; the baseline is R1's MoHD run with seed 0.
R4 (activation flow, experiments/flow_r4.py) and R5 (MiniLM conversion, examples/convert_minilm.py; r5m: the same
   at delta 0.75 fine-tuned with the magnitude router) run in this process when named in --only
   (`--only r4 r5 r5m`), so that pausing `run_research` pauses them too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
STEPS = 500
MOHD = ["--mohd", "--groups", "16", "--shared", "4", "--top-k", "4"]

R3 = {
    "router-magnitude": MOHD + ["--router", "magnitude"],
    "scaling-density": MOHD + ["--scaling", "density"],
    "scaling-norm": MOHD + ["--scaling", "norm"],
    "fusion-mix": MOHD + ["--fusion", "mix"],
    "shared0-top8": ["--mohd", "--groups", "16", "--shared", "0", "--top-k", "8"],
    "shared6-top2": ["--mohd", "--groups", "16", "--shared", "6", "--top-k", "2"],
    "groups8-shared2-top2": ["--mohd", "--groups", "8", "--shared", "2", "--top-k", "2"],
    "groups32-shared8-top8": ["--mohd", "--groups", "32", "--shared", "8", "--top-k", "8"],
}


def runs(seeds=(0, 1, 2)) -> list[tuple[str, str, list[str]]]:
    """(experiment, run name, train_lm arguments) in priority order: R1 and R2 seed 0, R1 seed 1, R3 (seed 0),
    then R1 seed 2 and R2 seeds 1-2 (on a shared 2-core machine the ablations come before the third seed)."""
    def r1(s):
        return [("r1", f"dense-d128-s{s}", ["--seed", str(s)]),
                ("r1", f"mohd-d128-delta0.5-s{s}", MOHD + ["--seed", str(s)]),
                ("r1", f"dense-d64-s{s}", ["--hidden", "64", "--seed", str(s)])]

    def r2(s):
        return [("r2", f"mohd-d256-x2-delta0.5-s{s}", MOHD + ["--expand", "2", "--seed", str(s)])]

    out = []
    if 0 in seeds:
        out += r1(0) + r2(0)
    if 1 in seeds:
        out += r1(1)
    if 0 in seeds:
        out += [("r3", name, extra + ["--seed", "0"]) for name, extra in R3.items()]
    out += [r for s in seeds if s > 1 for r in r1(s)] + [r for s in seeds if s > 0 for r in r2(s)]
    return out


def lock_owner(exp: str, name: str) -> int | None:
    """The pid of a live process that runs this run (from <run>.lock), or None."""
    lock = RESULTS / exp / f"{name}.lock"
    try:
        pid = int(lock.read_text().strip())
        if pid <= 0:
            return None
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def command(exp: str, name: str, extra: list[str], steps: int) -> list[str]:
    out = RESULTS / exp / f"{name}.json"
    return [sys.executable, str(ROOT / "examples" / "train_lm.py"), "--steps", str(steps), "--out", str(out),
            "--no-progress", "--threads", "1", "--keep-checkpoint"] + extra


def in_process(exp: str, list_only: bool) -> None:
    out = {"r5": RESULTS / "r5" / "minilm.json", "r5m": RESULTS / "r5" / "minilm-magnitude.json",
           "r4": RESULTS / "r4" / "r4.json"}[exp]
    print(f"{exp}: {'done (skipped)' if out.exists() else 'pending'}", flush=True)
    if out.exists() or list_only:
        return
    sys.path.insert(0, str(ROOT / "examples"))
    sys.path.insert(0, str(ROOT / "experiments"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if exp in ("r5", "r5m"):
        import convert_minilm
        extra = ["--densities", "0.75", "--routers", "magnitude"] if exp == "r5m" else []
        sys.argv = ["examples/convert_minilm.py", "--out", str(out.relative_to(ROOT))] + extra
        convert_minilm.main(sys.argv[1:])
    else:
        import flow_r4
        sys.argv = ["experiments/flow_r4.py"]
        flow_r4.main([])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", default=None, help="experiments to run (r1 r2 r3)")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    p.add_argument("--logs", type=Path, default=Path(os.environ.get("MOHD_LOGS", "/tmp/mohdify-research-logs")))
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    for exp in ("r5", "r5m", "r4"):
        if args.only is not None and exp in args.only:
            in_process(exp, args.list)
    todo = [r for r in runs(tuple(args.seeds)) if args.only is None or r[0] in args.only]
    pending = [r for r in todo if not (RESULTS / r[0] / f"{r[1]}.json").exists()]
    # runs started by another runner and still alive: count them against --jobs, never start them twice
    elsewhere = {r[:2]: lock_owner(*r[:2]) for r in pending if lock_owner(*r[:2])}
    pending = [r for r in pending if r[:2] not in elsewhere]
    for exp, name, extra in todo:
        state = ("pending" if (exp, name, extra) in pending else
                 f"running elsewhere (pid {elsewhere[(exp, name)]})" if (exp, name) in elsewhere else "done (skipped)")
        print(f"{exp}/{name}: {state}", flush=True)
    if args.list:
        return
    args.logs.mkdir(parents=True, exist_ok=True)
    running: list[tuple[subprocess.Popen, str]] = []
    failed = []
    while pending or running:
        elsewhere = {k: pid for k, pid in elsewhere.items() if lock_owner(*k)}
        while pending and len(running) + len(elsewhere) < args.jobs:
            exp, name, extra = pending.pop(0)
            (RESULTS / exp).mkdir(parents=True, exist_ok=True)
            log = open(args.logs / f"{exp}-{name}.log", "a")
            proc = subprocess.Popen(command(exp, name, extra, args.steps), stdout=log, stderr=subprocess.STDOUT,
                                    cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
            (RESULTS / exp / f"{name}.lock").write_text(str(proc.pid))
            running.append((proc, f"{exp}/{name}"))
            print(f"started {exp}/{name} (pid {proc.pid})", flush=True)
        time.sleep(2)
        for proc, label in list(running):
            if proc.poll() is not None:
                running.remove((proc, label))
                (RESULTS / f"{label}.lock").unlink(missing_ok=True)
                print(f"finished {label}: exit {proc.returncode}", flush=True)
                if proc.returncode:
                    failed.append(label)
    if failed:
        sys.exit(f"failed runs: {failed} (see their logs in {args.logs})")


if __name__ == "__main__":
    main()
