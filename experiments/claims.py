"""Tables of the tuned experiments (issue 13) and docs/results/claims.json, from the run JSONs under
docs/results/<experiment>/ (copied there from a runner's --results folder by `summarize.py --collect DIR`).

A claim: {"id", "statement", "value", "target", "met", "status", "sources"}; `met` is true only when every run the
claim needs exists and the target holds; "status" is "met", "not met" or "pending" (runs missing: the value then
says what exists). Sources are the run JSONs it rests on, relative to the repository.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import tuned

ROOT = Path(__file__).resolve().parents[1]
RESULTS_R1 = ROOT / "docs" / "results" / "r1-tuned"


def rel(path: Path) -> str:
    return str(path.resolve().relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def run(results: Path, exp: str, name: str) -> dict | None:
    return tuned._read(results / exp / f"{name}.json")


def condition(results: Path, m: tuned.Model) -> dict:
    """A model at its best rate: {"best", "tried", "runs" [(path, metrics)], "mean", "sd"}; best None while the
    sweep has not bracketed it."""
    tried, best, _ = tuned.sweep_state(results, tuned.model(*m.lr_from) if m.lr_from else m)
    runs = []
    if best is not None:
        for s in tuned.SEEDS:
            name = tuned.run_name(m.prefix, best, s)
            if (r := run(results, m.exp, name)) is not None:
                runs.append((results / m.exp / f"{name}.json", r))
    vals = [r["final_val_bpb"] for _, r in runs]
    return {"best": best, "tried": tried, "runs": runs, "mean": statistics.mean(vals) if vals else None,
            "sd": statistics.stdev(vals) if len(vals) > 1 else None}


def _short(runs) -> str:
    commits = sorted({(r.get("git_commit") or "?")[:7] + ("+dirty" if r.get("git_dirty") else "") for _, r in runs})
    return ", ".join(commits) or "-"


def sweep_table(results: Path, exp: str) -> str:
    models = [m for m in tuned.MODELS if m.exp == exp and m.lr_from is None]
    rates = sorted({lr for m in models for lr in tuned.sweep_state(results, m)[0]} | set(tuned.FIRST))
    rows = ["| model (seed 0) | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | best rate |",
            "|---|" + "---|" * (len(rates) + 1)]
    for m in models:
        tried, best, nxt = tuned.sweep_state(results, m)
        cells = [f"**{tried[lr]:.4f}**" if lr == best else (f"{tried[lr]:.4f}" if lr in tried else "-") for lr in rates]
        state = f"{best:g}" if best is not None else f"pending (next: {', '.join(f'{x:g}' for x in nxt)})"
        rows.append(f"| {m.prefix} | " + " | ".join(cells) + f" | {state} |")
    return "\n".join(rows)


def seeds_table(results: Path, exp: str, ref: tuple[str, str] | None) -> str:
    rows = ["| model | rate | seeds | val bits per byte | vs reference | activated params / token (head counted) | "
            "total params | commits |", "|---|---|---|---|---|---|---|---|"]
    base = condition(results, tuned.model(*ref))["mean"] if ref else None
    for m in (m for m in tuned.MODELS if m.exp == exp):
        c = condition(results, m)
        val = "-" if c["mean"] is None else (f"{c['mean']:.4f}" + (f" +- {c['sd']:.4f}" if c["sd"] else ""))
        vs = f"{(c['mean'] / base - 1) * 100:+.2f}%" if c["mean"] and base else "-"
        counts = c["runs"][0][1]["counts"] if c["runs"] else {}
        rate = f"{c['best']:g}" if c["best"] is not None else "pending"
        active, total = counts.get("active_params_per_token", "-"), counts.get("params", "-")
        rows.append(f"| {m.prefix} | {rate} | {len(c['runs'])} | {val} | {vs} | {active} | {total} | "
                    f"{_short(c['runs'])} |")
    return "\n".join(rows)


def conversion_rows(results: Path) -> list[tuple[Path, dict, dict]]:
    """(json path, file, row) of every MiniLM conversion row under r5-conv/ (and the first R5 runs in r5/)."""
    out = []
    for folder in ("r5", "r5-conv"):
        for path in sorted((results / folder).glob("*.json")):
            data = json.loads(path.read_text())
            out += [(path, data, r) for r in data.get("results", [])]
    return out


def conversion_table(results: Path) -> str:
    rows = ["| delta | method | rebasis | router | layer loss | lr | steps | CPU s | cosine mean (min) | source |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for path, data, r in conversion_rows(results):
        cond = data.get("conditions", {})
        lr = r.get("lr", cond.get("lr", "-")) if r["steps"] else "-"
        rows.append(f"| {r['density']} | {r['method']} | {r.get('rebasis', cond.get('rebasis', 'none'))} | "
                    f"{r['router']} | {r.get('layer_loss', '-')} | {lr} | {r['steps']} | {r.get('cpu_s', '-')} | "
                    f"{r['cosine_mean']:.4f} ({r['cosine_min']:.4f}) | "
                    f"{path.parent.name}/{path.name} |")
    return "\n".join(rows)


def causal_runs(results: Path) -> list[tuple[Path, dict]]:
    return [(p, json.loads(p.read_text())) for p in sorted((results / "r5-causal").glob("*.json"))]


def causal_table(results: Path) -> str:
    rows = ["| run | init (dense) | dense val bpb | delta | shared + top-k | lr | warmup | distill | other | steps | "
            "CPU s | step 0 | converted val bpb | vs dense |", "|" + "---|" * 14]
    for path, m in causal_runs(results):
        dense, a = _dense_of(m), m["args"]
        d = dense["final_val_bpb"] if dense else None
        step0 = next((h["val_bpb"] for h in m["history"] if h["step"] == 0), None)
        vs = f"{(m['final_val_bpb'] / d - 1) * 100:+.2f}%" if d else "-"
        rows.append(f"| {path.stem} | {Path(a['init']).stem} | {d if d else '-'} | {m['density']} | "
                    f"{a['shared']} + {a['top_k']} of {a['groups']} | {a['lr']:g} | {a['warmup']} | "
                    f"{a.get('distill', 0.0):g} | {_extras(a) or '-'} | {m['steps']} | {m.get('cpu_s') or '-'} | "
                    f"{step0} | "
                    f"{m['final_val_bpb']:.4f} | {vs} |")
    return "\n".join(rows) if len(rows) > 2 else "(no causal conversion run yet)"


# train_lm settings a conversion may change from their defaults, and how the table names them
_EXTRAS = (("distill_hidden", 0.0, "hidden {:g}"), ("scaling", "none", "scaling {}"), ("weight_decay", 0.1, "wd {:g}"),
           ("anneal", 0, "anneal {}"), ("final_lr", 0.1, "final lr {:g}"))


def _extras(a: dict) -> str:
    """The conversion's non-default settings beyond the table's columns, e.g. "hidden 1, wd 0"."""
    return ", ".join(fmt.format(a[k]) for k, default, fmt in _EXTRAS if a.get(k, default) != default)


def _dense_of(m: dict) -> dict | None:
    init = Path(m["args"]["init"])
    return (tuned._read(ROOT / "docs" / "results" / "r1-tuned" / f"{init.stem}.json")
            or tuned._read(init.with_suffix(".json")))


def _compare(results: Path, claim_id: str, statement: str, subject: tuple, ref: tuple, target: str) -> dict:
    a, b = condition(results, tuned.model(*subject)), condition(results, tuned.model(*ref))
    sources = [rel(p) for c in (a, b) for p, _ in c["runs"]]
    complete = all(c["best"] is not None and len(c["runs"]) == len(tuned.SEEDS) for c in (a, b))
    if a["mean"] is None or b["mean"] is None:
        value = (f"pending: seed-0 sweeps so far {subject[1]} {_fmt(a['tried'])}, {ref[1]} {_fmt(b['tried'])}")
        sources = [rel(results / m.exp / f"{tuned.run_name(m.prefix, lr, 0)}.json")
                   for m, c in ((tuned.model(*subject), a), (tuned.model(*ref), b)) for lr in c["tried"]]
        return {"id": claim_id, "statement": statement, "value": value, "target": target, "met": False,
                "status": "pending", "sources": sources}
    diff = (a["mean"] / b["mean"] - 1) * 100
    value = (f"{a['mean']:.4f} vs {b['mean']:.4f} bits per byte ({diff:+.2f}%), {len(a['runs'])} and {len(b['runs'])} "
             f"seeds at rates {a['best']:g} / {b['best']:g}")
    met = complete and diff < 0
    return {"id": claim_id, "statement": statement, "value": value, "target": target, "met": met,
            "status": "met" if met else ("not met" if complete else "pending"), "sources": sources}


def _fmt(tried: dict) -> str:
    return "{" + ", ".join(f"{lr:g}: {v:.4f}" for lr, v in sorted(tried.items())) + "}"


def _minilm(results: Path, density: float, goal: float, budget_s: float = 1800) -> dict:
    best, src = None, None
    for path, _, r in conversion_rows(results):
        if r["density"] != density:
            continue
        points = [(c["cosine_mean"], c.get("cpu_s")) for c in r.get("curve", [])] or [(r["cosine_mean"], 0)]
        for cos, cpu in points:
            if (cpu is None or cpu <= budget_s) and r["method"] != "per-element input sparsity (TEAL-style)" \
                    and (best is None or cos > best[0]):
                best, src = (cos, cpu, r["method"], r.get("rebasis", "none"), r["steps"]), path
    cpu = "CPU s not recorded" if best is None or best[1] is None else f"CPU s {best[1]}"
    value = "no run" if best is None else f"{best[0]:.4f} cosine ({best[2]}, rebasis {best[3]}, {cpu})"
    met = best is not None and best[0] >= goal and best[1] is not None
    return {"id": f"R5-minilm-{density}", "value": value, "target": f">= {goal} within {budget_s / 60:.0f} CPU-minutes",
            "statement": f"MiniLM converted to MoHD at delta {density} keeps >= {goal} cosine to the dense embeddings "
                         "on held-out verses within 30 CPU-minutes", "met": met, "status": "met" if met else "not met",
            "sources": [rel(src)] if src else []}


def _causal(results: Path) -> dict:
    best = None
    for path, m in causal_runs(results):
        dense = _dense_of(m)
        fits = dense and m["steps"] <= 200 and m["density"] == 0.5
        if fits and (best is None or m["final_val_bpb"] < best[1]["final_val_bpb"]):
            best = (path, m, dense)
    statement = ("the dense byte-level Llama D=128 (its best rate, seed 0, 2000 steps) converted to MoHD delta 0.5 "
                 "with <= 200 training steps is within 2% of its dense bits per byte")
    if best is None:
        return {"id": "R5-causal-0.5", "statement": statement, "value": "pending: the dense checkpoint (r1-tuned "
                "dense-d128 at its best rate, seed 0) is not finished", "target": "<= +2.00%", "met": False,
                "status": "pending", "sources": []}
    path, m, dense = best
    diff = (m["final_val_bpb"] / dense["final_val_bpb"] - 1) * 100
    recipe = ", ".join([f"lr {m['args']['lr']:g}", f"distill {m['args'].get('distill', 0.0):g}"]
                       + ([_extras(m["args"])] if _extras(m["args"]) else []))
    return {"id": "R5-causal-0.5", "statement": statement, "target": "<= +2.00%", "met": diff <= 2,
            "value": f"{m['final_val_bpb']:.4f} vs dense {dense['final_val_bpb']:.4f} ({diff:+.2f}%) after "
                     f"{m['steps']} steps ({recipe})", "status": "met" if diff <= 2 else "not met",
            "sources": [rel(path), rel(RESULTS_R1 / f"{Path(m['args']['init']).stem}.json")]}


def claims(results: Path) -> list[dict]:
    r1 = ("r1-tuned", "mohd-d128-delta0.5")
    return [
        _compare(results, "R1-tuned", "at each model's own best learning rate (3 seeds, 2000 steps), MoHD D=128 at "
                 "delta 0.5 reaches lower validation bits per byte than dense D=128", r1, ("r1-tuned", "dense-d128"),
                 "< 0% (MoHD lower)"),
        _compare(results, "R1-tuned-same-activated", "MoHD D=128 at delta 0.5 beats dense D=64 (same activated "
                 "reader/writer parameters), each at its best rate, 3 seeds", r1, ("r1-tuned", "dense-d64"), "< 0%"),
        _compare(results, "R2-controlled", "MoHD D=256 (x2) at delta 1/2 beats dense D=256 with the same total "
                 "parameters, each at its best rate, 3 seeds, 2000 steps", ("r2-controlled", "mohd-d256-x2-delta0.5"),
                 ("r2-controlled", "dense-d256"), "< 0%"),
        _compare(results, "R2-expansion-tuned", "MoHD D=256 (x2) at delta 1/2 beats dense D=128 (same activated "
                 "reader/writer parameters), each at its best rate, 3 seeds",
                 ("r2-controlled", "mohd-d256-x2-delta0.5"), ("r1-tuned", "dense-d128"), "< 0%"),
        _minilm(results, 0.75, 0.97),
        _minilm(results, 0.5, 0.93),
        _causal(results),
    ]
