"""What the `mohdify` command line works on: models (a saved HF folder or a named config built
with random weights), text turned into token ids, and the two measurements (`bench`, `eval`).

Kept apart from `mohdify/cli.py` (argument parsing and printing) so each piece can be tested and
reused from Python.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from .errors import InputError

__all__ = ["NAMED_CONFIGS", "Loaded", "load_model", "text_ids", "example_ids", "decode_speed", "evaluate_text",
           "DecodeSpeed", "TextScore",
           "byte_tokenizer"]

# name -> (transformers config class, its arguments); vocabulary 256 so that plain UTF-8 bytes are tokens
NAMED_CONFIGS: dict[str, tuple[str, dict]] = {
    "tiny-llama": ("LlamaConfig", dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=4)),
    "tiny-gpt2": ("GPT2Config", dict(vocab_size=256, n_embd=256, n_layer=4, n_head=8, n_positions=1024)),
    "tiny-qwen2": ("Qwen2Config", dict(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=4)),
    "llama-0.1b": ("LlamaConfig", dict(vocab_size=256, hidden_size=768, intermediate_size=2048,
                                       num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4)),
    "llama-0.85b": ("LlamaConfig", dict(vocab_size=256, hidden_size=2048, intermediate_size=5632,
                                        num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4)),
}


@dataclass
class Loaded:
    model: nn.Module
    source: str                  # what was loaded, in words
    tokenizer: Any = None        # None: the text is read as UTF-8 bytes (ids 0..255), as byte_tokenizer() does


def load_model(spec: str, *, causal: bool = True, seed: int = 0) -> Loaded:
    """A saved HF folder (loaded with transformers, mohdified if it was saved mohdified) or a name of
    NAMED_CONFIGS (random weights from `seed`)."""
    import transformers
    if os.path.isdir(spec):
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
        model = auto.from_pretrained(spec).eval()
        return Loaded(model, f"{type(model).__name__} from {spec}", _tokenizer(spec))
    if spec not in NAMED_CONFIGS:
        raise InputError(f"model {spec!r} is neither a folder (written by save_pretrained) nor a named config; "
                         f"the named configs are {sorted(NAMED_CONFIGS)}.")
    cls_name, kwargs = NAMED_CONFIGS[spec]
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    return Loaded(model, f"{type(model).__name__} built from the named config {spec!r} (random weights, seed {seed})",
                  byte_tokenizer())


def byte_tokenizer() -> Any:
    """A tokenizer whose ids are the text's UTF-8 bytes (id = byte value; byte 0 doubles as end of text),
    saved with the named configs so that tools loading by path (lm-eval, pipelines) can read text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    alphabet = bytes_to_unicode()                                            # byte -> printable char
    tok = Tokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0], pad_token=alphabet[0])


def _tokenizer(path: str) -> Any:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
    if not any(os.path.exists(os.path.join(path, n)) for n in names):
        return None
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def _vocab_size(model: nn.Module) -> int:
    return int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)


def text_ids(loaded: Loaded, text: str) -> torch.Tensor:
    """The text's token ids `[L]`: the folder's tokenizer, or UTF-8 bytes for models without one."""
    if loaded.tokenizer is not None:
        return torch.tensor(loaded.tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    vocab = _vocab_size(loaded.model)
    if vocab < 256:
        raise InputError(f"{loaded.source} has no tokenizer and a vocabulary of {vocab} (< 256), so the text cannot "
                         "be read as UTF-8 bytes; save a tokenizer in the model folder.")
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def example_ids(loaded: Loaded, length: int = 16, seed: int = 0) -> torch.Tensor:
    """Random token ids `[1, length]` for capture."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(_vocab_size(loaded.model), 2), (1, length), generator=g)


def windows(ids: torch.Tensor, length: int) -> list[torch.Tensor]:
    """Non-overlapping windows `[1, <= length]` of the ids (the last one shorter; none under 2 tokens)."""
    return [ids[i:i + length][None] for i in range(0, ids.numel(), length) if ids[i:i + length].numel() >= 2]


# ----------------------------------------------------------------------------- eval
@dataclass
class TextScore:
    tokens: int          # tokens predicted
    nats: float          # summed cross-entropy over them
    bytes: int           # UTF-8 bytes of the text they spell

    @property
    def perplexity(self) -> float:
        return math.exp(self.nats / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nats / math.log(2) / self.bytes


def evaluate_text(loaded: Loaded, text: str, *, seq_len: int, max_tokens: Optional[int] = None,
                  progress: Callable[[list], Any] = iter) -> TextScore:
    """Cross-entropy of the model on `text`, in windows of `seq_len` tokens (each window predicts its
    tokens 2..n from the ones before it in that window)."""
    ids = text_ids(loaded, text)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    chunks = windows(ids, seq_len)
    if not chunks:
        raise InputError(f"the text gives {ids.numel()} tokens; at least 2 are needed.")
    score = TextScore(0, 0.0, 0)
    with torch.no_grad():
        for chunk in progress(chunks):
            logits = loaded.model(input_ids=chunk).logits[0, :-1].float()              # [n-1, V]
            score.nats += torch.nn.functional.cross_entropy(logits, chunk[0, 1:], reduction="sum").item()
            score.tokens += chunk.shape[1] - 1
            score.bytes += _bytes_of(loaded, chunk[0, 1:])
    return score


def _bytes_of(loaded: Loaded, ids: torch.Tensor) -> int:
    """UTF-8 bytes of the text the predicted tokens spell."""
    if loaded.tokenizer is None:
        return int(ids.numel())
    return len(loaded.tokenizer.decode(ids.tolist()).encode("utf-8"))


# ----------------------------------------------------------------------------- bench
@dataclass
class DecodeSpeed:
    dense: list[float]   # tokens/s per round
    mohd: list[float]

    @property
    def ratio(self) -> float:
        """MoHD over dense, the median of the per-round ratios (rounds interleave the two)."""
        return statistics.median(m / d for m, d in zip(self.mohd, self.dense))


def _decode_rate(model: nn.Module, prompt: torch.Tensor, tokens: int) -> float:
    kw = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=0,
              attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        start = time.perf_counter()
        model.generate(prompt, **kw)
        return tokens / (time.perf_counter() - start)


def decode_speed(dense: nn.Module, mohd: nn.Module, prompt: torch.Tensor, *, tokens: int, rounds: int,
                 progress: Callable[[range], Iterator] = iter) -> DecodeSpeed:
    """Greedy decode of `tokens` tokens after `prompt` `[1, P]`, dense and MoHD in turn each round
    (after one warm-up of each), in this process: ratios under the same conditions."""
    for model in (dense, mohd):
        _decode_rate(model, prompt, min(tokens, 4))
    out = DecodeSpeed([], [])
    for r in progress(range(rounds)):
        pair = ((dense, out.dense), (mohd, out.mohd))
        for model, rates in (pair if r % 2 == 0 else pair[::-1]):
            rates.append(_decode_rate(model, prompt, tokens))
    return out
