"""What views a method asks of the data: crop groups + an augmentation policy.

A method declares a :class:`ViewSpec`; the loader turns each decoded image into
``sum(g.count for g in groups)`` crops, in group order. In a batch as a method receives it
(after ``TrainLoader.to_device``), ``views[i]`` is a normalised float tensor [B, C, H, W]
(B = batch, C = ``in_chans``, H = W = the size of crop i's group).

Examples::

    # SimCLR (Chen et al., 2020): two 224 crops
    ViewSpec([CropGroup(2, 224)], policy="simclr")
    # DINO (Caron et al., 2021): 2 global + 6 local crops, per-view blur/solarize
    ViewSpec([CropGroup(1, 224, (0.4, 1.0), blur_p=1.0),
              CropGroup(1, 224, (0.4, 1.0), blur_p=0.1, solarize_p=0.2),
              CropGroup(6, 96, (0.05, 0.4), blur_p=0.5)], policy="dino")
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
POLICIES = ("simclr", "dino", "supervised", "deit", "eval")


@dataclass(frozen=True)
class CropGroup:
    """``count`` crops of ``size`` x ``size`` pixels sharing one crop/augmentation recipe."""

    count: int
    size: int
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area fraction range
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range
    blur_p: Optional[float] = None  # overrides the policy's Gaussian-blur probability
    solarize_p: Optional[float] = None  # overrides the policy's solarization probability
    crop_pct: float = 0.875  # eval policy only: resize to size/crop_pct, then center crop

    def __post_init__(self):
        if self.count < 1 or self.size < 1:
            raise ValueError(f"CropGroup needs count>=1 and size>=1, got {self}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"CropGroup.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"CropGroup.ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        for name in ("blur_p", "solarize_p"):
            p = getattr(self, name)
            if p is not None and not 0 <= p <= 1:
                raise ValueError(f"CropGroup.{name} must be in [0, 1], got {p}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"CropGroup.crop_pct must be in (0, 1], got {self.crop_pct}")


@dataclass(frozen=True)
class ViewSpec:
    """Crop groups + policy name + channel handling; see the module docstring."""

    groups: list[CropGroup]
    policy: str = "simclr"  # one of POLICIES
    in_chans: int = 3  # 3: grayscale sources are replicated to RGB; 1: converted to "L"
    mean: Optional[tuple[float, ...]] = None  # default: ImageNet (mean of it for in_chans=1)
    std: Optional[tuple[float, ...]] = None
    # Optional PIL -> PIL transform applied to every crop after the policy (e.g. a timm
    # RandAugment). It may use Python/numpy/torch global RNGs: they are seeded per crop.
    hook: Optional[Callable] = field(default=None, compare=False)
    # Multiplies every drawn Gaussian-blur sigma (the policies' ranges are in pixels of 224 px
    # crops): e.g. 16 / 224 keeps the blur's size relative to a 16 px crop; 0 = no blur.
    blur_sigma_scale: float = 1.0

    def __post_init__(self):
        if not self.groups:
            raise ValueError("ViewSpec needs at least one CropGroup")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {POLICIES}")
        if not self.blur_sigma_scale >= 0:
            raise ValueError(f"ViewSpec.blur_sigma_scale must be >= 0, got {self.blur_sigma_scale}")
        if self.in_chans not in (1, 3):
            raise ValueError(f"in_chans must be 1 or 3, got {self.in_chans}")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None and len(v) != self.in_chans:
                raise ValueError(f"ViewSpec.{name} needs {self.in_chans} values, got {v}")

    @property
    def num_views(self) -> int:
        return sum(g.count for g in self.groups)

    @property
    def view_groups(self) -> list[CropGroup]:
        """The group of every view, in view order."""
        return [g for g in self.groups for _ in range(g.count)]

    @property
    def norm(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) with the ImageNet defaults resolved for ``in_chans``."""
        if self.in_chans == 3:
            return tuple(self.mean or IMAGENET_MEAN), tuple(self.std or IMAGENET_STD)
        mean = self.mean or (sum(IMAGENET_MEAN) / 3,)
        std = self.std or (sum(IMAGENET_STD) / 3,)
        return tuple(mean), tuple(std)


def eval_view_spec(size: int, in_chans: int = 3, crop_pct: float = 0.875,
                   mean=None, std=None) -> ViewSpec:
    """One resize + center-crop view (timm's eval transform geometry)."""
    return ViewSpec([CropGroup(1, size, crop_pct=crop_pct)], policy="eval",
                    in_chans=in_chans, mean=mean, std=std)
