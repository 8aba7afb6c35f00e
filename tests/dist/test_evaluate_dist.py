"""evaluate_topk: top-1/top-5 over ranks with uneven eval batches equals the plain computation on
all samples in one process; a rank without eval data fails on every rank (no hang); a method
without a classifier costs one batch.

The "method" is a fixed linear classifier (a real nn.Module with ``classify``): what is under
test is the streaming, the equal number of forward calls per rank and the reduction.
"""
from __future__ import annotations

import datetime
import json

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from dist_ssl.engine.evaluate import evaluate_topk

pytestmark = pytest.mark.dist

K, D = 7, 5


class LinearProbe(nn.Module):
    """classify(x) = x @ W^T; counts its forward calls (every rank must make the same number)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(D, K, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(K, D, generator=torch.Generator().manual_seed(1)))
        self.calls = 0

    def classify(self, x):
        self.calls += 1
        return self.fc(x)


class NoClassifier(nn.Module):
    def classify(self, x):
        return None


def data(n: int):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, D, generator=g), torch.randint(0, K, (n,), generator=g)


def batches(x, y, sizes):
    out, lo = [], 0
    for s in sizes:
        out.append({"views": [x[lo:lo + s]], "label": y[lo:lo + s]})
        lo += s
    return out


def reference(x, y) -> dict:
    logits = LinearProbe().classify(x)
    top = logits.topk(5, dim=-1).indices
    return {"top1": (top[:, 0] == y).sum().item() / len(y),
            "top5": (top == y[:, None]).any(-1).sum().item() / len(y), "num_samples": len(y)}


PER_RANK = {"uneven": [[4, 4, 3], [4]], "empty_rank": [[4, 3], []]}


def _worker(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    x, y = data(15)
    res = {}
    # uneven: rank 0 holds samples 0..10 in 3 batches, rank 1 samples 11..14 in 1 batch
    sizes = PER_RANK["uneven"][rank]
    lo = 0 if rank == 0 else sum(PER_RANK["uneven"][0])
    probe = LinearProbe()
    res["uneven"] = evaluate_topk(probe, batches(x[lo:], y[lo:], sizes), torch.device("cpu"), 2)
    res["calls"] = probe.calls
    try:
        evaluate_topk(LinearProbe(), batches(x, y, PER_RANK["empty_rank"][rank]), torch.device("cpu"), 2)
        res["empty_rank"] = "no error"
    except RuntimeError as exc:
        res["empty_rank"] = str(exc)
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(res, f)
    dist.destroy_process_group()


def test_two_ranks_uneven_batches_equal_one_process(tmp_path):
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    x, y = data(15)
    ref = reference(x, y)
    for r in res:
        assert r["uneven"]["num_samples"] == 15
        assert r["uneven"]["top1"] == pytest.approx(ref["top1"], abs=1e-12)
        assert r["uneven"]["top5"] == pytest.approx(ref["top5"], abs=1e-12)
        assert r["calls"] == 3  # rank 1 repeats its one batch twice (discarded) to match rank 0
        assert "a rank got no eval samples" in r["empty_rank"]  # on both ranks, none left hanging


def test_single_process_matches_reference_and_stops_after_one_batch_without_classifier():
    x, y = data(15)
    assert evaluate_topk(LinearProbe(), batches(x, y, [6, 6, 3]), torch.device("cpu"), 1) == \
        pytest.approx(reference(x, y))
    pulled = []

    def loader():
        for b in batches(x, y, [5, 5, 5]):
            pulled.append(1)
            yield b

    assert evaluate_topk(NoClassifier(), loader(), torch.device("cpu"), 1) is None
    assert len(pulled) == 1
