"""Weighted k-NN classifier on frozen features (Wu et al., 2018, "Unsupervised Feature Learning
via Non-Parametric Instance Discrimination"; the protocol DINO, Caron et al., 2021, reports).

Shape legend: [N, D] train features, [M, D] test features, [C] classes, [k] neighbours.

Each test feature votes with its k most cosine-similar train features (features L2-normalised),
neighbour j adding ``exp(sim_j / T)`` to the score of its class. Ties are broken
deterministically, so the result does not depend on topk's internal order or the chunk size:
among train features with equal similarity at the k-th place the lower train row wins; classes
with equal score are ranked by lower class id. Test features are processed ``chunk_size`` rows
at a time: memory is O(chunk_size x N).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["knn_votes", "rank_classes", "topk_accuracy", "knn_accuracy"]


def _neighbours(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Column ids [b, k] of the k largest entries of each row of sim [b, N], ties -> lower id."""
    top = sim.topk(k, dim=1)
    kth = top.values[:, -1:]  # [b, 1] the k-th largest similarity
    idx = top.indices
    tied = (sim >= kth).sum(dim=1) > k  # rows whose k-th place is shared: topk picks arbitrarily
    if bool(tied.any()):
        rows = tied.nonzero().squeeze(1)
        s, th = sim[rows], kth[rows]
        n = sim.shape[1]
        # Unique integer key: rank 0 above the k-th value, 1 equal to it, 2 below; then column id.
        tier = 2 - (s > th).long() - (s >= th).long()
        key = tier * n + torch.arange(n, device=sim.device)
        idx[rows] = key.topk(k, dim=1, largest=False).indices
    return idx


@torch.no_grad()
def knn_votes(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
              num_classes: int, *, k: int = 20, temperature: float = 0.07,
              chunk_size: int = 256) -> torch.Tensor:
    """Class scores [M, C] (float64, CPU): sum over the k nearest train rows of exp(cos_sim / T).

    ``train_feats`` [N, D], ``train_labels`` [N] in [0, C), ``test_feats`` [M, D]; similarities
    are computed on ``test_feats.device``. k is clamped to N.
    """
    if train_feats.shape[0] == 0:
        raise ValueError("knn: no train features")
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(f"knn: need k >= 1, temperature > 0, chunk_size >= 1 "
                         f"(got {k}, {temperature}, {chunk_size})")
    device = test_feats.device
    train = F.normalize(train_feats.float().to(device), dim=1)  # [N, D]
    labels = train_labels.long().cpu()
    k = min(k, train.shape[0])
    out = torch.zeros(test_feats.shape[0], num_classes, dtype=torch.float64)
    for start in range(0, test_feats.shape[0], chunk_size):
        q = F.normalize(test_feats[start:start + chunk_size].float(), dim=1)  # [b, D]
        sim = q @ train.T  # [b, N] cosine similarities: the O(chunk x N) memory
        idx = _neighbours(sim, k)  # [b, k]
        # Add each row's weights in decreasing order, on CPU (CUDA scatter_add uses atomics):
        # classes whose neighbours have equal similarities then get bit-equal scores.
        top, order = sim.gather(1, idx).sort(dim=1, descending=True, stable=True)
        weights = (top.double() / temperature).exp().cpu()  # [b, k]
        out[start:start + q.shape[0]].scatter_add_(1, labels[idx.gather(1, order).cpu()], weights)
    return out


def rank_classes(scores: torch.Tensor) -> torch.Tensor:
    """Class ids [M, C] by decreasing score [M, C]; equal scores -> lower class id first."""
    return torch.sort(scores, dim=1, descending=True, stable=True).indices


def topk_accuracy(ranked: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """{"top1", "top5"} from ranked class ids [M, >=1] and true labels [M].

    With fewer than 5 classes top5 counts the top-C (then it is 1.0).
    """
    if ranked.shape[0] == 0:
        raise ValueError("accuracy of an empty test set")
    hit = ranked[:, :5] == labels.to(ranked.device).view(-1, 1)  # [M, min(5, C)]
    return {"top1": hit[:, 0].float().mean().item(), "top5": hit.any(dim=1).float().mean().item()}


def knn_accuracy(train_feats: torch.Tensor, train_labels: torch.Tensor,
                 test_feats: torch.Tensor, test_labels: torch.Tensor, num_classes: int, *,
                 k: int = 20, temperature: float = 0.07,
                 chunk_size: int = 256) -> dict[str, float]:
    """{"top1", "top5"} of the weighted k-NN classifier (see :func:`knn_votes`) on the test set."""
    scores = knn_votes(train_feats, train_labels, test_feats, num_classes, k=k,
                       temperature=temperature, chunk_size=chunk_size)
    return topk_accuracy(rank_classes(scores), test_labels)
