"""Supervised training and fine-tuning with the DeiT recipe (Touvron et al., 2021).

From scratch, or initialised from a pre-trained backbone (``init_from``: an exported
``backbone.safetensors`` or a run directory holding one): the absolute position embedding is
resampled when the resolution changes (112 -> 224 -> 448) and the head is re-initialised,
unless ``init_head``: then the classifier the earlier run exported (``head.safetensors``, its
class count equal to this run's) is loaded too. That is the continuation of the IDMM paper's
Table 3 (224 px fine-tune, then 100 epochs at 448 px), where the official code loads every
shape-matching key of the 224 px checkpoint, the classifier included. The run exports its own
head (``exports_head``) so that it can be continued.
Mixup / CutMix / label smoothing use timm's ``Mixup`` + ``SoftTargetCrossEntropy``,
RandAugment timm's ``rand_augment_transform`` (a PIL hook of the view spec), random erasing
timm's ``RandomErasing`` on the normalised batch, drop path the backbone's own.

``drloc=true`` adds the dense relative localization loss of Liu et al., "Efficient Training of
Visual Transformers with Small Datasets" (NeurIPS 2021): total = CE + drloc_lambda * L_drloc.
The student then is a ``DRLocStudent`` (backbone + localization MLP, one data-parallel module);
``backbone()`` still returns the bare timm model. Pairs are drawn from (step, instance ids).

Shapes: x [B, C, H, W]; logits [B, K] (K = semantic classes of the training manifest).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from dist_ssl.config.errors import ConfigError
from dist_ssl.data.masking import batch_generator
from dist_ssl.data.views import CropGroup, ViewSpec
from dist_ssl.errors import first_line
from dist_ssl.heads.drloc import DRLocStudent
from dist_ssl.losses.drloc import drloc_loss
from dist_ssl.methods.base import Method, MethodContext
from dist_ssl.methods.configs.supervised import SupervisedConfig
from dist_ssl.methods.registry import register_method
from dist_ssl.models.export import load_backbone_file, load_head_file, read_export_metadata
from dist_ssl.models.factory import create_backbone
from dist_ssl.models.pos_embed import LoadReport, load_backbone_state
from dist_ssl.run_files import BACKBONE_FILE, HEAD_FILE

log = logging.getLogger(__name__)


def resolve_init_path(init_from: str) -> Path:
    """A backbone file, or a run directory that holds one; clear error otherwise."""
    path = Path(init_from)
    if path.is_dir():
        path = path / BACKBONE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"method.init_from: no backbone file at {path} "
                                f"(give a {BACKBONE_FILE} or the run directory that wrote it)")
    return path


def _saved_head(backbone_path: Path, num_classes: int) -> dict[str, torch.Tensor]:
    """The head.safetensors beside ``backbone_path``, checked against this run's class count."""
    path = backbone_path.with_name(HEAD_FILE)
    if not path.is_file():
        raise ConfigError("method.init_head", f"no {HEAD_FILE} beside {backbone_path} (only supervised runs "
                          "export their classifier; a pre-trained backbone has none): set method.init_head=false "
                          "for a new head")
    saved = int(read_export_metadata(path).get("num_classes", 0))
    if saved != num_classes:
        raise ConfigError("method.init_head", f"{path} is a {saved}-class head but data.train has {num_classes} "
                          f"classes: set method.init_head=false for a new head")
    return load_head_file(path)


def _read_backbone(path: Path) -> dict[str, torch.Tensor]:
    """The export's tensors; a file that is not safetensors is a one-line ConfigError."""
    try:
        return load_backbone_file(path)  # safetensors: no pickle, no code run
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for bad headers
        raise ConfigError("method.init_from", f"{path} is not a safetensors backbone file "
                          f"({first_line(e, 400)}); give the backbone.safetensors a dist_ssl run "
                          f"exported") from None


