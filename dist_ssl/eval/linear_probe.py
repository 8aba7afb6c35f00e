"""Linear probe on frozen, pre-extracted features (the linear evaluation protocol of
Zhang et al., 2016 / Chen et al., 2020 (SimCLR), fitted here on cached features).

Shape legend: [N, D] train features, [M, D] test features, [C] classes.

Features are standardised with the train mean/std; then multinomial logistic regression
(zero-initialised W [C, D], b [C]) minimises ``mean CE + wd / 2 * ||W||^2`` with full-batch
L-BFGS (strong-Wolfe line search) for ``epochs`` iterations: each iteration is at least one
pass over all train features. Full batch converges in ~100 iterations where mini-batch SGD/Adam
needs lr tuning and many more passes, and it has no sampling noise: the result is a function
of the inputs only. ``wd`` relates to scikit-learn's ``C`` as ``wd = 1 / (C * N)``. With several
weight decays a seeded ``val_fraction`` of the train set picks one, which is then refitted on
the whole train set. Memory: the features, plus logits [N, C] and their gradient.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dist_ssl.eval.knn import topk_accuracy

__all__ = ["LinearProbeConfig", "Standardizer", "train_linear", "linear_probe"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearProbeConfig:
    """Optimisation of the probe; the defaults suit N ~ 1k-100k, D <= 1024 on a CPU."""

    epochs: int = 100  # full-batch L-BFGS iterations (line-search evaluations come on top)
    weight_decays: tuple[float, ...] = (1e-4,)  # L2 coefficient on W; > 1 value = a sweep
    val_fraction: float = 0.1  # train share held out to pick the weight decay (sweep only)
    seed: int = 0

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"linear probe: need epochs >= 1, got {self.epochs}")
        if not self.weight_decays or any(wd < 0 for wd in self.weight_decays):
            raise ValueError(f"linear probe: weight_decays must be >= 0, got {self.weight_decays}")
        if len(self.weight_decays) > 1 and not 0 < self.val_fraction < 1:
            raise ValueError(f"linear probe: val_fraction must be in (0, 1), got {self.val_fraction}")


class Standardizer:
    """x -> (x - mean) / std with statistics of the train features [N, D] (std floored)."""

    def __init__(self, train_feats: torch.Tensor, eps: float = 1e-6):
        x = train_feats.double()
        self.mean = x.mean(dim=0).float()  # [D]
        self.std = x.std(dim=0, unbiased=False).clamp_min(eps).float()  # [D]

    def __call__(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats.float() - self.mean.to(feats.device)) / self.std.to(feats.device)


def train_linear(x: torch.Tensor, y: torch.Tensor, num_classes: int, cfg: LinearProbeConfig,
                 weight_decay: float) -> torch.nn.Linear:
    """Fit a linear layer D -> C on standardised x [N, D], labels y [N]; on ``x.device``."""
    layer = torch.nn.Linear(x.shape[1], num_classes).to(x.device)
    torch.nn.init.zeros_(layer.weight)  # convex problem: zero init, no RNG needed
    torch.nn.init.zeros_(layer.bias)
    y = y.long().to(x.device)
    opt = torch.optim.LBFGS(layer.parameters(), lr=1.0, max_iter=cfg.epochs, history_size=20,
                            tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(layer(x), y) + 0.5 * weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)  # runs up to cfg.epochs iterations, stops early once converged
    iters = int(opt.state[layer.weight].get("n_iter", 0))
    if iters >= cfg.epochs:  # ill-conditioned features (e.g. a random-init ViT) converge slowly
        log.info("linear probe: stopped at the %d-iteration cap before converging "
                 "(more epochs may change the accuracy)", iters)
    layer.n_iter = iters  # how many L-BFGS iterations ran, for the report
    return layer.eval().requires_grad_(False)


@torch.no_grad()
def _accuracy(layer: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    logits = layer(x)  # [M, C]; argsort ranks ties by lower class id like the k-NN
    return topk_accuracy(torch.sort(logits, dim=1, descending=True, stable=True).indices, y)


def _pick_weight_decay(x: torch.Tensor, y: torch.Tensor, num_classes: int,
                       cfg: LinearProbeConfig) -> tuple[float, dict[str, float]]:
    """Best weight decay by top-1 on a seeded held-out part of train; ties -> the first listed."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    n_val = max(1, int(round(cfg.val_fraction * x.shape[0])))
    val, fit = perm[:n_val], perm[n_val:]
    scores: dict[str, float] = {}
    for wd in cfg.weight_decays:
        layer = train_linear(x[fit], y[fit], num_classes, cfg, wd)
        scores[repr(wd)] = _accuracy(layer, x[val], y[val])["top1"]
        log.info("linear probe: wd %g -> held-out top1 %.4f", wd, scores[repr(wd)])
    best = max(cfg.weight_decays, key=lambda wd: scores[repr(wd)])  # max keeps the first tie
    return best, scores


def linear_probe(train_feats: torch.Tensor, train_labels: torch.Tensor,
                 test_feats: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
                 cfg: LinearProbeConfig = LinearProbeConfig(),
                 device: torch.device | str = "cpu") -> dict:
    """Train on train_feats [N, D] / train_labels [N], report on test_feats [M, D].

    Returns {"top1", "top5", "train_top1", "weight_decay", "iterations" (L-BFGS iterations run),
    "val_top1": {wd: top1} (sweep only)}.
    """
    cfg.validate()
    if train_feats.shape[0] == 0:
        raise ValueError("linear probe: no train features")
    norm = Standardizer(train_feats)
    x, y = norm(train_feats.to(device)), train_labels.long().to(device)
    result: dict = {}
    wd = cfg.weight_decays[0]
    if len(cfg.weight_decays) > 1:
        wd, result["val_top1"] = _pick_weight_decay(x, y, num_classes, cfg)
    layer = train_linear(x, y, num_classes, cfg, wd)
    test = _accuracy(layer, norm(test_feats.to(device)), test_labels)
    result.update(top1=test["top1"], top5=test["top5"], weight_decay=wd,
                  train_top1=_accuracy(layer, x, y)["top1"], iterations=layer.n_iter)
    return result
