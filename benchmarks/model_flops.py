"""Parameters and FLOPs at 224 px of the T2T-ViT and CvT backbones, next to the papers' numbers.

    python benchmarks/model_flops.py [--size 224] [--models t2t_vit_7,cvt_13,...]

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one [1, 3, S, S] forward
(eval mode): matmuls, convolutions and attention kernels, 2 FLOPs per multiply-add; softmax,
exp, norms and activations are not counted, as in the papers' tools. The papers report
multiply-accumulates ("MACs"; CvT's table says "FLOPs" but counts the same way, its ResNet-50
row is 4.1G), so the comparable column is GMACs = FLOPs / 2.

Papers' numbers (1,000 classes, 224 px):
- T2T-ViT (Yuan et al., ICCV 2021, Table 2 and the official README): T2T-ViT-7 4.3M / 1.1G MACs
  (README: 1.1G); T2T-ViT-14 21.5M / 4.8G (README's later table: 5.2G, counted with another
  tool); T2T-ViT_t-14 (transformer T2T layers) 21.5M / 6.1G.
- CvT (Wu et al., ICCV 2021, Table 2): CvT-13 20M / 4.5G.
- DRLoc (Liu et al., NeurIPS 2021, Table 3) quotes parameters only: CvT-13 20M, T2T-ViT-14 22M.
Parameter counts: "trainable" is ``sum(p.numel() for p in model.parameters())``; "+fixed" adds
T2T-ViT's fixed sinusoid table and performer random features (frozen ``nn.Parameter``s in the
official code, so counted in the papers; buffers here).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import timm  # noqa: E402

import dist_ssl.models.factory  # noqa: E402,F401  (registers t2t_vit_* and cvt_* with timm)

# name -> (create_model kwargs, paper params M, paper GMACs, source)
PAPER = {
    "t2t_vit_7": ({}, 4.3, 1.1, "T2T-ViT Table 2"),
    "t2t_vit_14": ({}, 21.5, 4.8, "T2T-ViT Table 2 (README: 5.2)"),
    "t2t_vit_14_t": (dict(tokens_type="transformer"), 21.5, 6.1, "T2T-ViT Table 2, T2T-ViT_t-14"),
    "cvt_13": ({}, 20.0, 4.5, "CvT Table 2"),
    "deit_tiny_patch16_224": ({}, 5.7, 1.3, "DeiT Table 1 (reference row)"),
}


def count(name: str, size: int) -> dict:
    kwargs, params_m, gmacs, source = PAPER[name]
    arch = "t2t_vit_14" if name == "t2t_vit_14_t" else name
    torch.manual_seed(0)
    extra = {"img_size": size} if timm.models.get_pretrained_cfg_value(arch, "fixed_input_size") else {}
    model = timm.create_model(arch, num_classes=1000, **kwargs, **extra).eval()
    trainable = sum(p.numel() for p in model.parameters())
    fixed = sum(b.numel() for n, b in model.named_buffers() if n == "pos_embed" or n.endswith(".w"))
    # the math SDPA backend runs attention as explicit matmuls, which the counter sees (the fused
    # CPU kernel is not in its table and would count as 0)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 3, size, size))
    flops = counter.get_total_flops()
    return dict(name=name, trainable=trainable, fixed=fixed, gflops=flops / 1e9, gmacs=flops / 2e9,
                paper_params=params_m, paper_gmacs=gmacs, source=source)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--models", default=",".join(PAPER))
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"{'model':24s} {'params M':>9s} {'+fixed M':>9s} {'paper M':>8s} {'GFLOPs':>7s} {'GMACs':>6s} "
          f"{'paper GMACs':>11s} {'ratio':>6s}  source  ({args.size} px)")
    for name in args.models.split(","):
        r = count(name, args.size)
        print(f"{r['name']:24s} {r['trainable'] / 1e6:9.3f} {(r['trainable'] + r['fixed']) / 1e6:9.3f} "
              f"{r['paper_params']:8.1f} {r['gflops']:7.2f} {r['gmacs']:6.2f} {r['paper_gmacs']:11.1f} "
              f"{r['gmacs'] / r['paper_gmacs']:6.2f}  {r['source']}")


if __name__ == "__main__":
    main()
