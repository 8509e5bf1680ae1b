"""Property-based tests of the invariants of MOHD_SPEC.md on random configs, inputs and seeds.

1. dense equivalence (delta = 1), eager and compiled;  2. the masked reference (tests/reference.py)
and the routing rules;  3. demohdify is exact;  4. state-dict round trip;  5. gradients and aux loss;
6. greedy generate of an HF llama at delta = 1.
"""

import copy
import importlib.util
import io

import pytest
import torch
from conftest import assert_close
from hypothesis import given, note, settings
from hypothesis import strategies as st
from reference import RoutingRecorder, check_routing, check_writes, masked_reference, randomize_branches, spec_routing
from strategies import Case, cases, main_output, output_tensors, run, tied_inputs
from zoo import ZOO

import mohdify
from mohdify.modules import MoHDBranch

ALL = list(ZOO)
MASKED = ["nanogpt", "llama", "gpt2", "bert", "t5", "vit", "mixtral"]


def assert_outputs_close(actual, expected, what: str) -> None:
    got, want = output_tensors(actual), output_tensors(expected)
    assert got.keys() == want.keys(), f"{what}: outputs {sorted(got)} != expected {sorted(want)}"
    for key in want:
        assert_close(got[key], want[key], f"{what} {key}")


def mohdified(case: Case, randomize: bool = False):
    """(dense model, mohdified deep copy, random inputs) for a case; the copy keeps its example
    inputs as `model.example` for tests that mohdify again."""
    dense, example, inputs = case.build()
    model = mohdify.mohdify(copy.deepcopy(dense), case.config, example_inputs=example)
    model.example = example
    if randomize:
        randomize_branches(model, case.seed, case.permute_groups)
    return dense, model, inputs


# ---------------------------------------------------------------- 1. dense equivalence
@pytest.mark.parametrize("name", ALL)
@given(data=st.data())
@settings(max_examples=3)   # x 8 models; each example costs a capture (~0.5 s)
def test_dense_equivalence(name, data):
    case = data.draw(cases([name], dense=True, permute=False))
    dense, model, inputs = mohdified(case)
    with torch.no_grad():
        assert_outputs_close(run(model, inputs), run(dense, inputs), f"{name} delta=1 {case.config}")


COMPILED = [("nanogpt", dict(num_groups=4, num_shared=1, router="learned", scaling="norm", fusion="mix")),
            ("llama", dict(num_groups=8, num_shared=0, router="magnitude", scaling="density", fusion="mix")),
            ("qwen2", dict(num_groups=16, num_shared=4, router="learned", scaling="none", fusion="none")),
            ("gpt2", dict(num_groups=6, num_shared=2, router="magnitude", scaling="norm", fusion="none")),
            ("bert", dict(num_groups=12, num_shared=3, router="learned", scaling="density", fusion="mix")),
            ("t5", dict(num_groups=2, num_shared=1, router="magnitude", scaling="none", fusion="mix")),
            ("vit", dict(num_groups=3, num_shared=0, router="learned", scaling="norm", fusion="none")),
            ("mixtral", dict(num_groups=4, num_shared=2, router="magnitude", scaling="density", fusion="mix"))]


def _compiled_case(name, cfg, backend, seed=0, options=None):
    torch._dynamo.reset()   # a fresh model of a class compiled before must not hit the recompile limit
    case = Case(name, mohdify.MoHDConfig.dense(**cfg), seed=seed, batch=2, seqs=(5, 4), permute_groups=False)
    dense, model, inputs = mohdified(case)
    compiled = torch.compile(model, backend=backend, options=options)
    with torch.no_grad():
        assert_outputs_close(run(compiled, inputs), run(dense, inputs), f"{name} compiled[{backend}] {case.config}")


@pytest.mark.parametrize("name,cfg", COMPILED, ids=[c[0] for c in COMPILED])
def test_dense_equivalence_compiled_aot_eager(name, cfg):
    _compiled_case(name, cfg, "aot_eager")


def test_dense_equivalence_compiled_inductor():
    _compiled_case("nanogpt", dict(num_groups=8, num_shared=2, router="learned", scaling="norm", fusion="mix"),
                   "inductor")


@pytest.mark.skipif(importlib.util.find_spec("mohdify.backend") is None, reason="mohdify/backend.py not written yet")
@pytest.mark.parametrize("name", ["nanogpt", "llama"])
def test_dense_equivalence_compiled_mohd_backend(name):
    """On a mohdified model the mohd backend compiles the MoHD ops as they are (no second rewrite)."""
    from torch._dynamo.utils import counters
    counters["mohdify"].clear()
    cfg = dict(num_groups=4, num_shared=1, router="learned", scaling="density", fusion="mix")
    _compiled_case(name, cfg, "mohd", options={"compiler": "aot_eager"})
    assert counters["mohdify"]["mohdified_graphs"] >= 1 and counters["mohdify"]["dense_graphs"] == 0, \
        f"mohd backend counters {dict(counters['mohdify'])}"


