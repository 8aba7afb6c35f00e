"""Core sections every run has: data, train, ckpt. Components register the others."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

from dist_ssl.config.registry import register_section
from dist_ssl.config.schema import doc


@dataclass
class DataConfig:
    train: Optional[str] = doc(None, "training shard directory (made by tools/make_shards.py)")
    val: Optional[str] = doc(None, "evaluation shard directory; empty = no evaluation")
    num_workers: int = doc(2, "DataLoader worker processes per rank")
    drop_last: bool = doc(False, "drop the epoch's last partial global batch instead of padding it")
    decode: Literal["cpu", "gpu"] = doc("cpu", "where training JPEGs are decoded and augmented: cpu = "
                                        "DataLoader workers; gpu = workers ship bytes + crop plans, "
                                        "the training device decodes (torchvision.io.decode_jpeg)")
    reduced_decode: bool = doc(True, "cpu decode: decode a JPEG at 1/2, 1/4 or 1/8 scale when every "
                               "crop of the sample stays at or above its output size")
    pin_memory: bool = doc(True, "pin batches in page-locked memory when training on CUDA")
    non_blocking: bool = doc(True, "asynchronous host-to-device copies of batches")
    blur_sigma_scale: float = doc(1.0, "multiplies the training views' Gaussian-blur sigma (policies' ranges are "
                                  "for 224 px crops): crop size / 224 on small images, 0 = no blur")

    def validate(self) -> None:
        if self.num_workers < 0:
            raise ValueError("num_workers: must be >= 0")
        if self.blur_sigma_scale < 0:
            raise ValueError(f"blur_sigma_scale: must be >= 0, got {self.blur_sigma_scale}")


@dataclass
class TrainConfig:
    batch_size: int = doc(64, "images per process per optimizer micro-step")
    epochs: Optional[int] = doc(None, "training length in epochs (or set steps)")
    steps: Optional[int] = doc(None, "training length in optimizer steps; overrides epochs")
    eval_every_epochs: Optional[int] = doc(None, "also evaluate every k epochs (always at the end)")
    ema_decay: Optional[float] = doc(None, "keep an EMA of the student's weights (e.g. 0.9998); None = off")
    preemption_check_steps: int = doc(10, "agree across ranks on a preemption signal every this many steps (and at "
                                      "epoch ends): a host sync; SLURM's --signal grace is tens of seconds")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")
        if self.epochs is None and self.steps is None:
            raise ValueError("epochs: set train.epochs or train.steps")
        if self.preemption_check_steps < 1:
            raise ValueError(f"preemption_check_steps: must be >= 1, got {self.preemption_check_steps}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in (0, 1), got {self.ema_decay}")
        for key in ("epochs", "steps"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{key}: must be >= 1, got {value}")


@dataclass
class CkptConfig:
    every_steps: int = doc(500, "save a checkpoint every this many optimizer steps (and at the end)")
    keep_last: int = doc(3, "complete checkpoints to keep")

    def validate(self) -> None:
        if self.every_steps < 1:
            raise ValueError("every_steps: must be >= 1")
        if self.keep_last < 1:
            raise ValueError("keep_last: must be >= 1")


register_section("data", DataConfig)
register_section("train", TrainConfig)
register_section("ckpt", CkptConfig)
