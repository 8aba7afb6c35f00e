"""Symmetric InfoNCE between two embeddings of each image, negatives from the global batch.

InfoNCE (van den Oord et al., "Representation Learning with Contrastive Predictive Coding",
2018) in the symmetric form SplitMask uses between the descriptors of its two patch subsets
(El-Nouby et al., 2021, Sec. 3.1, tau = 0.2): row i of ``z1`` must pick row i of ``z2`` among
all images of the global batch, and vice versa.

Shapes: z1, z2 [N, D] on this rank; [M, D] gathered over ranks (M = sum of every rank's N).
Distributed: the other ranks' rows come through ``all_gather_with_grad``, so the mean over ranks
of this loss (what DDP's gradient averaging optimises) equals the single-process loss on the
concatenated batch, and so do the gradients (tests/dist/test_splitmask_dist.py).
Unlike SimCLR's ``nt_xent`` (dist_ssl.losses.info_nce, whose rank bookkeeping this reuses), the
negatives of a descriptor are only the *other* subset's descriptors of the other images (CPC).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dist_ssl.losses.info_nce import rank_offset
from dist_ssl.parallel.collectives import all_gather_with_grad


def symmetric_info_nce(z1: torch.Tensor, z2: torch.Tensor, tau: float = 0.2,
                       equal_batches: bool = False) -> torch.Tensor:
    """Mean of InfoNCE(z1 -> all z2) and InfoNCE(z2 -> all z1) over this rank's N rows.

    equal_batches: every rank holds the same N (see ``info_nce.rank_offset``).

    Collective when a process group exists: every rank must call it once per step.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"symmetric_info_nce needs two [N, D] tensors, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    z1 = F.normalize(z1.float(), dim=1)
    z2 = F.normalize(z2.float(), dim=1)
    # one gather for both views: a collective per step in forward and one in backward
    all1, all2 = all_gather_with_grad(torch.cat([z1, z2], dim=1)).split(z1.shape[1], dim=1)
    n = z1.shape[0]
    labels = torch.arange(n, device=z1.device) + rank_offset(n, z1.device, equal_batches)
    loss12 = F.cross_entropy(z1 @ all2.t() / tau, labels)
    loss21 = F.cross_entropy(z2 @ all1.t() / tau, labels)
    return 0.5 * (loss12 + loss21)