@pytest.mark.parametrize("name", ["nanogpt", "llama"])
def test_compiled_matches_eager_when_sparse(name):
    """At delta < 1, torch.compile makes the same routing decisions as eager, and its backward
    gives the same router, fusion and weight gradients."""
    torch._dynamo.reset()
    config = mohdify.MoHDConfig(num_groups=8, num_shared=2, top_k=3, router="learned", scaling="norm", fusion="mix")
    case = Case(name, config, seed=3, batch=2, seqs=(6,), permute_groups=True)
    _, model, inputs = mohdified(case, randomize=True)
    compiled = torch.compile(model, backend="aot_eager")
    grads = {}
    for what, fn in (("eager", model), ("compiled", compiled)):
        model.zero_grad(set_to_none=True)
        out = run(fn, inputs)
        (main_output(out).pow(2).mean() + mohdify.aux_loss(model)).backward()
        grads[what] = (out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (eager, eager_grads), (got, got_grads) = grads["eager"], grads["compiled"]
    assert_outputs_close(got, eager, f"{name} compiled")
    assert got_grads.keys() == eager_grads.keys()
    assert any(".mohd.router" in n for n in got_grads) and any(".mohd.fusion" in n for n in got_grads)
    for n, g in eager_grads.items():
        assert_close(got_grads[n], g, f"{name} compiled grad of {n}")


# ---------------------------------------------------------------- 2. masked reference and routing
@pytest.mark.parametrize("name", MASKED)
@given(data=st.data())
@settings(max_examples=5)   # x 7 models
def test_masked_reference(name, data):
    case = data.draw(cases([name]))
    dense, model, inputs = mohdified(case, randomize=True)
    with torch.no_grad(), RoutingRecorder(model) as rec:
        out = run(model, inputs)
    plan = model.mohd_plan
    assert sorted(rec.reads) == sorted(plan.readers) and sorted(rec.writes) == sorted(plan.writers)
    checked = check_routing(model, rec)
    assert checked == sum(len(v) for v in rec.reads.values())
    check_writes(rec)
    with torch.no_grad():
        expected = masked_reference(dense, model, rec, inputs)
    assert_outputs_close(out, expected, f"{name} vs masked reference")
    active = torch.cat([c["mask"].float().mean(-1) for calls in rec.reads.values() for c in calls])
    note(f"active fraction per token: {active.unique().tolist()}, density {case.config.density}")
    assert torch.allclose(active, torch.full_like(active, case.config.density)), "active groups != delta * N"


@given(tied_inputs())
def test_route_ties_go_to_lower_index(args):
    """On exact ties (integer scores) top-k must pick the lower routed group, gates must follow the spec."""
    config, group_size, seed, tokens, shared = args
    gen = torch.Generator().manual_seed(seed)
    d = config.num_groups * group_size
    branch = MoHDBranch(d, config)
    if shared is not None:
        routed = sorted(set(range(config.num_groups)) - set(shared))
        branch.shared_idx.copy_(torch.tensor(shared, dtype=torch.long))
        branch.routed_idx.copy_(torch.tensor(routed, dtype=torch.long))
    x = torch.randint(-1, 2, (tokens, d), generator=gen).float()              # [T, D]
    if branch.router is not None:
        with torch.no_grad():
            branch.router.copy_(torch.randint(-1, 2, branch.router.shape, generator=gen).float())
    mask, alpha, gates, _ = branch.route(x)
    want_mask, want_gates, want_alpha, _ = spec_routing(x, branch.router, branch.shared_idx, branch.routed_idx,
                                                        config)
    assert torch.equal(mask, want_mask), (f"mask {mask.int().tolist()} != spec {want_mask.int().tolist()} "
                                          f"for x {x.tolist()}")
    assert_close(gates.detach().double(), want_gates, "gates", dtype=torch.float32)
    if want_alpha is None:
        assert alpha is None
    else:
        assert_close(alpha.double(), want_alpha, "alpha", dtype=torch.float32)


# ---------------------------------------------------------------- 3. demohdify is exact
@given(cases(ALL))
@settings(max_examples=6)
def test_demohdify_restores_state_dict_and_classes(case):
    model, example, inputs = case.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    params = {n: p for n, p in model.named_parameters()}
    with torch.no_grad():
        ref = run(model, inputs)
    mohdify.mohdify(model, case.config, example_inputs=example)
    randomize_branches(model, case.seed, case.permute_groups)
    assert {n: type(m) for n, m in model.named_modules()} != classes
    assert mohdify.demohdify(model) is model
    after = model.state_dict()
    assert list(after) == list(before), f"state-dict keys changed: {set(after) ^ set(before)}"
    changed = [k for k in before if not torch.equal(after[k], before[k]) or after[k].dtype != before[k].dtype]
    assert not changed, f"demohdify changed {changed}"
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(p is params[n] for n, p in model.named_parameters()), "parameters were replaced"
    with torch.no_grad():
        out = run(model, inputs)
    for key, value in output_tensors(ref).items():
        assert torch.equal(output_tensors(out)[key], value), f"{case.name} {key} differs after demohdify"


# ---------------------------------------------------------------- 4. state-dict round trip
@given(cases(ALL, min_groups=2))
@settings(max_examples=6)
def test_state_dict_round_trip(case):
    dense, model, inputs = mohdified(case, randomize=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    extra = set(model.state_dict()) - set(dense.state_dict())
    want = {f"{b.name}.mohd.{p}" for b in model.mohd_plan.branches for p in ("shared_idx", "routed_idx")}
    want |= {f"{b.name}.mohd.router" for b in model.mohd_plan.branches if case.config.router == "learned"}
    want |= {f"{b.name}.mohd.fusion" for b in model.mohd_plan.branches if case.config.fusion == "mix"}
    assert extra == want, f"new state-dict keys {sorted(extra)} != {sorted(want)}"
    fresh = mohdify.mohdify(copy.deepcopy(dense), case.config, example_inputs=model.example)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    saved, loaded = model.state_dict(), fresh.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in saved.items()), "load_state_dict did not restore every tensor"
    with torch.no_grad():
        want_out, got_out = output_tensors(run(model, inputs)), output_tensors(run(fresh, inputs))
    for key, value in want_out.items():
        assert torch.equal(got_out[key], value), f"{case.name} {key}: reloaded model differs"


# ---------------------------------------------------------------- 5. gradients and aux loss
@given(cases(ALL, min_groups=2))
@settings(max_examples=6)
def test_router_and_fusion_train(case):
    _, model, inputs = mohdified(case, randomize=True)
    model.train()        # the balance loss is kept in training mode
    torch.manual_seed(0)  # dropout, where a model has it: the same draw at every replay of the example
    loss = main_output(run(model, inputs)).float().pow(2).mean()
    aux = mohdify.aux_loss(model)
    assert torch.isfinite(aux), f"aux_loss = {aux}"
    branches = mohdify.branches(model)
    routers = [b.router for b in branches if b.router is not None]
    fusions = [b.fusion for b in branches if b.fusion is not None]
    if case.config.router == "magnitude":
        assert not routers and aux.item() == 0.0 and not aux.requires_grad
    else:
        assert len(routers) == len(branches) and aux.item() > 0
        aux_grads = torch.autograd.grad(aux, routers, retain_graph=True, allow_unused=True)
        assert all(g is not None and torch.isfinite(g).all() for g in aux_grads), "aux_loss has no router gradient"
    (loss + aux).backward()
    params = routers + fusions
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    if routers and case.config.num_routed > 1:   # with one routed group every gate is p/p = 1
        assert all(p.grad.abs().sum() > 0 for p in routers), "a router got a zero gradient"
    if fusions:
        assert all(p.grad.abs().sum() > 0 for p in fusions), "a fusion matrix got a zero gradient"
    if not params:
        return
    before = [(p.detach().clone(), p.grad.clone()) for p in params]
    torch.optim.SGD(params, lr=0.5).step()
    for p, (old, grad) in zip(params, before):
        assert torch.equal(p.detach(), old - 0.5 * grad), "the SGD step did not move the parameter by -lr * grad"
    assert any(not torch.equal(p.detach(), old) for p, (old, _) in zip(params, before)), "SGD changed nothing"


# ---------------------------------------------------------------- 6. generate
def test_llama_generate_dense_equivalence():
    dense, example = ZOO["llama"].build()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (2, 6), generator=gen)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :2] = 0    # a left-padded row
    config = mohdify.MoHDConfig.dense(num_groups=8, num_shared=2, router="learned", scaling="norm", fusion="mix")
    model = mohdify.mohdify(copy.deepcopy(dense), config, example_inputs=example)
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=5, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        want = dense.generate(ids, **kwargs)
        got = model.generate(ids, **kwargs)
    assert want.shape == (2, 11)
    assert torch.equal(got, want), f"greedy tokens {got.tolist()} != dense {want.tolist()}"
