"""Re-basis of the residual stream: an exact permutation of its dims, so that MoHD's contiguous groups gather
the dims a calibration pass finds high in energy (MOHD_SPEC.md, "Groups" are contiguous).

    perm = mohdify.rebasis.energy_order(model, batches, example_inputs)     # dims by calibrated energy
    mohdify.rebasis.permute_stream(model, perm, example_inputs)             # same outputs, new basis
    mohdify.mohdify(model, config, example_inputs=example_inputs)           # groups = runs of `perm`

A permutation P of the stream dims leaves the model's function unchanged when every place that touches the
stream moves with it: embeddings' columns, the weights and biases of norms over the stream (LayerNorm and
RMSNorm are permutation-equivariant), readers' input columns, writers' output rows and biases, and other
layers that read the stream (heads, poolers: input columns). Outputs that *are* the stream (an encoder's
`last_hidden_state`, `hidden_states`) are put back in the original basis by a forward hook, so the user sees
the same outputs. `permute_stream` checks this on the example inputs and refuses (restoring the model) when a
parameter of stream width has no known role, or when the outputs differ.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from mohdify.passes.inputs import normalize_inputs, run_batches

from .config import MoHDConfig
from .errors import InputError, UnsupportedModelError

__all__ = ["energy_order", "permute_stream", "StreamUnpermute"]

_NORM_SUFFIXES = ("LayerNorm", "RMSNorm")


def _plan(model: nn.Module, example_inputs: Any):
    from .api import branches, explain
    if list(branches(model)):
        raise UnsupportedModelError(
            f"{type(model).__name__} is already mohdified: re-basis a dense model, then mohdify it.")
    return explain(model, example_inputs, MoHDConfig.dense(num_groups=1, num_shared=0, router="magnitude"))


@torch.no_grad()
def energy_order(model: nn.Module, batches, example_inputs: Any) -> Tensor:
    """Stream dims ordered by mean energy x_d^2 at the branch inputs over the calibration batches (each branch's
    energy normalised to sum 1, then summed over branches), highest first: `[D]` long."""
    plan = _plan(model, example_inputs)
    mods = dict(model.named_modules())
    first = [mods[b.readers[0]] for b in plan.branches]
    energy = torch.zeros(len(first), plan.hidden_size, dtype=torch.float64)

    def hook(i):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()                  # [T, D]
            energy[i] += x.pow(2).sum(0)
        return record

    run_batches(model, batches, [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(first)])
    if not energy.any():
        raise InputError("energy_order: no calibration token reached the branches; pass batches the model runs on.")
    share = energy / energy.sum(1, keepdim=True).clamp_min(1e-300)                          # [branches, D]
    return torch.sort(share.sum(0), descending=True, stable=True).indices


class StreamUnpermute:
    """Forward hook: puts the model outputs named `keys` (tensors or tuples of tensors whose last dim is the
    stream) back into the original basis."""

    def __init__(self, inverse: Tensor, keys: list[str]):
        self.inverse, self.keys = inverse, keys

    def __call__(self, module, args, output):
        if not isinstance(output, dict):
            return output                             # a plain tuple (return_dict=False): names unknown
        for key in self.keys:
            value = output.get(key)
            if isinstance(value, tuple):
                output[key] = tuple(v.index_select(-1, self.inverse.to(v.device)) for v in value)
            elif value is not None:
                output[key] = value.index_select(-1, self.inverse.to(value.device))
        return output


def _roles(model: nn.Module, plan) -> list[tuple[nn.Module, str]]:
    """(module, role) for every module that touches the stream: "in" (input columns), "out" (output rows and
    bias), "emb" (embedding columns), "norm" (weight and bias). Refuses parameters of stream width it cannot place."""
    d = plan.hidden_size
    readers, writers = set(plan.readers), set(plan.writers)
    roles, unknown = [], []
    for name, m in model.named_modules():
        own = dict(m.named_parameters(recurse=False))
        if name in readers:
            roles.append((m, "in"))
        elif name in writers:
            roles.append((m, "out"))
        elif isinstance(m, nn.Embedding) and m.embedding_dim == d:
            roles.append((m, "emb"))
        elif own and (isinstance(m, nn.LayerNorm) or type(m).__name__.endswith(_NORM_SUFFIXES)) \
                and all(p.shape == (d,) for p in own.values()):
            roles.append((m, "norm"))
        elif isinstance(m, nn.Linear) and m.in_features == d:
            roles.append((m, "in"))                       # heads, poolers: read the stream
        elif isinstance(m, nn.Linear) and m.out_features == d:
            roles.append((m, "out"))                      # e.g. an embedding projection into the stream
        else:
            unknown += [f"{name}.{n} {tuple(p.shape)}" for n, p in own.items() if d in p.shape]
    if unknown:
        raise UnsupportedModelError(
            f"permute_stream: parameters of stream width D={d} with no known role (not a reader, writer, "
            f"embedding, LayerNorm/RMSNorm or linear head): {unknown[:5]}; permuting the stream could change "
            f"what {type(model).__name__} computes, so it was left as it was.")
    return roles


def _apply(m: nn.Module, role: str, perm: Tensor, done: set) -> None:
    transposed = not isinstance(m, (nn.Linear, nn.Embedding)) and role in ("in", "out")   # GPT-2 Conv1D
    w = m.weight
    if id(w) not in done:                                 # tied weights move once
        done.add(id(w))
        if role == "norm":
            w.copy_(w[perm])
        elif (role in ("in", "emb")) != transposed:
            w.copy_(w[:, perm])
        else:
            w.copy_(w[perm])
    b = getattr(m, "bias", None)
    if b is not None and role in ("out", "norm") and id(b) not in done:
        done.add(id(b))
        b.copy_(b[perm])


def _outputs(model: nn.Module, example_inputs: Any) -> dict:
    """The model's tensor outputs on the example (with `output_hidden_states` where the model takes it, so
    the check sees every stream output the user can ask for)."""
    args, kwargs = normalize_inputs(model, example_inputs)
    try:
        out = model(*args, **{"output_hidden_states": True, **kwargs})
    except TypeError:
        out = model(*args, **kwargs)
    if isinstance(out, Tensor):
        return {"": out}
    return {k: v for k, v in dict(out).items() if isinstance(v, (Tensor, tuple))}


def _close(a, b) -> bool:
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if not isinstance(a, Tensor) or not isinstance(b, Tensor):
        return a is b
    if a.shape != b.shape:
        return False
    tol = 1e-5 * max(1.0, a.abs().max().item())
    return a.is_floating_point() and bool((a.float() - b.float()).abs().max() <= tol) or torch.equal(a, b)


def _moved(got, inverse: Tensor, d: int):
    if isinstance(got, tuple):
        return tuple(_moved(t, inverse, d) for t in got)
    return got[..., inverse] if isinstance(got, Tensor) and got.shape[-1] == d else got


@torch.no_grad()
def permute_stream(model: nn.Module, perm: Tensor, example_inputs: Any) -> nn.Module:
    """Permute the residual stream of a dense `model` in place: new stream dim j is old dim perm[j]. The model
    computes what it computed (checked on `example_inputs`; outputs that are the stream are put back into the
    original basis by a `StreamUnpermute` forward hook). On refusal or mismatch the model is left as it was.
    Returns `model`; `model.mohd_stream_perm` holds `perm`."""
    plan = _plan(model, example_inputs)
    d = plan.hidden_size
    perm = torch.as_tensor(perm, dtype=torch.long).cpu()
    if perm.shape != (d,) or not torch.equal(perm.sort().values, torch.arange(d)):
        raise InputError(f"permute_stream: perm must be a permutation of range({d}), got shape {tuple(perm.shape)}.")
    roles = _roles(model, plan)
    was = model.training
    model.eval()
    before = _outputs(model, example_inputs)
    saved = copy.deepcopy(model.state_dict())
    done: set = set()
    for m, role in roles:
        _apply(m, role, perm.to(m.weight.device), done)
    after = _outputs(model, example_inputs)
    inverse = torch.argsort(perm)
    stream, bad = [], []
    for key, ref in before.items():
        got = after.get(key)
        if _close(ref, got):
            continue
        (stream if key and _close(ref, _moved(got, inverse, d)) else bad).append(key or "output")
    if bad:
        model.load_state_dict(saved)
        model.train(was)
        raise UnsupportedModelError(
            f"permute_stream: {type(model).__name__} computes other outputs {bad} after permuting its stream (an op "
            "on the stream that is not permutation-equivariant); it was left as it was.")
    if stream:
        model.register_forward_hook(StreamUnpermute(inverse, stream))
    model.mohd_stream_perm = perm
    model.train(was)
    return model
