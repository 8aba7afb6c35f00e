"""Supervised contrastive loss over the global batch (Khosla et al., 2020, "Supervised
Contrastive Learning", Eq. 2, the "L_out" form).

Shape legend: [N, V, D] embeddings of this rank's N samples in V views; [M, V, D] all ranks'
(gathered in rank order, WITH gradient); labels [N] / [M].

For anchor a (one view of one local sample), P(a) = every other view-embedding in the global
batch with the same label (the other views of the same image included), A(a) = every view-
embedding except a itself::

    loss_a = -(T / T_base) / |P(a)| * sum_{p in P(a)} log( exp(z_a.z_p / T) / sum_{b in A(a)} exp(z_a.z_b / T) )

The result is the mean of loss_a over this rank's N*V anchors; with equal N per rank the
engine's gradient averaging gives the single-process gradient on the concatenated batch.
With labels = unique instance ids and V = 2 this is SimCLR's NT-Xent.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from dist_ssl.losses.info_nce import rank_offset
from dist_ssl.parallel.collectives import all_gather_cat, all_gather_with_grad

__all__ = ["supcon_loss"]


def supcon_loss(features: Union[torch.Tensor, Sequence[torch.Tensor]], labels: torch.Tensor,
                temperature: float = 0.1, base_temperature: Optional[float] = None,
                equal_batches: bool = False) -> torch.Tensor:
    """SupCon loss, mean over this rank's anchors.

    features: [N, V, D] or a list of V tensors [N, D] (normalised here); labels: [N] ints.
    base_temperature: T_base in the scale T / T_base (None = T, i.e. no rescaling; Khosla et
    al.'s code uses 0.07 for both). equal_batches: every rank holds the same N (``rank_offset``).
    """
    z = torch.stack(list(features), dim=1) if not isinstance(features, torch.Tensor) else features
    if z.ndim != 3 or labels.shape != z.shape[:1]:
        raise ValueError(f"supcon_loss: expected features [N, V, D] and labels [N], got "
                         f"{tuple(z.shape)} and {tuple(labels.shape)}")
    n, v, _ = z.shape
    z = F.normalize(z.float(), dim=-1)
    offset = rank_offset(n, z.device, equal_batches)
    gz = all_gather_with_grad(z)                                  # [M, V, D]
    gl = all_gather_cat(labels)                                   # [M]
    m = gz.shape[0]
    anchors = z.transpose(0, 1).reshape(v * n, -1)                # [V*N, D], view-major
    contrast = gz.transpose(0, 1).reshape(v * m, -1)              # [V*M, D], view-major
    logits = anchors @ contrast.T / temperature                   # [V*N, V*M]
    rows = torch.arange(v * n, device=z.device)
    self_col = (rows // n) * m + offset + rows % n                # anchor's own column
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, self_col] = True
    pos = (labels.repeat(v)[:, None] == gl.repeat(v)[None, :]) & ~self_mask
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    num_pos = pos.sum(dim=1)
    if bool((num_pos == 0).any()):  # only possible with V = 1 and a label seen once globally
        raise ValueError("supcon_loss: an anchor has no positive; use V >= 2 views")
    mean_log_prob_pos = log_prob.masked_fill(~pos, 0.0).sum(dim=1) / num_pos
    scale = temperature / (base_temperature if base_temperature is not None else temperature)
    return -scale * mean_log_prob_pos.mean()
