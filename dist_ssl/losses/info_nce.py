"""InfoNCE losses over the GLOBAL batch (every rank's samples are negatives for every rank).

Shape legend: [N, D] embeddings of this rank's N samples; [M, D] the same of all ranks
concatenated in rank order (M = sum of every rank's N); [K, D] a queue of K keys.

- :func:`nt_xent`: SimCLR's normalized-temperature cross entropy (Chen et al., 2020, "A Simple
  Framework for Contrastive Learning of Visual Representations", Eq. 1). Both views of every
  sample of the global batch are gathered WITH gradient, so each rank's anchors see 2M - 2
  negatives and the gradient reaches the rank that produced them.
- :func:`queue_info_nce`: MoCo's InfoNCE against a queue of negatives (He et al., 2020, Eq. 1;
  MoCo v2: Chen et al., 2020b). The queue is identical on every rank (see methods/moco_v2.py),
  so no collective is needed here.
- :func:`global_info_nce`: MoCo v3's contrastive loss (Chen, Xie & He, 2021, Alg. 1): queries of
  this rank against the keys of all ranks, the positive being the key of the same image.

Data parallelism: every function returns the MEAN over this rank's anchors. With equal N on
every rank (the train loader guarantees it), the engine's gradient averaging over ranks then
gives exactly the gradient of the single-process loss on the concatenated batch; a caller that
knows the N are equal says so (``equal_batches``) and :func:`rank_offset` then needs no collective.
Collectives go through ``dist_ssl.parallel.collectives``; without a process group they are the identity.
All similarities are computed in float32 (inputs may be bf16/fp16).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from dist_ssl.parallel.collectives import all_gather_cat, all_gather_with_grad, get_rank, get_world_size

__all__ = ["global_info_nce", "nt_xent", "queue_info_nce", "rank_offset"]


def rank_offset(n: int, device: torch.device, equal_batches: bool = False) -> int:
    """Row index of this rank's first sample in the rank-ordered global batch.

    ``equal_batches``: the caller's guarantee that every rank holds the same N (training batches:
    ``MethodContext.equal_rank_batches``), so the offset is rank x N with no collective and no host
    sync. Otherwise (ranks may hold different N) one tiny all_gather of the per-rank sizes and a
    host sync. 0 without a process group.
    """
    if get_world_size() == 1:
        return 0
    if equal_batches:
        return get_rank() * n
    sizes = all_gather_cat(torch.tensor([n], dtype=torch.long, device=device))
    return int(sizes[: get_rank()].sum().item())


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.1,
            equal_batches: bool = False) -> torch.Tensor:
    """SimCLR NT-Xent, mean over this rank's 2N anchors.

    z1, z2: [N, D] projections of the two views (normalised here). Anchor ``z1[i]`` has positive
    ``z2[i]`` and as negatives the other 2M - 2 embeddings of the global batch (itself excluded).
    ``equal_batches``: every rank holds the same N (see :func:`rank_offset`).
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent: expected two [N, D] tensors, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    offset = rank_offset(n, z1.device, equal_batches)
    g1, g2 = all_gather_with_grad(torch.cat([z1, z2], dim=1)).chunk(2, dim=1)  # one gather: [M, D] x 2
    m = g1.shape[0]
    anchors = torch.cat([z1, z2])                                   # [2N, D]
    logits = anchors @ torch.cat([g1, g2]).T / temperature          # [2N, 2M]
    idx = torch.arange(n, device=z1.device) + offset
    self_idx = torch.cat([idx, idx + m])
    pos_idx = torch.cat([idx + m, idx])
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[torch.arange(2 * n, device=z1.device), self_idx] = True
    return F.cross_entropy(logits.masked_fill(self_mask, float("-inf")), pos_idx)


def queue_info_nce(q: torch.Tensor, k: torch.Tensor, queue: Optional[torch.Tensor],
                   temperature: float = 0.2) -> torch.Tensor:
    """MoCo InfoNCE, mean over this rank's N queries.

    q: [N, D] queries (normalised here); k: [N, D] positive keys (normalised here, no gradient);
    queue: [K, D] negative keys, already normalised (None: no negatives, the loss is then 0).
    Logits [N, 1 + K] with the positive in column 0.
    """
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    pos = (q * k).sum(dim=1, keepdim=True)                        # [N, 1]
    if queue is None:
        logits = pos
    else:
        logits = torch.cat([pos, q @ queue.detach().float().T], dim=1)  # [N, 1 + K]
    labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits / temperature, labels)


def global_info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2,
                    equal_batches: bool = False) -> torch.Tensor:
    """MoCo v3 ``ctr(q, k)``: mean over this rank's N queries, scaled by ``2 * temperature``.

    q: [N, D] queries (normalised here); k: [N, D] keys of the same images from the momentum
    encoder (normalised here; gathered from all ranks WITHOUT gradient, as in MoCo v3 where
    keys never carry one). Logits [N, M], the positive of query i at column ``offset + i``.
    The ``2 * temperature`` factor is MoCo v3's, which keeps gradient magnitudes comparable
    across temperatures. ``equal_batches``: every rank holds the same N (see :func:`rank_offset`).
    """
    if q.shape != k.shape or q.ndim != 2:
        raise ValueError(f"global_info_nce: expected two [N, D] tensors, got {tuple(q.shape)} and {tuple(k.shape)}")
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    offset = rank_offset(q.shape[0], q.device, equal_batches)
    keys = all_gather_cat(k)                                      # [M, D]
    logits = q @ keys.T / temperature                             # [N, M]
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2 * temperature)
