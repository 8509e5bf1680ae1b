"""A mohdified model used the way models are used in production: threads, autocast, copies,
reloads, checkpointing, several forwards per step, empty batches (one test per case of issue 6;
each failed when routing was state left on the branch module)."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
import torch.utils.checkpoint as ckpt
from conftest import assert_close
from reference import randomize_branches
from strategies import main_output
from torch import nn
from zoo import ZOO

import mohdify
from mohdify.modules import BalanceLog

CFG = mohdify.MoHDConfig(num_groups=8, num_shared=2, top_k=2)


def _llama(config=CFG, seed=0):
    model, inputs = ZOO["llama"].build()
    mohdify.mohdify(model, config, example_inputs=inputs)
    randomize_branches(model, seed=seed, permute_groups=False)
    return model, inputs


def _logits(model, ids):
    return model(input_ids=ids).logits


# ------------------------------------------------------------------------ 1. threads
def _threaded(fn, jobs, threads=4):
    """Run fn(job) for every job from `threads` threads at once; results in job order."""
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def worker(k):
        start.wait()
        try:
            for i in range(k, len(jobs), threads):
                results[i] = fn(jobs[i])
        except BaseException as e:   # reported below, with the job
            errors.append(e)
    pool = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors[0]
    return [results[i] for i in range(len(jobs))]


def _jobs(n=24):
    g = torch.Generator().manual_seed(5)
    return [torch.randint(0, 96, (1 + i % 2, (7, 12)[i // 2 % 2]), generator=g) for i in range(n)]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "mohd-backend"])
def test_threads_give_the_serial_outputs(compiled, fresh_dynamo):
    model, _ = _llama()
    model.eval()
    jobs = _jobs()
    fn = torch.compile(model, backend="mohd", options={"compiler": "aot_eager"}) if compiled else model
    with torch.no_grad():
        serial = [_logits(fn, ids) for ids in jobs]        # also compiles every shape before the threads
        eager = [_logits(model, ids) for ids in jobs]

    def run(ids):
        with torch.no_grad():                              # grad mode is per thread
            return _logits(fn, ids)
    parallel = _threaded(run, jobs)
    for i, (s, p, e) in enumerate(zip(serial, parallel, eager)):
        assert torch.equal(p, s), f"job {i} {tuple(jobs[i].shape)}: threaded output differs from serial"
        assert_close(s, e, f"job {i}: {'compiled' if compiled else 'eager'} vs eager")


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "mohd-backend"])
def test_threads_with_autograd_on(compiled, fresh_dynamo):
    """Autograd on in every thread (grad mode is per thread). Eval-mode passes keep no balance loss,
    so threads share no state: the compiled case once kept one per pass, recompiled at every pass
    (dynamo guarded on the length of the list of losses) and raced on that list (an IndexError in
    CI). Training-mode eager passes from threads keep what serial passes keep, none lost."""
    from torch._dynamo.utils import counters
    model, _ = _llama()
    g = torch.Generator().manual_seed(6)
    jobs = [torch.randint(0, 96, (2, 12), generator=g) for _ in range(12)]   # one shape (several: above)
    fn = torch.compile(model, backend="mohd", options={"compiler": "aot_eager"}) if compiled else model
    model.eval()
    serial = [_logits(fn, ids).detach() for ids in jobs]
    parallel = _threaded(lambda ids: _logits(fn, ids).detach(), jobs)
    assert all(torch.equal(p, s) for p, s in zip(parallel, serial))
    assert all(b.balance_log.total is None and b.balance_log.count == 0 for b in mohdify.branches(model))
    assert counters["stats"]["unique_graphs"] == (1 if compiled else 0)   # none compiled for the threads
    if compiled:
        return       # compiled training from several threads on one model is not supported (README)
    model.train()
    for ids in jobs:
        _logits(model, ids)
    kept = {b.name: b.balance_log.take() for b in mohdify.branches(model)}
    _threaded(lambda ids: _logits(model, ids), jobs)
    for b in mohdify.branches(model):
        assert b.balance_log.count == len(jobs), (b.name, b.balance_log.count)
        assert_close(b.balance_log.total, kept[b.name], f"{b.name}: balance loss kept by the threads")


# ------------------------------------------------------------------------ 2. autocast
def test_cpu_autocast_bf16_forward_and_backward_match_the_dense_model():
    dense, inputs = ZOO["llama"].build()
    model = copy.deepcopy(dense)
    mohdify.mohdify(model, mohdify.MoHDConfig.dense(num_groups=8, num_shared=2), example_inputs=inputs)
    ids = inputs["input_ids"]
    outs = {}
    for name, m in (("dense", dense), ("mohd", model)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(input_ids=ids, labels=ids)
        out.loss.backward()
        outs[name] = (out.logits, {n: p.grad for n, p in m.named_parameters() if ".mohd." not in n})
    (ld, gd), (lm, gm) = outs["dense"], outs["mohd"]
    assert lm.dtype == ld.dtype == torch.bfloat16
    assert_close(lm, ld, "llama logits under CPU bf16 autocast, MoHD at delta 1 vs dense", dtype=torch.bfloat16)
    assert gm.keys() == gd.keys()
    for n in gd:
        assert gm[n] is not None and gm[n].dtype == torch.float32, n
        assert_close(gm[n], gd[n], f"grad of {n} under bf16 autocast", dtype=torch.bfloat16)


def test_autocast_registered_for_every_matmul_op_and_cuda():
    for op in ("read", "read_multi", "write", "write_add"):
        overload = getattr(torch.ops.mohdify, op).default
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert overload.has_kernel_for_dispatch_key(getattr(torch._C.DispatchKey, key)), (op, key)


# ------------------------------------------------------------------------ 3. copies
def _tensors_with_graph(model: nn.Module) -> list[str]:
    found = []
    for name, m in model.named_modules():
        for attr, value in vars(m).items():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                found.append(f"{name}.{attr}")
    return found


def test_deepcopy_after_a_training_forward_and_nothing_left_on_modules():
    model, inputs = _llama()
    model.train()
    loss = main_output(model(**inputs)).float().pow(2).mean()
    assert _tensors_with_graph(model) == []
    twin = copy.deepcopy(model)                      # an EMA copy / a DPO reference model
    assert all(b.balance_log.total is None and b.balance_log.count == 0 for b in mohdify.branches(twin))
    assert all(b.balance_log.count == 1 for b in mohdify.branches(model))
    (loss + mohdify.aux_loss(model)).backward()
    model.eval()
    twin.eval()
    with torch.no_grad():
        assert torch.equal(_logits(twin, inputs["input_ids"]), _logits(model, inputs["input_ids"]))


# ------------------------------------------------------------------------ 4. reloads
def test_whole_model_pickles_after_a_training_forward(tmp_path):
    """torch.save of the module itself (not its state dict), mid-step: the copy carries no kept loss and
    no graph, computes what the model computes and keeps its own balance losses."""
    model, inputs = _llama()
    model.train()
    model(**inputs)                                   # a kept balance loss with its graph
    torch.save(model, tmp_path / "model.pt")
    twin = torch.load(tmp_path / "model.pt", weights_only=False)
    assert all(b.balance_log.total is None and b.balance_log.count == 0 for b in mohdify.branches(twin))
    assert all(b.balance_log.count == 1 for b in mohdify.branches(model))
    twin.eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(_logits(twin, inputs["input_ids"]), _logits(model, inputs["input_ids"]))
    twin.train()
    twin(**inputs)
    assert torch.allclose(mohdify.aux_loss(twin), mohdify.aux_loss(model))


def test_demohdify_restores_the_parameters_the_model_holds_now():
    model, inputs = _llama()
    state = {k: v.clone() + 1.0 if v.is_floating_point() else v.clone() for k, v in model.state_dict().items()}
    stale = model.model.layers[0].mlp.down_proj.weight
    model.load_state_dict(state, assign=True)        # new Parameter objects
    held = model.model.layers[0].mlp.down_proj.weight
    assert held is not stale
    mohdify.demohdify(model)
    after = model.state_dict()
    for k, v in after.items():
        assert torch.equal(v, state[k]), f"{k}: demohdify put back a stale Parameter"
    assert model.model.layers[0].mlp.down_proj.weight is held


# ------------------------------------------------------------------------ 5. balance loss
def _aux_after(model, run) -> torch.Tensor:
    model.train()
    run()
    return mohdify.aux_loss(model)


def test_balance_loss_counts_every_application():
    model, inputs = _llama()
    ids = inputs["input_ids"]
    one = _aux_after(model, lambda: model(input_ids=ids))
    two = _aux_after(model, lambda: (model(input_ids=ids), model(input_ids=ids.flip(1))))
    flip = _aux_after(model, lambda: model(input_ids=ids.flip(1)))
    assert one.item() > 0
    assert torch.allclose(two, one + flip), (two, one, flip)
    model.eval()
    with torch.no_grad():
        model(input_ids=ids)                         # inference keeps nothing and holds no graph
    model(input_ids=ids).logits.sum().backward()     # nor does an eval pass with autograd (attribution)
    assert all(b.balance_log.total is None and b.balance_log.count == 0 for b in mohdify.branches(model))


def test_compiled_passes_keep_their_balance_losses_without_recompiling(fresh_dynamo):
    """Five training passes before one aux_loss (several forwards per loss): one shape compiles twice
    (nothing kept yet / something kept), not once per pass, and keeps the eager passes' sum."""
    from torch._dynamo.utils import counters
    model, inputs = _llama()
    model.train()
    g = torch.Generator().manual_seed(7)
    batches = [torch.randint(0, 96, (2, 12), generator=g) for _ in range(5)]
    for ids in batches:
        model(input_ids=ids)
    eager = mohdify.aux_loss(model)
    fn = torch.compile(model, backend="mohd", options={"compiler": "aot_eager"}, fullgraph=True)
    for step in range(3):
        for ids in batches:
            fn(input_ids=ids)
        assert all(b.balance_log.count == 0 for b in mohdify.branches(model))   # not counted while traced
        aux = mohdify.aux_loss(model)
        assert_close(aux, eager, f"step {step}: compiled passes' balance loss vs eager")
        aux.backward()
    assert counters["stats"]["unique_graphs"] == 2
    assert all(b.router.grad is not None and b.router.grad.abs().sum() > 0 for b in mohdify.branches(model))


