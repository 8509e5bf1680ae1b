"""The tuned experiments (issue 13): each model at its own best learning rate.

    r1-tuned       dense D=128, MoHD D=128 at delta 0.5 (16 groups, 4 shared, top-4), dense D=64 (same activated
                   reader/writer parameters as the MoHD model); 2000 steps (about one epoch of the KJV split).
    r2-controlled  MoHD D=256 (mohdify.expand_config x2) at delta 0.5 and dense D=256 with the same inner widths
                   (the same total parameters but the routers); 2000 steps; compared with r1-tuned's dense D=128.
    r3-tuned       the MoHD D=128 baseline and its three closest variants (32 groups / 8 shared / top-8, norm
                   scaling, fusion mix), 1000 steps, at the best rate of r1-tuned's MoHD model, 3 seeds.

A swept model first trains with seed 0 at the rates FIRST; while its best rate sits at an edge of the rates tried,
the next rate of LADDER beyond that edge is added (a factor 2 apart); once the best is bracketed (or the ladder
ends), seeds 1 and 2 train at it. Run names carry the rate and the seed: `dense-d128-lr0.003-s0`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

LADDER = (3.75e-4, 7.5e-4, 1.5e-3, 3e-3, 6e-3, 1.2e-2, 2.4e-2)
FIRST = (1.5e-3, 3e-3, 6e-3)
SEEDS = (0, 1, 2)
MOHD = ("--mohd", "--groups", "16", "--shared", "4", "--top-k", "4")


@dataclass(frozen=True)
class Model:
    exp: str                                  # results folder
    prefix: str                               # run name prefix
    args: tuple = ()                          # train_lm arguments besides steps, lr, seed
    steps: int = 2000
    lr_from: tuple[str, str] | None = None    # (exp, prefix) whose best rate this model uses (no sweep)
    first: tuple | None = None                # its first rates, when not FIRST (the runner's --lrs)
    extra: dict = field(default_factory=dict, hash=False, compare=False)


MODELS = (
    Model("r1-tuned", "dense-d128"),
    Model("r1-tuned", "mohd-d128-delta0.5", MOHD),
    Model("r1-tuned", "dense-d64", ("--hidden", "64")),
    Model("r2-controlled", "dense-d256", ("--hidden", "256")),
    # started from two rates (runner --lrs 0.0015 0.003): after them its best sat at the lower edge, so the
    # sweep went down (7.5e-4) and 6e-3 was not run
    Model("r2-controlled", "mohd-d256-x2-delta0.5", MOHD + ("--expand", "2"), first=(1.5e-3, 3e-3)),
    *(Model("r3-tuned", name, args, 1000, ("r1-tuned", "mohd-d128-delta0.5")) for name, args in (
        ("baseline", MOHD),
        ("groups32-shared8-top8", ("--mohd", "--groups", "32", "--shared", "8", "--top-k", "8")),
        ("scaling-norm", MOHD + ("--scaling", "norm")),
        ("fusion-mix", MOHD + ("--fusion", "mix")))),
)
EXPERIMENTS = tuple(dict.fromkeys(m.exp for m in MODELS))


def run_name(prefix: str, lr: float, seed: int) -> str:
    return f"{prefix}-lr{lr:g}-s{seed}"


def model(exp: str, prefix: str) -> Model:
    return next(m for m in MODELS if (m.exp, m.prefix) == (exp, prefix))


def sweep_state(results: Path, m: Model, done=None, first=FIRST) -> tuple[dict, float | None, list[float]]:
    """({rate: final val bpb} of the seed-0 runs done, the best rate once bracketed (else None), the seed-0
    rates to run next). `done(exp, name)` -> metrics dict or None; default: read <results>/<exp>/<name>.json."""
    done = done or (lambda exp, name: _read(results / exp / f"{name}.json"))
    tried = {lr: r["final_val_bpb"] for lr in LADDER if (r := done(m.exp, run_name(m.prefix, lr, 0))) is not None}
    todo = [lr for lr in (m.first or first) if lr not in tried]
    if todo:
        return tried, None, todo
    best = min(tried, key=tried.get)
    i = LADDER.index(best)
    if best == max(tried) and i + 1 < len(LADDER):
        return tried, None, [LADDER[i + 1]]
    if best == min(tried) and i > 0:
        return tried, None, [LADDER[i - 1]]
    return tried, best, []


def best_rate(results: Path, m: Model, done=None, first=FIRST) -> float | None:
    if m.lr_from:
        m = model(*m.lr_from)
    return sweep_state(results, m, done, first)[1]


def wanted(results: Path, done=None, first=FIRST, only=EXPERIMENTS) -> list[tuple[str, str, list[str], int]]:
    """Runs (exp, name, train_lm arguments, steps) that can start now, in priority order: the r1 sweeps, r1 seeds,
    r2 sweeps, r2 seeds, r3. Runs waiting for a decision (a best rate not known yet) are not listed."""
    done = done or (lambda exp, name: _read(results / exp / f"{name}.json"))
    out = []
    for exp in only:
        sweeps, seeds = [], []
        for m in (m for m in MODELS if m.exp == exp):
            if m.lr_from is None:
                _, best, todo = sweep_state(results, m, done, first)
                sweeps += [(m, lr, 0) for lr in todo]
                seeds += [(m, best, s) for s in SEEDS if s and best is not None]
            elif (best := best_rate(results, m, done, first)) is not None:
                seeds += [(m, best, s) for s in SEEDS]
        for m, lr, s in sweeps + seeds:
            name = run_name(m.prefix, lr, s)
            if done(m.exp, name) is None:
                out.append((m.exp, name, list(m.args) + ["--lr", f"{lr:g}", "--seed", str(s)], m.steps))
    return out


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
