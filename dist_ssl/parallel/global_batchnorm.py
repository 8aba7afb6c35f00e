"""BatchNorm over the global batch of all ranks, exact on any device and backend (gloo too).

SimCLR normalises its projection head with BN statistics of the whole batch across devices
("global BN"); per-process statistics let each rank see a different normalisation and make a
data-parallel step differ from the single-process step on the same global batch. PyTorch's
SyncBatchNorm does this on CUDA/XPU only, so this is our own: per channel, the sum and count
of the local batch are all-reduced (mean), then the sum of squared deviations (variance, two
passes for numerical safety), both through the autograd-aware ``torch.distributed.nn``
all-reduce, so gradients flow back to every rank's rows exactly as in the single-process
BatchNorm. Uneven batches per rank are fine (the count is reduced too).

Cost: two all-reduces of 2C+1 floats per BN layer per forward (and two in backward).
Outside training, or in a single process, it is plain BatchNorm. Running statistics use the
global mean and unbiased global variance (as the single-process BN on the whole batch).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GlobalBatchNorm", "convert_to_global_batchnorm"]


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm{1,2,3}d with training statistics over all ranks of the default group."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"GlobalBatchNorm: expected at least 2-D input [N, C, ...], got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0, *range(2, x.dim())]  # every dim but the channel
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float()
        count = xf.new_tensor([x.numel() // max(x.shape[1], 1)])
        stats = dist_fn.all_reduce(torch.cat([xf.sum(dims), count]))
        n = stats[-1]  # kept on the device: no host sync per forward
        mean = stats[:-1] / n
        xc = xf - mean.view(shape)
        var = dist_fn.all_reduce(xc.pow(2).sum(dims)) / n
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n.detach())
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        # momentum None = cumulative moving average, as in _BatchNorm
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
        self.running_var.lerp_((var * n / (n - 1.0).clamp_min(1.0)).to(self.running_var.dtype), m)


def convert_to_global_batchnorm(module: nn.Module) -> tuple[nn.Module, int]:
    """Replace every BatchNorm*d in ``module`` (in place where possible) by GlobalBatchNorm with
    the same parameters and buffers (the very same tensors: optimizers and teachers built
    earlier keep pointing at them). Returns (module, number replaced); names and state_dict
    keys do not change, so checkpoints load either way."""
    count = 0

    def swap(m: nn.Module) -> nn.Module:
        nonlocal count
        if isinstance(m, _BatchNorm) and not isinstance(m, GlobalBatchNorm) and type(m).__name__ != "SyncBatchNorm":
            g = GlobalBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
            if m.affine:
                g.weight, g.bias = m.weight, m.bias
            if m.track_running_stats:
                g.running_mean, g.running_var = m.running_mean, m.running_var
                g.num_batches_tracked = m.num_batches_tracked
            g.train(m.training)
            count += 1
            return g
        for name, child in m.named_children():
            new = swap(child)
            if new is not child:
                setattr(m, name, new)
        return m

    return swap(module), count