def test_balance_log_bound_drops_what_was_never_taken():
    log = BalanceLog(limit=3)
    losses = [torch.tensor(float(i), requires_grad=True) for i in range(1, 6)]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for loss in losses:
            log.add(loss, "b")
    assert [str(w.message) for w in seen] == [
        "MoHD branch 'b' has kept 3 balance losses that mohdify.aux_loss() never took; they are dropped. Add "
        "mohdify.aux_loss(model) to the training loss, or call model.eval() for passes that do not train."]
    assert log.count == 2 and log.total.item() == 9.0       # 1 + 2 + 3 dropped at the 4th
    log.take().backward()
    assert [x.grad for x in losses[:3]] == [None] * 3 and all(x.grad.item() == 1.0 for x in losses[3:])
    assert log.take() is None and log.count == 0


def test_balance_loss_of_a_block_applied_twice():
    model, inputs = _llama()
    layers = model.model.layers
    layers.append(layers[0])                         # a looped block (ALBERT style): layer 0 runs twice
    model.config.num_hidden_layers = 3
    model.train()
    model(**inputs)
    branch = layers[0].mlp.mohd
    assert branch.balance_log.count == 2


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_balance_loss_under_activation_checkpointing(reentrant):
    model, inputs = _llama()
    plain = _aux_after(model, lambda: model(**inputs))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    out = model(**inputs)
    aux = mohdify.aux_loss(model)
    assert torch.allclose(aux, plain), (aux, plain)
    (main_output(out).float().pow(2).mean() + aux).backward()    # recomputation keeps nothing more
    assert all(b.balance_log.total is None for b in mohdify.branches(model))
    routers = [b.router for b in mohdify.branches(model)]
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in routers)


