"""Tables and plots of R1-R5 from the run JSONs that run_research.py wrote, and docs/results/claims.json.

    python experiments/summarize.py          # prints markdown tables; writes docs/results/{r1,r2,r3}.json, PNGs
                                             # and docs/results/claims.json
    python experiments/summarize.py --write  # also puts the tables into docs/RESULTS.md (between <!-- name --> marks)
    python experiments/summarize.py --collect /work/results --write
                                             # first copies the finished runs (JSON + PNG) of a runner's --results
                                             # folder into docs/results/<experiment>/ (never checkpoints)

Mean +- sample standard deviation over seeds; runs missing so far are left out (the table says how many seeds).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import claims as claims_mod  # noqa: E402
import tuned  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"

R1_CONDITIONS = [("dense D=128", "r1", "dense-d128"), ("MoHD D=128, delta 0.5", "r1", "mohd-d128-delta0.5"),
                 ("dense D=64 (same activated)", "r1", "dense-d64")]
R2_CONDITIONS = [("dense D=128", "r1", "dense-d128"), ("MoHD D=256 (x2), delta 0.5", "r2", "mohd-d256-x2-delta0.5")]


def load(exp: str, prefix: str) -> list[dict]:
    out = []
    for path in sorted((RESULTS / exp).glob(f"{prefix}-s*.json")):
        if path.stem[len(prefix):].lstrip("-s").isdigit():
            out.append(json.loads(path.read_text()))
    return out


def run_record(m: dict) -> dict:
    """What docs/results/<experiment>.json keeps of a run."""
    return {"run": Path(m["args"]["out"]).stem, "seed": m["seed"], "steps": m["steps"], "tokens": m["tokens"],
            "final_val_bpb": m["final_val_bpb"], "best_val_bpb": m["best_val_bpb"], "wall_s": m["wall_s"],
            "hidden_size": m["model"]["hidden_size"], "mohd": m["mohd"], "counts": m["counts"],
            "routing": summary_routing(m), "command": m["command"]}


def summary_routing(m: dict) -> dict | None:
    r, c = m.get("routing"), m.get("mohd")
    if not r:
        return None
    out = {k: r[k] for k in ("routed_load_ideal", "routed_load_min", "routed_load_max", "dead_groups")}
    if r.get("aux_loss_last") is not None:
        # the balance loss is at least coef x top_k per branch (uniform routing): 1.0 = perfectly balanced
        out["aux_loss_vs_balanced"] = round(r["aux_loss_last"] / (c["aux_loss_coef"] * c["top_k"] * r["branches"]), 3)
    return out


def stats(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} +- {statistics.stdev(values):.4f}"


def table(conditions, exp_name: str) -> tuple[str, dict]:
    rows = ["| model | seeds | activated params / token | val bits per byte | vs dense D=128 | wall s / run |",
            "|---|---|---|---|---|---|"]
    record, base = {"experiment": exp_name, "conditions": {}}, None
    for label, exp, prefix in conditions:
        runs = load(exp, prefix)
        vals = [m["final_val_bpb"] for m in runs]
        if prefix == "dense-d128" and vals:
            base = statistics.mean(vals)
        rel = f"{(statistics.mean(vals) / base - 1) * 100:+.2f}%" if vals and base else "-"
        active = runs[0]["counts"]["active_params_per_token"] if runs else "-"
        wall = f"{statistics.mean(m['wall_s'] for m in runs):.0f}" if runs else "-"
        rows.append(f"| {label} | {len(runs)} | {active} | {stats(vals)} | {rel} | {wall} |")
        record["conditions"][label] = {"runs": [run_record(m) for m in runs],
                                       "mean_val_bpb": statistics.mean(vals) if vals else None,
                                       "stdev_val_bpb": statistics.stdev(vals) if len(vals) > 1 else None}
    return "\n".join(rows), record


def r3_table() -> tuple[str, dict]:
    base = RESULTS / "r1" / "mohd-d128-delta0.5-s0.json"
    runs = ([("baseline (learned, none, none, 16/4/4)", json.loads(base.read_text()))] if base.exists() else [])
    runs += [(p.stem, json.loads(p.read_text())) for p in sorted((RESULTS / "r3").glob("*.json"))]
    ref = runs[0][1]["final_val_bpb"] if runs and runs[0][0].startswith("baseline") else None
    rows = ["| variant | val bits per byte | vs baseline | routed load min / max (ideal) | dead routed groups | "
            "balance loss / balanced |", "|---|---|---|---|---|---|"]
    record = {"experiment": "r3", "runs": []}
    for label, m in runs:
        r = summary_routing(m) or {}
        rel = f"{(m['final_val_bpb'] / ref - 1) * 100:+.2f}%" if ref else "-"
        load = (f"{r['routed_load_min']:.2f} / {r['routed_load_max']:.2f} ({r['routed_load_ideal']:.2f})"
                if r else "-")
        rows.append(f"| {label} | {m['final_val_bpb']:.4f} | {rel} | {load} | {r.get('dead_groups', '-')} | "
                    f"{r.get('aux_loss_vs_balanced', '-')} |")
        record["runs"].append({"variant": label, **run_record(m)})
    return "\n".join(rows), record


def r4_table() -> str:
    path = RESULTS / "r4" / "r4.json"
    if not path.exists():
        return "(no R4 data yet)"
    rows = ["| model | D | branches | top 10% dims: first branch | last branch | mean | top 25% of dims (mean) | "
            "top 25% of groups (mean) | dims shared by >= 50% of tokens (mean per branch) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, m in json.loads(path.read_text())["models"].items():
        b = m["branches"]
        top10 = [r["energy_top10%_dims"] for r in b]
        groups = statistics.mean(r["energy_top25%_groups"] for r in b)
        dims25 = statistics.mean(r["energy_top25%_dims"] for r in b)
        shared = statistics.mean(r["shared_dims"] for r in b)
        rows.append(f"| {name} | {m['hidden']} | {len(b)} | {top10[0]:.3f} | {top10[-1]:.3f} | "
                    f"{statistics.mean(top10):.3f} | {dims25:.3f} | {groups:.3f} | {shared:.1f} |")
    return "\n".join(rows)


def r5_table() -> str:
    path = RESULTS / "r5" / "minilm.json"
    if not path.exists():
        return "(no R5 data yet)"
    data = json.loads(path.read_text())
    extra = RESULTS / "r5" / "minilm-magnitude.json"     # run_research.py --only r5m
    more = ([r for r in json.loads(extra.read_text())["results"] if r["method"] == "fine-tuned"]
            if extra.exists() else [])
    rows = ["| density | method | router | fine-tuning steps | cosine mean (min) | curve: step -> cosine |",
            "|---|---|---|---|---|---|"]
    for r in data["results"] + more:
        curve = ", ".join(f"{c['step']}: {c['cosine_mean']:.3f}" for c in r.get("curve", []))
        rows.append(f"| {r['density']} | {r['method']} | {r['router']} | {r['steps']} | "
                    f"{r['cosine_mean']:.4f} ({r['cosine_min']:.4f}) | {curve} |")
    if not data.get("complete", True):
        rows.append("\n(partial: the run had not finished all conditions when this table was made)")
    return "\n".join(rows)


def plot_curves(conditions, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.4), dpi=90)
    for i, (label, exp, prefix) in enumerate(conditions):
        for j, m in enumerate(load(exp, prefix)):
            pts = [(h["step"], h["val_bpb"]) for h in m["history"] if "val_bpb" in h]
            ax.plot(*zip(*pts), "o-", ms=2, lw=1, color=f"C{i}", alpha=0.8, label=label if j == 0 else None)
    ax.set_xlabel("step"), ax.set_ylabel("validation bits per byte"), ax.set_title(title, fontsize=8)
    ax.set_ylim(top=4.0)
    ax.grid(alpha=0.3), ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_tables(tables: dict[str, str]) -> None:
    """Replace the text between `<!-- rN -->` and `<!-- /rN -->` in docs/RESULTS.md by table N."""
    path = ROOT / "docs" / "RESULTS.md"
    doc = path.read_text()
    for name, text in tables.items():
        start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
        if start in doc and end in doc:
            head, rest = doc.split(start, 1)
            doc = head + start + "\n" + text + "\n" + end + rest.split(end, 1)[1]
    path.write_text(doc)


def collect(source: Path) -> list[Path]:
    """Copy finished runs (a JSON with its PNG) of the tuned experiments and conversions from `source`."""
    copied = []
    for exp in (*tuned.EXPERIMENTS, "r5-conv", "r5-causal"):
        for path in sorted((source / exp).glob("*.json")):
            dest = RESULTS / exp / path.name
            if tuned._read(path) is None or (dest.exists() and dest.read_bytes() == path.read_bytes()):
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            for f in (path, path.with_suffix(".png")):
                if f.exists():
                    shutil.copy2(f, dest.parent / f.name)
            copied.append(dest)
    return copied


def tuned_tables() -> dict[str, str]:
    return {"r1-tuned-sweep": claims_mod.sweep_table(RESULTS, "r1-tuned"),
            "r1-tuned": claims_mod.seeds_table(RESULTS, "r1-tuned", ("r1-tuned", "dense-d128")),
            "r2-controlled-sweep": claims_mod.sweep_table(RESULTS, "r2-controlled"),
            "r2-controlled": claims_mod.seeds_table(RESULTS, "r2-controlled", ("r1-tuned", "dense-d128")),
            "r3-tuned": claims_mod.seeds_table(RESULTS, "r3-tuned", ("r3-tuned", "baseline")),
            "r5-conv": claims_mod.conversion_table(RESULTS), "r5-causal": claims_mod.causal_table(RESULTS)}


def claims_table(items: list[dict]) -> str:
    rows = ["| id | status | value | target | statement |", "|---|---|---|---|---|"]
    rows += [f"| {c['id']} | {c['status']} | {c['value']} | {c['target']} | {c['statement']} |" for c in items]
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--collect", type=Path, default=None, help="a runner's --results folder to copy finished runs from")
    p.add_argument("--write", action="store_true", help="put the tables into docs/RESULTS.md")
    args = p.parse_args()
    if not RESULTS.exists():
        sys.exit(f"no results in {RESULTS}: run experiments/run_research.py first.")
    if args.collect:
        for path in collect(args.collect):
            print(f"collected {path.relative_to(ROOT)}")
    tables = {}
    for name, conditions in (("r1", R1_CONDITIONS), ("r2", R2_CONDITIONS)):
        text, record = table(conditions, name)
        tables[name] = text
        print(f"## {name}\n{text}\n")
        (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=1))
        plot_curves(conditions, RESULTS / f"{name}.png", f"{name}: validation (KJV held-out books), all seeds")
    text, record = r3_table()
    tables["r3"] = text
    print(f"## r3\n{text}\n")
    (RESULTS / "r3.json").write_text(json.dumps(record, indent=1))
    tables["r4"], tables["r5"] = r4_table(), r5_table()
    print(f"## r4\n{tables['r4']}\n\n## r5\n{tables['r5']}")
    for name, text in tuned_tables().items():
        tables[name] = text
        print(f"\n## {name}\n{text}")
    items = claims_mod.claims(RESULTS)
    (RESULTS / "claims.json").write_text(json.dumps(items, indent=1) + "\n")
    tables["claims"] = claims_table(items)
    print(f"\n## claims (docs/results/claims.json)\n{tables['claims']}")
    if args.write:
        write_tables(tables)


if __name__ == "__main__":
    main()