def init_from_export(net: nn.Module, path: Path, keep_head: bool, num_classes: int,
                     model_name: str) -> LoadReport:
    """Load an export into ``net`` (pos_embed resampled), with its saved head when ``keep_head``.
    Tensors that do not fit the model (another channel count, width, depth) are a one-line
    ConfigError naming the key."""
    state = _read_backbone(path)
    if keep_head:
        state.update(_saved_head(path, num_classes))
    try:
        report = load_backbone_state(net, state, keep_head=keep_head)
    except ValueError as e:
        raise ConfigError("method.init_from", f"{path} does not fit model.name={model_name} "
                          f"with these model settings ({first_line(e, 400)}); match model.in_chans / "
                          f"model.name to the pre-training run") from None
    if keep_head and (report.head_dropped or not report.head_loaded):
        raise ConfigError("method.init_head", f"the head beside {path} does not fit {type(net).__name__}'s "
                          f"classifier ({report.head_dropped or 'no head keys'}): set method.init_head=false")
    log.info("init_from %s: %d backbone tensors%s; classifier %s", path,
             len(state) - len(report.head_loaded) - len(report.head_dropped),
             f", {list(report.resampled)} resampled" if report.resampled else "",
             f"loaded from {HEAD_FILE} ({num_classes} classes)" if report.head_loaded else "re-initialised")
    return report


@register_method("supervised")
class Supervised(Method):
    config_class = SupervisedConfig
    exports_head = True  # head.safetensors, so the next stage can continue with the classifier

    def __init__(self, cfg: SupervisedConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        model_cfg = ctx.model
        model_cfg.num_classes = ctx.num_classes
        net = create_backbone(model_cfg)
        if cfg.init_from:
            self.init_report = init_from_export(net, resolve_init_path(cfg.init_from), cfg.init_head,
                                                ctx.num_classes, model_cfg.name)
        self.student = DRLocStudent(net, cfg.drloc_grid) if cfg.drloc else net
        self.seed = int(ctx.seed)
        self.crop_size = cfg.crop_size or model_cfg.img_size or 224
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                               switch_prob=cfg.mix_switch_prob, label_smoothing=cfg.label_smoothing,
                               num_classes=ctx.num_classes)
        self.erasing = (RandomErasing(cfg.random_erasing, mode="pixel", device="cpu")
                        if cfg.random_erasing > 0 else None)

    def train_views(self) -> ViewSpec:
        hook = None
        if self.cfg.randaugment:
            # timm's RandAugment wants the fill colour as 0-255 ints of the image mode.
            hook = rand_augment_transform(self.cfg.randaugment, {"img_mean": (124, 116, 104)})
        return ViewSpec([CropGroup(1, self.crop_size, tuple(self.cfg.crop_scale))],
                        policy=self.cfg.policy, in_chans=self.ctx.in_chans, hook=hook)

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Any]:
        x, y = batch["views"][0], batch["label"]
        if self.erasing is not None:
            self.erasing.device = x.device  # timm draws the erasing noise on this device
            x = self.erasing(x)
        if self.mixup is not None:
            if x.shape[0] % 2:
                raise ValueError("mixup/CutMix need an even per-process batch size")
            x, soft = self.mixup(x, y)
            logits, aux = self._forward_student(x, batch, step)
            loss = SoftTargetCrossEntropy()(logits, soft)
        else:
            logits, aux = self._forward_student(x, batch, step)
            loss = F.cross_entropy(logits, y, label_smoothing=self.cfg.label_smoothing)
        acc = (logits.detach().argmax(-1) == y).float().mean()
        logs = {"ce": loss.detach(), "train_acc": acc}
        if aux is not None:
            logs["drloc"] = aux.detach()
            loss = loss + self.cfg.drloc_lambda * aux
        return {"loss": loss, "logs": logs}

    def _forward_student(self, x: torch.Tensor, batch: dict[str, Any], step: int):
        """(logits [B, K], DRLoc loss or None) from one student call."""
        if not self.cfg.drloc:
            return self.student(x), None
        g = batch_generator(self.seed, step, batch["index"], salt=1)
        u = torch.rand(x.shape[0], self.cfg.drloc_pairs, 4, generator=g).to(x.device)
        logits, pred, target = self.student(x, u)
        return logits, drloc_loss(pred, target)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, K] for evaluation (through the possibly wrapped student)."""
        return self.student(x)

    def backbone(self) -> nn.Module:
        from dist_ssl.models.export import unwrap_model

        net = unwrap_model(self.student)
        return net.backbone if isinstance(net, DRLocStudent) else net
