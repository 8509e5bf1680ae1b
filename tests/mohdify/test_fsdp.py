"""FSDP2: a mohdified model under `torch.distributed.fsdp.fully_shard`, 2 processes on gloo (CPU),
trains one step to the loss, gradients and updated weights of one process running the same two
micro-batches (FSDP averages the ranks' gradients; the balance loss is per micro-batch, so the
one-process reference averages the two micro-batches' losses too)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from reference import randomize_branches
from zoo import ZOO

import mohdify

pytestmark = pytest.mark.slow   # two spawned processes: ~15-30 s on 2 cores

CFG = mohdify.MoHDConfig(num_groups=8, num_shared=2, top_k=2, fusion="mix", scaling="norm")
LR = 0.1


def _batches():
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 96, (2, 2, 9), generator=g)   # [micro-batch, batch, tokens]


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss + mohdify.aux_loss(model)


def _step(model, ids):
    """One SGD step on micro-batch ids; returns (loss, {name: grad}, {name: new weight}) as plain tensors."""
    model.train()
    loss = _loss(model, ids)
    loss.backward()
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    grads = {n: full(p.grad).detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p -= LR * p.grad
    weights = {n: full(p).detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, weights


def _worker(rank: int, port: int, folder: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.set_num_threads(1)
        model = AutoModelForCausalLM.from_pretrained(folder)   # mohdified, as saved (no capture)
        mohdify.contiguous(model)   # FSDP2 needs contiguous Parameters (CPU readers are column-major)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        loss, grads, weights = _step(model, _batches()[rank])
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        if rank == 0:
            torch.save({"loss": loss, "grads": grads, "weights": weights}, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_contiguous_keeps_the_parameters_and_outputs():
    from mohdify.codegen.cpu.layout import is_column_major
    model, inputs = ZOO["llama"].build()
    mohdify.mohdify(model, CFG, example_inputs=inputs)
    q = model.model.layers[0].self_attn.q_proj
    weight, before = q.weight, model(**inputs).logits
    assert is_column_major(weight)
    mohdify.contiguous(model)
    assert q.weight is weight and weight.is_contiguous() and q.original.weight is weight
    # same values up to summation order: the native CPU decode kernels take column-major readers only,
    # a row-major reader runs the torch path, which sums a token's groups in another order
    torch.testing.assert_close(model(**inputs).logits, before, rtol=1e-5, atol=1e-6)
    with pytest.raises(mohdify.UnsupportedModelError, match="not mohdified"):
        mohdify.contiguous(ZOO["llama"].build()[0])


def test_fully_shard_trains_one_step_like_one_process(tmp_path):
    model, inputs = ZOO["llama"].build()
    mohdify.mohdify(model, CFG, example_inputs=inputs)
    randomize_branches(model, seed=2, permute_groups=True)
    model.save_pretrained(tmp_path / "model")
    mp.spawn(_worker, args=(_free_port(), str(tmp_path / "model"), str(tmp_path / "fsdp.pt")), nprocs=2, join=True)
    got = torch.load(tmp_path / "fsdp.pt")

    model.train()
    ids = _batches()
    loss = (_loss(model, ids[0]) + _loss(model, ids[1])) / 2    # what 2 ranks of FSDP average
    loss.backward()
    assert torch.allclose(got["loss"], loss.detach(), rtol=0, atol=1e-6), (got["loss"], loss)
    names = {n for n, _ in model.named_parameters()}
    assert set(got["grads"]) == names and any(".mohd.router" in n for n in names)
    for n, p in model.named_parameters():
        error = (got["grads"][n] - p.grad).abs().max()
        assert torch.allclose(got["grads"][n], p.grad, rtol=1e-5, atol=1e-6), (n, error)
        assert torch.allclose(got["weights"][n], p.detach() - LR * p.grad, rtol=1e-5, atol=1e-6), n
