"""`python -m mohdify.lm_eval ...`: lm-evaluation-harness (PyPI `lm-eval`) with mohdify imported first.

lm-eval's `--model hf` loads a model by path with transformers' `from_pretrained`; a mohdified folder
loads mohdified only once `import mohdify` has registered the "mohd" quantization method, which
lm-eval's own command never does. This module imports mohdify, then runs lm-eval's command line
with the arguments given, unchanged:

    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 python -m mohdify.lm_eval run --model hf \\
        --model_args pretrained=./mohd,dtype=float32 --include_path examples/lm_eval --tasks mohd_local_text \\
        --device cpu --batch_size 1

(`run` is lm-eval 0.4.10+'s subcommand; see examples/lm_eval/README.md.)
"""

from __future__ import annotations

import mohdify  # noqa: F401  (registers the "mohd" quantization method with transformers)


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:
        raise SystemExit(f"mohdify.lm_eval needs lm-evaluation-harness: pip install lm-eval ({e})") from e
    cli_evaluate()


if __name__ == "__main__":
    main()