def test_balance_loss_with_gradient_accumulation():
    model, inputs = _llama()
    ids = inputs["input_ids"]
    model.train()
    losses = []
    for micro in (ids[:1], ids[1:]):
        out = model(input_ids=micro, labels=micro)
        aux = mohdify.aux_loss(model)
        losses.append(aux.item())
        (out.loss + aux).backward()
    expected = [_aux_after(model, lambda m=m: model(input_ids=m)).item() for m in (ids[:1], ids[1:])]
    assert losses == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("seq", [7, 20])   # 14 tokens: the route op; 40: the native routing when built
def test_reentrant_checkpoint_of_a_plain_block(seq):
    from mohdify.codegen.cpu import native
    from mohdify.codegen.cpu import routing as native_routing
    model, inputs = ZOO["nanogpt"].build()
    mohdify.mohdify(model, mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1), example_inputs=inputs)
    randomize_branches(model, seed=1, permute_groups=False)
    model.train()
    block = model.h[0]
    x = torch.randn(2, seq, ZOO["nanogpt"].hidden_size, requires_grad=True)
    calls = native_routing.calls["route_gates"]
    y = ckpt.checkpoint(block, x, use_reentrant=True)
    aux = mohdify.aux_loss(model)
    assert aux.requires_grad and aux.item() > 0
    (y.sum() + aux).backward()
    assert all(b.router.grad is not None for b in mohdify.branches(model) if b.name.startswith("h.0."))
    if seq == 20 and native.library() is not None:
        assert native_routing.calls["route_gates"] > calls


