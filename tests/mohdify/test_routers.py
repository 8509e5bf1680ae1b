"""Router kinds (mohdify/routers.py): each kind is one object that the config, the branch module, the
plan, aux_loss and the backend all ask; a kind's parameters, counts, note and backend use are exact."""

import pytest
import torch

import mohdify
from mohdify.backend import backend_config
from mohdify.config import ROUTERS
from mohdify.errors import ConfigError
from mohdify.modules import MoHDBranch
from mohdify.plan import Branch
from mohdify.routers import ROUTER_KINDS


def test_config_routers_are_the_kinds():
    assert ROUTERS == tuple(ROUTER_KINDS) == ("learned", "magnitude")


@pytest.mark.parametrize("name", list(ROUTER_KINDS))
def test_a_kind_gives_the_branch_its_parameters_and_the_plan_its_counts(name):
    kind = ROUTER_KINDS[name]
    config = mohdify.MoHDConfig(num_groups=4, num_shared=1, top_k=1, router=name)
    branch = MoHDBranch(16, config)
    if kind.learned:
        assert branch.router.shape == (3, 16) and torch.equal(branch.router, torch.zeros(3, 16))
    else:
        assert branch.router is None
    counts = Branch("b", ["r"], "w", "h", {"r": (16, 32)}, (32, 16)).counts(config, 16)
    extra = 3 * 16 if kind.learned else 0
    assert counts["params"] == 2 * 16 * 32 + extra
    assert counts["active_flops"] == 2 * round(2 * 16 * 32 * config.density) + (2 * 3 * 16 if kind.learned else 2 * 16)
    note = kind.untrained_note(config)
    assert (note is not None) == kind.learned
    assert kind.untrained_note(mohdify.MoHDConfig.dense(num_groups=4, num_shared=1, router=name)) is None


def test_the_backend_takes_only_a_kind_without_parameters():
    config, _ = backend_config({"num_groups": 4, "num_shared": 1, "top_k": 1})
    assert config.router == "magnitude" and ROUTER_KINDS["magnitude"].backend_refusal is None
    with pytest.raises(ConfigError, match="a learned router has parameters"):
        backend_config({"router": "learned"})


def test_route_tokens_asks_the_kind_for_its_scores(monkeypatch):
    """The scoring is the kind's: a kind registered with its own scores routes by them (no other file)."""
    from dataclasses import replace

    from mohdify.routing import route_tokens

    def last_group_first(x, weight, group_size, routed_idx):                 # scores [T, N_r], no probabilities
        return torch.arange(routed_idx.numel(), dtype=torch.float32).expand(x.shape[0], -1), None

    monkeypatch.setitem(ROUTER_KINDS, "toy", replace(ROUTER_KINDS["magnitude"], name="toy", scores=last_group_first))
    x = torch.randn(3, 16)
    x[:, 4:8] *= 100                                                          # magnitude would pick group 1
    shared, routed = torch.tensor([0]), torch.tensor([1, 2, 3])
    toy = route_tokens(x, "toy", None, shared, routed, 1, "none", 0.5)
    magnitude = route_tokens(x, "magnitude", None, shared, routed, 1, "none", 0.5)
    assert toy.mask.tolist() == [[True, False, False, True]] * 3
    assert magnitude.mask.tolist() == [[True, True, False, False]] * 3
    assert torch.equal(toy.gates, toy.mask.float()) and toy.scale is None and toy.balance is None
