"""SplitMask's InfoNCE and a whole SplitMask step over 2 gloo processes equal one process on the
concatenated batch (losses and gradients), also with uneven per-rank batches."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
import _splitmask_worker as W  # noqa: E402

from dist_ssl.losses.symmetric_info_nce import symmetric_info_nce  # noqa: E402

pytestmark = pytest.mark.dist


def reference_per_row(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.2) -> torch.Tensor:
    """[M] symmetric InfoNCE of every row against the whole batch, written out directly."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    s = z1 @ z2.t() / tau
    row = -(s.diag() - s.logsumexp(dim=1))          # z1[i] picks z2[i]
    col = -(s.diag() - s.t().logsumexp(dim=1))      # z2[i] picks z1[i]
    return 0.5 * (row + col)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("splitmask_dist")
    mp.start_processes(W.run, args=(str(out / "init"), str(out)), nprocs=W.WORLD, join=True,
                       start_method="spawn")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(W.WORLD)]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("split", ["equal", "uneven"])
def test_info_nce_two_processes_equal_one_process(results, split):
    z1, z2 = (z.clone().requires_grad_() for z in W.embeddings())
    bounds = W.SPLITS[split]
    per_row = reference_per_row(z1, z2)
    # the objective the ranks optimise together: sum over ranks of each rank's mean
    total = sum(per_row[bounds[r]:bounds[r + 1]].mean() for r in range(W.WORLD))
    total.backward()
    for r in range(W.WORLD):
        lo, hi = bounds[r], bounds[r + 1]
        got = results[r][split]
        assert torch.allclose(got["loss"], per_row[lo:hi].mean().detach(), atol=1e-6)
        assert torch.allclose(got["grad1"], z1.grad[lo:hi], atol=1e-6)
        assert torch.allclose(got["grad2"], z2.grad[lo:hi], atol=1e-6)
    sizes = torch.tensor([bounds[r + 1] - bounds[r] for r in range(W.WORLD)], dtype=torch.float32)
    losses = torch.stack([results[r][split]["loss"] for r in range(W.WORLD)])
    full = symmetric_info_nce(*W.embeddings(), tau=0.2)  # one process, concatenated batch
    assert torch.allclose((sizes * losses).sum() / sizes.sum(), full, atol=1e-6)


@pytest.mark.timeout(180)
def test_splitmask_step_two_processes_equal_one_process(results):
    method = W.splitmask_method()
    out = method(W.splitmask_batch(), step=5)
    out["loss"].backward()
    ranks = [results[r]["splitmask"] for r in range(W.WORLD)]
    assert torch.allclose(sum(r["loss"] for r in ranks) / W.WORLD, out["loss"].detach(), atol=1e-5)
    assert torch.allclose(sum(r["info_nce"] for r in ranks) / W.WORLD, out["logs"]["info_nce"], atol=1e-5)
    ref = W.flat_grads(method.student)
    assert torch.equal(ranks[0]["grad"], ranks[1]["grad"])
    assert torch.allclose(ranks[0]["grad"], ref, rtol=1e-4, atol=1e-6), (ranks[0]["grad"] - ref).abs().max()