# ------------------------------------------------------------------------ 6. empty batches
def test_an_empty_batch_gives_what_the_dense_model_gives():
    dense, inputs = ZOO["nanogpt"].build()
    model = copy.deepcopy(dense)
    mohdify.mohdify(model, mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1), example_inputs=inputs)
    with torch.no_grad():
        want, got = dense(inputs[0][:0]), model(inputs[0][:0])
    assert got.shape == want.shape == (0, 7, 96)


def test_an_empty_batch_through_a_llama_mlp_forward_and_backward():
    dense, inputs = ZOO["llama"].build()
    model = copy.deepcopy(dense)
    mohdify.mohdify(model, CFG, example_inputs=inputs)
    x = torch.zeros(0, 7, 64, requires_grad=True)
    got = model.model.layers[0].mlp(x)
    assert got.shape == dense.model.layers[0].mlp(x).shape == (0, 7, 64)
    got.sum().backward()
    assert x.grad.shape == (0, 7, 64)


def test_zero_tokens_through_every_op_forward_and_backward():
    model, inputs = _llama(mohdify.MoHDConfig(num_groups=8, num_shared=2, top_k=2, scaling="norm", fusion="mix"))
    model.train()
    x = torch.zeros(0, 64, requires_grad=True)
    branch = model.model.layers[0].mlp.mohd
    routing = branch.route(x)
    assert routing.mask.shape == (0, 8) and routing.gates.shape == (0, 8) and routing.scale.shape == (0,)
    assert routing.balance is not None and routing.balance.item() == 0.0


