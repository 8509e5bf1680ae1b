"""The `mohdify` command: explain, convert, bench and eval a model without writing Python.

    mohdify explain tiny-llama                     # what would be rewritten (a named config or a saved folder)
    mohdify convert ./dense ./mohd --calibrate book.txt   # mohdify, calibrate shared groups, save_pretrained
    mohdify bench ./mohd                           # decode tokens/s, dense vs MoHD, in one process
    mohdify eval ./mohd book.txt                   # bits per byte and perplexity on a text file

Built on typer (click); models are HF models (transformers). Every command takes a MODEL: a folder
written by `save_pretrained` (mohdified or dense) or one of the named configs (random weights).
"""

from __future__ import annotations

import copy
import platform
import statistics
import sys
from pathlib import Path
from typing import Annotated, Optional

import torch
import typer

from .config import FUSIONS, ROUTERS, SCALINGS, MoHDConfig
from .errors import MohdifyError

app = typer.Typer(help="MoHD (Mixture of Hidden Dimensions) for Hugging Face Transformers, from the shell. "
                  "MODEL is a folder written by save_pretrained (dense or mohdified) or a named config: "
                  "tiny-llama, tiny-gpt2, tiny-qwen2, llama-0.1b, llama-0.85b (random weights).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  rich_markup_mode=None)

Model = Annotated[str, typer.Argument(help="a save_pretrained folder, or a named config (e.g. tiny-llama)")]
Groups = Annotated[int, typer.Option("--groups", help="N: groups the hidden size is split into")]
Shared = Annotated[int, typer.Option("--shared", help="N_s: groups always active")]
TopK = Annotated[int, typer.Option("--top-k", help="k: routed groups chosen per token; density (N_s+k)/N")]
Router = Annotated[str, typer.Option("--router", help=f"one of {ROUTERS}; 'magnitude' needs no training")]
Scaling = Annotated[str, typer.Option("--scaling", help=f"one of {SCALINGS}")]
Fusion = Annotated[str, typer.Option("--fusion", help=f"one of {FUSIONS}")]


def _config(groups: int, shared: int, top_k: int, router: str, scaling: str, fusion: str) -> MoHDConfig:
    return MoHDConfig(num_groups=groups, num_shared=shared, top_k=top_k, router=router, scaling=scaling,
                      fusion=fusion)


def _progress(desc: str):
    from tqdm.auto import tqdm
    return lambda items: tqdm(items, desc=desc, file=sys.stderr, leave=False, disable=None)


def _fail(e: Exception) -> None:
    typer.echo(f"error: {e}", err=True)
    raise typer.Exit(code=2)


def _load(spec: str, *, causal: bool = True):
    from .cli_models import load_model
    try:
        return load_model(spec, causal=causal)
    except ValueError as e:   # transformers: a folder whose model has no causal-LM head
        if not causal or isinstance(e, MohdifyError):
            raise
        return load_model(spec, causal=False)


def _is_mohdified(model) -> bool:
    from .passes import is_mohdified
    return is_mohdified(model)


@app.command()
def explain(model: Model, groups: Groups = 16, shared: Shared = 4, top_k: TopK = 4, router: Router = "magnitude",
            scaling: Scaling = "none", fusion: Fusion = "none",
            seq_len: Annotated[int, typer.Option(help="length of the random example input used for capture")] = 16):
    """Show what MoHD rewrites in MODEL: residual branches, readers, writer, parameters and FLOPs per
    token (total and activated), and every layer left dense with its reason. Changes nothing. For a
    mohdified folder, shows the plan saved with it."""
    import mohdify

    from .cli_models import example_ids
    try:
        loaded = _load(model)
        typer.echo(f"model: {loaded.source}")
        if _is_mohdified(loaded.model):
            typer.echo("mohdified: the plan saved with it (loaded from config.json, no capture):")
            typer.echo(str(loaded.model.mohd_plan))
            return
        config = _config(groups, shared, top_k, router, scaling, fusion)
        plan = mohdify.explain(loaded.model, {"input_ids": example_ids(loaded, seq_len)}, config)
        typer.echo(str(plan))
    except MohdifyError as e:
        _fail(e)


@app.command()
def convert(model: Model, out: Annotated[Path, typer.Argument(help="folder to write (save_pretrained)")],
            groups: Groups = 16, shared: Shared = 4, top_k: TopK = 4, router: Router = "magnitude",
            scaling: Scaling = "none", fusion: Fusion = "none",
            calibrate: Annotated[Optional[Path], typer.Option(
                help="a UTF-8 text file: the N_s groups of highest energy on it become each branch's shared "
                     "groups (mohdify.calibrate)")] = None,
            calibration_tokens: Annotated[int, typer.Option(help="tokens of the text used for calibration")] = 4096,
            seq_len: Annotated[int, typer.Option(help="tokens per calibration window")] = 256):
    """Mohdify MODEL and save it with save_pretrained: config.json carries the MoHD plan, so
    transformers' from_pretrained (after `import mohdify`) and `mohdify eval/bench` load it mohdified.
    The default router here is 'magnitude' (training-free); a 'learned' router must be trained first."""
    import mohdify

    from .cli_models import example_ids, text_ids, windows
    try:
        loaded = _load(model)
        if _is_mohdified(loaded.model):
            raise mohdify.InputError(f"{model} is already mohdified; convert takes a dense model.")
        config = _config(groups, shared, top_k, router, scaling, fusion)
        batches = []
        if calibrate is not None:
            ids = text_ids(loaded, _read(calibrate))[:calibration_tokens]
            batches = [{"input_ids": w} for w in windows(ids, seq_len)]
        example = batches[0] if batches else {"input_ids": example_ids(loaded)}
        mohdify.mohdify(loaded.model, config, example_inputs=example)
        if batches:
            shared_groups = mohdify.calibrate(loaded.model, _progress("calibrating")(batches))
            typer.echo(f"calibrated on {sum(b['input_ids'].numel() for b in batches)} tokens of {calibrate}: "
                       f"shared groups of {len(shared_groups)} branches")
        loaded.model.save_pretrained(out)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(out)
        plan = loaded.model.mohd_plan
        typer.echo(f"mohdified {loaded.source}: {len(plan.branches)} branches, density {config.density:.3f} "
                   f"({config.num_shared} shared + {config.top_k} routed of {config.num_groups} groups), "
                   f"router={config.router}")
        typer.echo(f"saved to {out}")
    except MohdifyError as e:
        _fail(e)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise typer.BadParameter(f"cannot read {path} as UTF-8 text: {e}") from e


@app.command()
def bench(model: Model, tokens: Annotated[int, typer.Option(help="tokens generated per round")] = 32,
          rounds: Annotated[int, typer.Option(help="rounds; dense and MoHD alternate within each")] = 5,
          prompt_len: Annotated[int, typer.Option(help="prompt tokens")] = 16,
          threads: Annotated[int, typer.Option(help="torch threads (0: torch's default)")] = 1,
          groups: Groups = 16, shared: Shared = 4, top_k: TopK = 4, router: Router = "magnitude",
          scaling: Scaling = "none"):
    """Decode speed on this machine: greedy generation of --tokens tokens, dense vs MoHD, in one
    process, the two alternating each round; prints median tokens/s of each and the median of the
    per-round ratios. A mohdified folder is compared with its own dense weights (demohdify); a dense
    model is mohdified with the options given."""
    import mohdify

    from .cli_models import decode_speed, example_ids
    if threads:
        torch.set_num_threads(threads)
    try:
        loaded = _load(model)
        if _is_mohdified(loaded.model):
            mohd, dense = loaded.model, mohdify.demohdify(copy.deepcopy(loaded.model))
        else:
            dense, mohd = loaded.model, copy.deepcopy(loaded.model)
            config = MoHDConfig(num_groups=groups, num_shared=shared, top_k=top_k, router=router, scaling=scaling)
            mohdify.mohdify(mohd, config, example_inputs={"input_ids": example_ids(loaded)})
        c = mohd.mohd_plan.config
        prompt = example_ids(loaded, prompt_len, seed=1)
        speed = decode_speed(dense, mohd, prompt, tokens=tokens, rounds=rounds, progress=_progress("rounds"))
    except MohdifyError as e:
        _fail(e)
    typer.echo(f"model: {loaded.source}")
    typer.echo(f"conditions: torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
               f"{platform.machine()} CPU, dtype {next(dense.parameters()).dtype}, batch 1, prompt {prompt_len}, "
               f"{tokens} new tokens, {rounds} rounds, eager")
    typer.echo(f"MoHD: density {c.density:.3f} ({c.num_shared} shared + {c.top_k} routed of {c.num_groups} "
               f"groups), router={c.router}")
    typer.echo(f"dense: {statistics.median(speed.dense):.1f} tokens/s")
    typer.echo(f"MoHD:  {statistics.median(speed.mohd):.1f} tokens/s")
    typer.echo(f"MoHD / dense: {speed.ratio:.2f}x (median of {rounds} interleaved rounds)")


@app.command("eval")
def evaluate(model: Model, text: Annotated[Path, typer.Argument(help="a UTF-8 text file")],
             seq_len: Annotated[int, typer.Option(help="tokens per window")] = 256,
             max_tokens: Annotated[Optional[int], typer.Option(help="use only the first tokens of the text")] = None,
             compare_dense: Annotated[bool, typer.Option(
                 help="also score the dense model (a mohdified model's own weights, demohdified)")] = False):
    """Score MODEL on a text file: bits per byte and perplexity, in windows of --seq-len tokens.
    Models without a tokenizer in their folder (and the named configs) read the text as UTF-8 bytes."""
    import mohdify

    from .cli_models import Loaded, evaluate_text
    try:
        loaded = _load(model)
        body = _read(text)
        runs = [("model", loaded)]
        if compare_dense and _is_mohdified(loaded.model):
            runs.append(("dense", Loaded(mohdify.demohdify(copy.deepcopy(loaded.model)), "dense", loaded.tokenizer)))
        typer.echo(f"model: {loaded.source}" + (" (mohdified)" if _is_mohdified(loaded.model) else " (dense)"))
        for name, item in runs:
            score = evaluate_text(item, body, seq_len=seq_len, max_tokens=max_tokens, progress=_progress(name))
            typer.echo(f"{name}: {score.tokens} tokens ({score.bytes} bytes of {text.name}), "
                       f"bits per byte {score.bits_per_byte:.4f}, perplexity {score.perplexity:.3f}")
    except MohdifyError as e:
        _fail(e)


def main() -> None:   # the console script `mohdify`
    app()
