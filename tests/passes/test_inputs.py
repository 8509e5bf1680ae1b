"""passes/inputs.py: the calibration passes' batch runner leaves the model as it found it."""

import pytest
import torch
from torch import nn

from mohdify.errors import InputError
from mohdify.passes.inputs import run_batches


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.b(self.a(x))


def test_run_batches_reads_every_batch_then_restores_hooks_and_modes():
    net = _Net().train()
    net.b.eval()                                              # a mixed mode the runner must keep
    seen, grads, before = [], [], []

    def record(module, args):
        seen.append(tuple(args[0].shape))
        grads.append(torch.is_grad_enabled())
        assert not module.training

    run_batches(net, [(torch.ones(2, 4),), {"x": torch.ones(3, 4)}], [net.a.register_forward_pre_hook(record)],
                before_each=lambda batch: before.append(type(batch).__name__))
    assert seen == [(2, 4), (3, 4)] and grads == [False, False] and before == ["tuple", "dict"]
    assert net.training and net.a.training and not net.b.training
    assert not net.a._forward_pre_hooks


def test_run_batches_cleans_up_when_a_batch_fails():
    net = _Net().train()
    handle = net.a.register_forward_hook(lambda *_: None)
    with pytest.raises(RuntimeError):
        run_batches(net, [(torch.ones(2, 5),)], [handle])     # wrong width: the forward fails
    assert not net.a._forward_hooks and net.training and net.a.training
    with pytest.raises(InputError, match="example_inputs must contain at least one tensor"):
        run_batches(net, [(1,)], [])