# ------------------------------------------------------------------------ 7. HF save / load
def test_save_pretrained_then_mohdify_from_pretrained(tmp_path):
    from transformers import LlamaForCausalLM
    model, inputs = _llama(mohdify.MoHDConfig(num_groups=8, num_shared=2, top_k=2, fusion="mix"))
    model.eval()
    mohdify.calibrate(model, [inputs])
    model.save_pretrained(tmp_path)
    loaded = mohdify.from_pretrained(LlamaForCausalLM, str(tmp_path)).eval()
    assert len(mohdify.branches(loaded)) == 4
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    with torch.no_grad():
        assert torch.equal(_logits(loaded, inputs["input_ids"]), _logits(model, inputs["input_ids"]))
    assert loaded.mohd_plan.branches == model.mohd_plan.branches


def test_from_pretrained_of_a_dense_checkpoint_says_so(tmp_path):
    from transformers import LlamaForCausalLM
    dense, _ = ZOO["llama"].build()
    dense.save_pretrained(tmp_path)
    with pytest.raises(mohdify.InputError, match="holds no mohdified model"):
        mohdify.from_pretrained(LlamaForCausalLM, str(tmp_path))


def test_demohdified_model_saves_as_dense(tmp_path):
    model, _ = _llama()
    mohdify.demohdify(model)
    assert "quantization_config" not in model.config.to_dict()


# ------------------------------------------------------------------------ 8. torch.func
@pytest.mark.parametrize("seq", [3, 20])   # 6 tokens: the kernel ops' path; 40: the masked path, native routing
@pytest.mark.parametrize("config", [dict(), dict(scaling="norm", fusion="mix"), dict(router="magnitude")],
                         ids=["learned", "norm-mix", "magnitude"])
def test_torch_func_grad_equals_backward(seq, config):
    """torch.func.grad over functional_call gives the gradients of loss.backward(). The kernel ops' and the
    native routing's autograd formulas are refused by torch inside torch.func transforms, so the modules
    run the pure-torch references there; before, 6 tokens raised."""
    model, _ = ZOO["nanogpt"].build()
    mohdify.mohdify(model, mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1, **config),
                    example_inputs=(torch.zeros(1, 4, dtype=torch.long),))
    randomize_branches(model, seed=3, permute_groups=False)
    ids = torch.randint(0, 64, (2, seq), generator=torch.Generator().manual_seed(seq))
    params = {k: v.detach() for k, v in model.named_parameters()}
    grads = torch.func.grad(lambda p: main_output(torch.func.functional_call(model, p, (ids,))).square().mean())(params)
    model.zero_grad(set_to_none=True)
    main_output(model(ids)).square().mean().backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("seq", [6, 20])
@pytest.mark.parametrize("config", [dict(), dict(scaling="norm", fusion="mix"), dict(router="magnitude")],
                         ids=["learned", "norm-mix", "magnitude"])
def test_torch_func_vmap_per_sample_gradients(seq, config, capfd):
    """vmap over grad (per-sample gradients, as in differentially private training) equals one backward
    per sample, and vmap of the forward equals the batched forward. Inside the transform the routing
    runs the reference top-k (vmap has no batching rule for the route op)."""
    model, _ = ZOO["nanogpt"].build()
    mohdify.mohdify(model, mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1, **config),
                    example_inputs=(torch.zeros(1, 4, dtype=torch.long),))
    randomize_branches(model, seed=4, permute_groups=False)
    model.eval()
    ids = torch.randint(0, 64, (3, seq), generator=torch.Generator().manual_seed(seq))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x):
        return main_output(torch.func.functional_call(model, p, (x[None],))).square().mean()
    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, ids)
    for i in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        main_output(model(ids[i:i + 1])).square().mean().backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-6, msg=f"{i} {name}")
    with torch.no_grad():
        mapped = torch.func.vmap(lambda x: main_output(model(x[None]))[0])(ids)
        torch.testing.assert_close(mapped, main_output(model(ids)), rtol=1e-5, atol=1e-6)
    assert "batching rule" not in capfd.readouterr().err     # no per-sample loop over an op without one
