"""The trainer's step internals: no host syncs, multi-tensor clipping and AdamW.

Host syncs are caught with FakeTensorMode: a fake tensor has no values, so anything that
needs one (boolean indexing, ``.item()``, a branch on a tensor) raises there."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from ringattn.train.data import IGNORE
from ringattn.train.optim import build_optimizer, clip_grad_norm
from ringattn.train.trainer import Trainer


def _stub_trainer(logits, labels):
    """Just what Trainer._loss uses: _local (the rank's tokens) and the model."""
    tokens = torch.zeros_like(labels)
    pos = torch.arange(labels.shape[1])
    return SimpleNamespace(_local=lambda batch: (tokens, labels, pos), model=lambda t, p: logits)


def test_token_accuracy_counts_only_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 16, 5, generator=g)
    labels = torch.randint(0, 5, (2, 16), generator=g)
    labels[0, :4] = IGNORE
    labels[1, 5] = IGNORE
    loss_sum, correct = Trainer._loss(_stub_trainer(logits, labels), None)
    pred = logits.argmax(-1)
    want = sum(
        int(pred[b, s] == labels[b, s])
        for b in range(2)
        for s in range(16)
        if labels[b, s] != IGNORE
    )
    assert int(correct) == want
    ref = nn.functional.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    assert torch.equal(loss_sum, ref)


def test_token_loss_and_accuracy_need_no_host_sync():
    with FakeTensorMode():
        logits = torch.empty(2, 16, 5)
        labels = torch.zeros(2, 16, dtype=torch.long)
        loss_sum, correct = Trainer._loss(_stub_trainer(logits, labels), None)
    assert loss_sum.shape == () and correct.shape == ()


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += 1
        return func(*args, **(kwargs or {}))


def _params(n: int, seed: int = 0) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    ps = [nn.Parameter(torch.randn(3 + i % 4, 5, generator=g)) for i in range(n)]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    return ps


@pytest.mark.parametrize("max_norm", [0.5, 100.0, 0.0])
def test_clip_grad_norm_matches_torch(max_norm):
    ours, ref = _params(7), _params(7)
    norm = clip_grad_norm(ours, max_norm)
    if max_norm > 0:
        want = float(torch.nn.utils.clip_grad_norm_(ref, max_norm))
    else:
        want = float(torch.nn.utils.get_total_norm([p.grad for p in ref]))
    assert norm == pytest.approx(want, rel=1e-6)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_clip_grad_norm_op_count_does_not_grow_with_parameters():
    """Multi-tensor ops: the same number of ops for 3 and for 30 parameters (a loop per
    parameter issued ~5 ops each)."""
    counts = []
    for n in (3, 30):
        ps = _params(n)
        with CountOps() as c:
            clip_grad_norm(ps, 0.5)
        counts.append(c.n)
    assert counts[0] == counts[1], counts


def test_adamw_is_multi_tensor_and_decays_only_matrices():
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    cfg = SimpleNamespace(weight_decay=0.1, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8)
    opt = build_optimizer(model, cfg)
    assert opt.defaults["foreach"] is True
    for group in opt.param_groups:
        dims = {p.dim() for p in group["params"]}
        assert group["weight_decay"] == (0.1 if dims == {2} else 0.0)
        assert dims == {2} or 2 not in dims
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
