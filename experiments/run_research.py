"""Run the training experiments of docs/RESULTS.md, one JSON per run, skipping runs whose JSON exists.

    python experiments/run_research.py --jobs 2 --results /work/results     # the tuned experiments, resumable
    python experiments/run_research.py --only r1-tuned --list              # what can start now, sweep states
    python experiments/run_research.py --only r1 --seeds 0                 # the first (untuned, 500-step) R1
    python experiments/run_research.py --results /tmp/fresh --jobs 2       # regenerate into a fresh folder
    python experiments/run_research.py --force ...                         # or rerun over the JSONs there
    python experiments/summarize.py --results /work/results                # tables, plots, claims.json

Each run is `examples/train_lm.py` in its own process (1 thread), writing <results>/<experiment>/<run>.json
(+ .png, + .ckpt: the final checkpoint is kept); its log goes to --logs. A run interrupted keeps its checkpoint
and resumes from it; a run another live runner holds (its .lock names a live pid) is not started twice.

Tuned experiments (experiments/tuned.py; the default): r1-tuned, r2-controlled, r3-tuned. Each swept model
trains with seed 0 at 1.5e-3, 3e-3 and 6e-3, more rates a factor 2 apart while its best sits at an edge, then
seeds 1 and 2 at its best rate; r3-tuned uses r1-tuned's MoHD best rate. The runner decides as results land.

The first experiments (history; all at 3e-3 for 500 steps), named with --only:
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tuned  # noqa: E402

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


def lock_owner(results: Path, exp: str, name: str) -> int | None:
    """The pid of a live process that runs this run (from <run>.lock), or None."""
    lock = results / exp / f"{name}.lock"
    try:
        pid = int(lock.read_text().strip())
        if pid <= 0:
            return None
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


def command(results: Path, exp: str, name: str, extra: list[str], steps: int) -> list[str]:
    out = results / exp / f"{name}.json"
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
    p.add_argument("--only", nargs="*", default=None,
                   help=f"experiments to run (default: the tuned ones, {' '.join(tuned.EXPERIMENTS)}; "
                        "also r1 r2 r3 r4 r5 r5m)")
    p.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2], help="seeds of r1 r2 r3 (the tuned: 0 1 2)")
    p.add_argument("--steps", type=int, default=None, help=f"override the steps (r1-r3: {STEPS}; tuned: per model)")
    p.add_argument("--lrs", nargs="*", type=float, default=list(tuned.FIRST), help="first rates of a sweep")
    p.add_argument("--results", type=Path, default=None, help="where the run JSONs go (default: docs/results)")
    p.add_argument("--force", action="store_true",
                   help="rerun runs whose JSON exists (old JSON and checkpoint removed)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (one thread each)")
    p.add_argument("--logs", type=Path, default=Path(os.environ.get("MOHD_LOGS", "/tmp/mohdify-research-logs")))
    p.add_argument("--list", action="store_true")
    args = p.parse_args()
    results = args.results or RESULTS
    only = args.only if args.only is not None else list(tuned.EXPERIMENTS)
    unknown = set(only) - set(tuned.EXPERIMENTS) - {"r1", "r2", "r3", "r4", "r5", "r5m"}
    if unknown:
        p.error(f"unknown experiments {sorted(unknown)}; known: {' '.join(tuned.EXPERIMENTS)} r1 r2 r3 r4 r5 r5m")
    for exp in ("r5", "r5m", "r4"):
        if exp in only:
            in_process(exp, args.list)
    finished_here: set = set()

    def done(exp, name):
        if args.force and (exp, name) not in finished_here:
            return None
        return tuned._read(results / exp / f"{name}.json")

    def todo():
        old = [(e, n, x, args.steps or STEPS) for e, n, x in runs(tuple(args.seeds))
               if e in only and done(e, n) is None]
        new = tuned.wanted(results, done, tuple(args.lrs), [e for e in tuned.EXPERIMENTS if e in only])
        return old + [(e, n, x, args.steps or s) for e, n, x, s in new]

    for e, n, _ in runs(tuple(args.seeds)):
        if e in only and done(e, n) is not None:
            print(f"{e}/{n}: done (skipped)", flush=True)
    show_state(results, only, done, tuple(args.lrs))
    run_all(args, results, todo, finished_here)


def show_state(results: Path, only: list[str], done, first) -> None:
    for m in tuned.MODELS:
        if m.exp in only and m.lr_from is None:
            tried, best, nxt = tuned.sweep_state(results, m, done, first)
            vals = ", ".join(f"{lr:g}: {v:.4f}" for lr, v in sorted(tried.items()))
            print(f"{m.exp}/{m.prefix}: seed 0 at {{{vals}}}; best {best if best is None else f'{best:g}'}; "
                  f"next {[f'{x:g}' for x in nxt]}", flush=True)


def run_all(args, results: Path, todo, finished_here: set) -> None:
    """Start what `todo()` lists (recomputed as runs finish) up to --jobs at once; wait for all."""
    running: dict[tuple[str, str], subprocess.Popen] = {}
    failed: list[str] = []
    first = True
    while True:
        pending = [r for r in todo() if r[:2] not in running and f"{r[0]}/{r[1]}" not in failed]
        elsewhere = {r[:2]: pid for r in pending if (pid := lock_owner(results, *r[:2]))}
        pending = [r for r in pending if r[:2] not in elsewhere]
        if first:
            for exp, name, _, steps in pending:
                print(f"{exp}/{name}: pending ({steps} steps)", flush=True)
            for (exp, name), pid in elsewhere.items():
                print(f"{exp}/{name}: running elsewhere (pid {pid})", flush=True)
            first = False
            if args.list:
                return
            args.logs.mkdir(parents=True, exist_ok=True)
        while pending and len(running) + len(elsewhere) < args.jobs:
            exp, name, extra, steps = pending.pop(0)
            start(args, results, exp, name, extra, steps, running)
        if not running and not pending and not elsewhere:
            break
        time.sleep(5)
        for (exp, name), proc in list(running.items()):
            if proc.poll() is not None:
                del running[(exp, name)]
                (results / exp / f"{name}.lock").unlink(missing_ok=True)
                print(f"finished {exp}/{name}: exit {proc.returncode}", flush=True)
                if proc.returncode:
                    failed.append(f"{exp}/{name}")
                else:
                    finished_here.add((exp, name))
    if failed:
        sys.exit(f"failed runs: {failed} (see their logs in {args.logs})")


def start(args, results: Path, exp: str, name: str, extra: list[str], steps: int, running: dict) -> None:
    (results / exp).mkdir(parents=True, exist_ok=True)
    if args.force:
        for suffix in (".json", ".ckpt", ".png"):
            (results / exp / f"{name}{suffix}").unlink(missing_ok=True)
    log = open(args.logs / f"{exp}-{name}.log", "a")
    proc = subprocess.Popen(command(results, exp, name, extra, steps), stdout=log, stderr=subprocess.STDOUT,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    (results / exp / f"{name}.lock").write_text(str(proc.pid))
    running[(exp, name)] = proc
    print(f"started {exp}/{name} (pid {proc.pid})", flush=True)


if __name__ == "__main__":
    main()
