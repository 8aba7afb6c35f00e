"""Tiny, deterministic builds of every registered method, shared by the registry-wide tests
(test_method_registry.py: smoke + expectations, test_golden_losses.py: per-step losses).

A method missing from ``TINY`` is built with its config defaults at 28 px: a newly registered
method is exercised at once; give it small heads here when its defaults are slow.
"""
from __future__ import annotations

import torch

from dist_ssl.config.schema import from_dict
from dist_ssl.methods import Method, MethodConfig, MethodContext, build_method
import dist_ssl.models.factory  # noqa: F401  (registers the tiny ViTs with timm)
from dist_ssl.models.config import ModelConfig

B = 6               # images per batch (even: supervised mixup needs it)
NUM_SAMPLES = 37    # training-set size (IDMM's instance classes; not divisible by 2 or 3)
NUM_CLASSES = 10
# method -> config overrides: small heads and few crops; the point is the wiring, not capacity
TINY: dict[str, dict] = {
    "simclr": dict(proj_hidden_dim=32, proj_dim=16),
    "supcon": dict(proj_hidden_dim=32, proj_dim=16),
    "mocov2": dict(proj_hidden_dim=32, proj_dim=16, queue_size=16),
    "mocov3": dict(proj_hidden_dim=32, proj_dim=16),
    "dino": dict(out_dim=32, hidden_dim=32, bottleneck_dim=16, local_crops=2, local_crop_size=12,
                 warmup_teacher_temp_epochs=2, freeze_last_layer_epochs=0),
    "beit": dict(vocab_size=64, mask_min_block=4),
    "splitmask": dict(vocab_size=64, mask_min_block=4),
    "mae": dict(decoder_dim=32, decoder_depth=1, decoder_heads=2),
    "idmm": dict(global_size=28, local_size=12, local_crops=2),
}
# method -> backbone overrides (IDMM feeds its 12 px local crops to the same ViT)
TINY_MODEL: dict[str, dict] = {"idmm": dict(dynamic_img_size=True)}


def tiny_config(name: str) -> dict:
    """The method config of the tiny build, as recipe keys (``name`` included)."""
    return {"name": name, **TINY.get(name, {})}


def tiny_model_config(name: str, drop_path: float) -> dict:
    return {"name": "vit_pico_patch4_28", "img_size": 28, "in_chans": 1, "drop_path": drop_path,
            **TINY_MODEL.get(name, {})}


def build_tiny(name: str, seed: int = 0, drop_path: float = 0.1) -> Method:
    """The method ``name`` on a 0.46M-parameter ViT for 1-channel 28 px images; parameters
    initialised from ``seed``."""
    torch.manual_seed(seed)
    cfg = from_dict(MethodConfig, tiny_config(name))
    cfg.validate()
    ctx = MethodContext(model=ModelConfig(**tiny_model_config(name, drop_path)), num_samples=NUM_SAMPLES,
                        num_classes=NUM_CLASSES, in_chans=1, total_steps=10, steps_per_epoch=5)
    return build_method(cfg, ctx)


def tiny_batch(method: Method, seed: int = 1) -> dict:
    """Random views of the sizes the method asks for, labels with repeats (SupCon positives),
    instance ids spread over [0, NUM_SAMPLES)."""
    g = torch.Generator().manual_seed(seed)
    views = [torch.randn(B, 1, grp.size, grp.size, generator=g) for grp in method.train_views().view_groups]
    return {"views": views, "label": torch.tensor([0, 1, 0, 2, 1, 0]),
            "index": torch.randperm(NUM_SAMPLES, generator=g)[:B]}


def trainable(method: Method) -> list[tuple[str, torch.nn.Parameter]]:
    """What the engine's optimizers step: the student's and the rank-local modules' parameters."""
    local = {id(p) for m in method.local_modules() for p in m.parameters()}
    student = {id(p) for p in method.student.parameters()}
    return [(n, p) for n, p in method.named_parameters() if p.requires_grad and id(p) in student | local]
