"""Out-of-range targets of the sharded soft-target loss raise instead of giving a finite loss.

An id outside [0, N) falls in no class block, so without the check its target term is silently 0
(a finite, wrong loss). The 2-rank case (every rank raises together) is in
tests/dist/test_sharded_fc_dist.py.
"""
import pytest
import torch

from dist_ssl.parallel.sharded_fc import ShardedLinear
from dist_ssl.parallel.sharded_soft_ce import sharded_soft_cross_entropy

N, D = 10, 4


@pytest.mark.parametrize("bad", [10, 999999, -1])
@pytest.mark.parametrize("which", ["a", "b"])
@pytest.mark.parametrize("chunk", [None, 1])
def test_target_outside_num_classes_raises(bad, which, chunk):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, D, generator=g), torch.randn(N, D, generator=g)
    good = torch.tensor([0, 9, 4])
    wrong = torch.tensor([0, bad, 4])
    a, b = (wrong, good) if which == "a" else (good, wrong)
    with pytest.raises(ValueError, match=rf"outside \[0, 10\) \(e\.g\. {bad}\)"):
        sharded_soft_cross_entropy(x, w, 0, N, a, b, torch.full((3,), 0.5), chunk_size=chunk)


def test_targets_at_the_edges_are_accepted():
    mod = ShardedLinear(N, D)
    ids = torch.tensor([0, N - 1])
    loss = mod.loss(torch.randn(2, D), ids, ids.flip(0), torch.tensor([0.3, 1.0]), smoothing=0.1)
    assert torch.isfinite(loss)
