"""End-to-end batch-1 decode: dense vs the ideal stand-in vs MoHD, llama-style models, random weights.

    python benchmarks/bench_e2e.py --shape small --out results/h100    # D 2048 / 16 layers (0.85B)
    python benchmarks/bench_e2e.py --shape large --out results/h100    # D 4096 / 32 layers (7.24B)
    python benchmarks/bench_e2e.py --smoke --out /tmp/e2e              # CPU plumbing check, fp32

Providers, each decoding greedily with a static KV cache (eager prefill of --prompt tokens, then
--new-tokens single-token steps, each a compiled function of (token, position) that includes the
argmax):
  dense  the model compiled by inductor, mode "reduce-overhead" (CUDA graphs over the whole step);
  ideal  the ideal stand-in (e2e_models: readers / writers cut to the active width, output head
         kept at full width), compiled the same way: what a perfect MoHD kernel could give;
  mohd   the dense model after mohdify.mohdify(model, MoHDConfig(num_groups=16, learned router,
         half the active groups shared)), its routers drawn at random so routing varies per token,
         compiled by torch.compile(backend="mohd", mode="reduce-overhead").
Timing: wall clock of the decode loop between two CUDA synchronizations, median of --runs runs
after one warm-up run (which compiles and records the CUDA graphs). Reported per row: tok/s, ms per
token, speedup over dense, and for mohd the fraction of the ideal speedup (speedup / ideal speedup,
the issue's target >= 0.9) and of the ideal gain ((speedup - 1) / (ideal - 1)).

Writes `<out>/e2e_<shape>.json` after every provider (so a time-out keeps what finished) and prints
a table. On --smoke everything runs on CPU with aot_eager instead of inductor: it checks the
plumbing and, at --densities 1 with --router-std 0, that MoHD decodes the same tokens as dense.
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # run as a script: import the sibling modules

import torch  # noqa: E402
from common import environment, format_table, report_problems, run_provider, write_json  # noqa: E402
from e2e_models import (  # noqa: E402
    SHAPES,
    Decoder,
    active_width,
    build_model,
    choose_impl,
    count_params,
    mohd_config,
    randomise_routers,
)
from torch._dynamo.utils import counters  # noqa: E402

COLUMNS = [("provider", "provider", ""), ("delta", "delta", ".2f"), ("tok_per_s", "tok/s", ".1f"),
           ("ms_per_token", "ms/tok", ".3f"), ("speedup_vs_dense", "vs dense", ".3f"),
           ("ideal_speedup", "ideal", ".3f"), ("frac_of_ideal", "of ideal", ".1%"),
           ("frac_of_ideal_gain", "of ideal gain", ".1%"), ("warmup_s", "warm-up s", ".1f"),
           ("cudagraph_skips", "cg skips", "d"), ("peak_gb", "peak GB", ".1f")]
TARGET_FRAC = 0.9


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--densities", default="0.5,0.25", help="comma-separated, each a multiple of 1/groups")
    p.add_argument("--providers", default="dense,ideal,mohd")
    p.add_argument("--model", default="auto", help="auto (HF LlamaForCausalLM if usable, else lite), hf or lite")
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--router", default="learned", choices=("learned", "magnitude"))
    p.add_argument("--router-std", type=float, default=None,
                   help="std of the random learned routers (default 1/sqrt(D)); 0 keeps them zero-initialised")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3, help="timed runs after the warm-up run")
    p.add_argument("--mode", default="reduce-overhead", help="inductor mode of every provider on CUDA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="CPU, fp32, aot_eager, tiny shape and few tokens")
    p.add_argument("--out", required=True)
    return p


def compile_kwargs(provider: str, args, cuda: bool) -> dict:
    if not cuda:   # the CPU smoke run: AOT autograd without inductor (minutes faster on 2 cores)
        if provider == "mohd":
            return {"backend": "mohd", "fullgraph": True, "options": {"compiler": "aot_eager"}}
        return {"backend": "aot_eager", "fullgraph": True}
    return {"backend": "mohd" if provider == "mohd" else "inductor", "mode": args.mode, "fullgraph": True}


def free_memory(cuda: bool) -> None:
    torch._dynamo.reset()   # drops compiled code and, on CUDA, the CUDA-graph trees and their pools
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()


def measure(model, impl: str, provider: str, args, prompt: torch.Tensor, cuda: bool) -> dict:
    """Warm-up run, then --runs timed runs of the decode loop; tok/s from the median."""
    cuda_graphs = cuda and args.mode in ("reduce-overhead", "max-autotune")
    dec = Decoder(model, impl, args.prompt + args.new_tokens)
    kwargs = compile_kwargs(provider, args, cuda)
    step = torch.compile(dec.step, **kwargs)
    skips0 = counters["inductor"]["cudagraph_skips"]
    graphs0 = counters["stats"]["unique_graphs"]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        # The MoHD ops warn when they fall back to the reference on CUDA; compiling and recording the
        # graphs runs their Python, so the warm-up run sees every such fallback.
        warnings.simplefilter("always")
        first, _ = dec.generate(step, prompt, args.new_tokens, cuda_graphs=cuda_graphs)
    warmup = time.perf_counter() - start
    fallbacks = sorted({str(w.message) for w in caught if "runs the reference path" in str(w.message)})
    times, same = [], True
    for _ in range(max(1, args.runs)):
        tokens, seconds = dec.generate(step, prompt, args.new_tokens, cuda_graphs=cuda_graphs)
        times.append(seconds)
        same = same and torch.equal(tokens, first)
    median = statistics.median(times)
    row = {
        "provider": provider, "compile": {k: v for k, v in kwargs.items() if k != "fullgraph"},
        "tok_per_s": args.new_tokens / median, "ms_per_token": 1e3 * median / args.new_tokens,
        "run_seconds": times, "warmup_s": warmup, "runs_identical": same,
        "tokens": tokens[0, :32].tolist(),
        "cuda_graphs_requested": cuda_graphs,
        "cudagraph_skips": counters["inductor"]["cudagraph_skips"] - skips0,
        "graphs_compiled": counters["stats"]["unique_graphs"] - graphs0,
        "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }
    # Sanity of what was timed: the uncompiled model decodes the same first tokens (bf16 rounding may
    # differ between the two, so dense's own agreement is the yardstick), and its logits are finite.
    n = min(8, args.new_tokens)
    eager, _ = dec.generate(dec.step, prompt, n, cuda_graphs=False)
    row["eager_tokens_agree"] = (eager[0] == tokens[0, :n + 1]).float().mean().item()
    with torch.no_grad():
        dec.cache.reset()
        row["prefill_logits_finite"] = bool(torch.isfinite(dec.logits(prompt, torch.arange(
            prompt.shape[1], device=prompt.device))).all())
    warned = []
    if cuda_graphs and row["cudagraph_skips"]:
        warned.append("inductor skipped CUDA graphs (reason in the perf_hints log): timed without them")
    if fallbacks:
        row["kernel_fallbacks"] = fallbacks[:5]
        warned.append(f"{len(fallbacks)} MoHD op(s) ran the reference instead of the fused kernel: {fallbacks[0]}")
    if warned:
        row["warning"] = "; ".join(warned)
    return row


def first_branch_gates(model, impl: str, prompt) -> torch.Tensor:
    """The gates `[T, N]` the first MoHD branch routes the prompt with (an eager prefill)."""
    import mohdify

    branch = mohdify.branches(model)[0]
    seen = []
    original = branch.route

    def route(x):
        seen.append(original(x))
        return seen[-1]
    branch.route = route   # an instance attribute shadows the method for this one call
    try:
        with torch.no_grad():
            model(input_ids=prompt) if impl == "hf" else model(prompt)
    finally:
        del branch.route
    return seen[0].gates


def run_mohd(model, impl: str, delta: float, args, prompt, cuda: bool) -> dict:
    import mohdify

    if "mohd" not in torch._dynamo.list_backends(exclude_tags=()):
        raise RuntimeError("torch.compile backend 'mohd' is not registered: install the package "
                           "(pip install --no-deps --no-build-isolation -e .) so its entry point is found")
    config = mohd_config(delta, args.groups, args.router)
    example = {"input_ids": prompt[:, :8]} if impl == "hf" else (prompt[:, :8],)
    start = time.perf_counter()
    mohdify.mohdify(model, config, example_inputs=example)
    mohdify_s = time.perf_counter() - start
    try:
        std = 1 / math.sqrt(model_dim(model)) if args.router_std is None else args.router_std
        drawn = randomise_routers(model, std, args.seed + 1)
        counters["mohdify"].clear()
        row = measure(model, impl, "mohd", args, prompt, cuda)
        gates = first_branch_gates(model, impl, prompt)   # [prompt, N]: how varied routing is
        row.update(mohdify_s=mohdify_s, mohd_config=config.to_dict(), routers_drawn=drawn, router_std=std,
                   branches=len(mohdify.branches(model)), backend_counters=dict(counters["mohdify"]),
                   distinct_routings=len({tuple(m) for m in (gates != 0).tolist()}) if gates is not None else None)
        if row["backend_counters"].get("mohdified_graphs", 0) < 1:
            row["error"] = f"the mohd backend compiled no mohdified graph: counters {row['backend_counters']}"
        return row
    finally:
        mohdify.demohdify(model)


def transformers_version():
    try:
        import transformers
    except ImportError:
        return None
    return transformers.__version__


def model_dim(model) -> int:
    cfg = model.config
    return cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.dim


def summarise(rows: list[dict]) -> None:
    """Fill speedup_vs_dense, ideal_speedup, frac_of_ideal(_gain) and the token agreement with dense."""
    dense = next((r for r in rows if r["provider"] == "dense" and "tok_per_s" in r), None)
    if dense is None:
        return
    for r in rows:
        if "tok_per_s" not in r:
            continue
        r["speedup_vs_dense"] = r["tok_per_s"] / dense["tok_per_s"]
        r["tokens_equal_dense"] = sum(a == b for a, b in zip(r["tokens"], dense["tokens"])) / len(dense["tokens"])
    for r in rows:
        ideal = next((i for i in rows if i["provider"] == "ideal" and i.get("delta") == r.get("delta")
                      and "speedup_vs_dense" in i), None)
        if r["provider"] != "mohd" or ideal is None or "speedup_vs_dense" not in r:
            continue
        r["ideal_speedup"] = ideal["speedup_vs_dense"]
        r["frac_of_ideal"] = r["speedup_vs_dense"] / ideal["speedup_vs_dense"]
        gain = ideal["speedup_vs_dense"] - 1
        r["frac_of_ideal_gain"] = (r["speedup_vs_dense"] - 1) / gain if gain > 0 else None
        r["target_met"] = r["frac_of_ideal"] >= TARGET_FRAC and not r.get("error")


def run_providers(payload: dict, impl: str, providers: list, densities: list, args, prompt, out: Path) -> None:
    """Measure every provider in turn (dense and mohd share one model, mohdified in place and back; each
    stand-in is built beside it and freed), appending rows to payload["rows"] and writing the JSON after each."""
    cuda = prompt.is_cuda
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = SHAPES[args.shape]
    rows = payload["rows"]

    def attempt(provider: str, delta, fn) -> None:
        row = run_provider(provider, delta, fn)
        rows.append(row)
        summarise(rows)
        write_json(out, payload)
        print(format_table([row], COLUMNS), flush=True)

    model = build_model(impl, shape, device=prompt.device, dtype=dtype, seed=args.seed)
    payload["params"]["dense"] = count_params(model)
    if "dense" in providers:
        attempt("dense", 1.0, lambda m=model: measure(m, impl, "dense", args, prompt, cuda))
        free_memory(cuda)
    # Pairs in order (ideal, mohd) per density, so a run cut short keeps complete comparisons.
    for delta in densities:
        if "ideal" in providers:
            width = active_width(shape.dim, delta, args.groups)
            ideal = build_model(impl, shape, dim=width, device=prompt.device, dtype=dtype, seed=args.seed)
            payload["params"][f"ideal_{delta}"] = count_params(ideal)
            attempt("ideal", delta, lambda m=ideal: measure(m, impl, "ideal", args, prompt, cuda))
            del ideal
            free_memory(cuda)
        if "mohd" in providers:
            attempt("mohd", delta, lambda m=model, d=delta: run_mohd(m, impl, d, args, prompt, cuda))
            free_memory(cuda)
    del model
    free_memory(cuda)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.smoke:
        args.shape = "smoke"
        device, dtype = "cpu", torch.float32
        if args.groups == 16:
            args.groups = 4
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --smoke on CPU", file=sys.stderr)
            return 2
        device, dtype = "cuda", torch.bfloat16
    shape = SHAPES[args.shape]
    densities = [float(d) for d in args.densities.split(",") if d.strip()]
    providers = [p.strip() for p in args.providers.split(",") if p.strip()]
    unknown = set(providers) - {"dense", "ideal", "mohd"}
    if unknown:
        parser().error(f"--providers: unknown {sorted(unknown)}; choose from dense, ideal, mohd")
    for d in densities:
        active_width(shape.dim, d, args.groups)   # fail fast on a density that is not whole groups
    impl, why_not_hf = choose_impl(args.model)
    out = Path(args.out) / f"e2e_{shape.name}.json"
    prompt = torch.randint(0, shape.vocab, (1, args.prompt), generator=torch.Generator().manual_seed(args.seed))
    prompt = prompt.to(device)
    payload = {"env": environment(), "transformers": transformers_version(), "args": vars(args),
               "model_impl": impl, "model_fallback_reason": why_not_hf,
               "shape": shape.to_dict(), "dtype": str(dtype), "device": device, "target_frac_of_ideal": TARGET_FRAC,
               "params": {}, "rows": []}
    run_providers(payload, impl, providers, densities, args, prompt, out)
    dense = next((r for r in payload["rows"] if r["provider"] == "dense"), {})
    if args.model == "auto" and impl == "hf" and dense.get("error"):
        # HF's model did not compile or decode here (a transformers version this script does not fit):
        # measure the self-written model instead, and say so.
        payload["model_impl"] = "lite"
        payload["model_fallback_reason"] = f"HF LlamaForCausalLM dense provider failed: {dense['error']}"
        payload["hf_rows"], payload["rows"], payload["params"] = payload["rows"], [], {}
        run_providers(payload, "lite", providers, densities, args, prompt, out)
    rows = payload["rows"]
    summarise(rows)
    order = {"dense": 0, "ideal": 1, "mohd": 2}
    rows.sort(key=lambda r: (-(r.get("delta") or 0), order[r["provider"]]))
    payload["table"] = format_table(rows, COLUMNS)
    write_json(out, payload)
    print(f"\n{shape.name}: D {shape.dim}, {shape.layers} layers, FFN {shape.ffn}, {payload['model_impl']} model, "
          f"{dtype}, prompt {args.prompt}, {args.new_tokens} new tokens\n{payload['table']}")
    failed = report_problems(rows, lambda r: f"{r['provider']} delta {r['delta']}")
    print(f"wrote {out}")
    return failed


if __name__ == "__main__":
    raise SystemExit(main())
