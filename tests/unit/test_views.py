"""View declarations and augmentation policies on real images."""
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from dist_ssl.data.augment import (
    eval_crop, make_views, normalize, sample_crop, stack_views, view_rng)
from dist_ssl.data.views import CropGroup, ViewSpec, eval_view_spec


@pytest.fixture(scope="module")
def photo():
    return Image.fromarray(load_sample_images().images[0])  # 427x640 RGB photo


def _rngs(n, seed=0):
    return [view_rng(seed, v) for v in range(n)]


MULTI = [CropGroup(2, 112, (0.3, 1.0)), CropGroup(4, 48, (0.05, 0.3), blur_p=0.5)]


@pytest.mark.parametrize("policy", ["simclr", "dino", "supervised", "deit"])
@pytest.mark.parametrize("in_chans", [1, 3])
def test_multicrop_shapes(photo, policy, in_chans):
    spec = ViewSpec(MULTI, policy=policy, in_chans=in_chans)
    views = make_views(photo, spec, _rngs(spec.num_views))
    assert [v.shape for v in views] == [(in_chans, 112, 112)] * 2 + [(in_chans, 48, 48)] * 4
    assert all(v.dtype == np.uint8 for v in views)
    raw = stack_views([views[0], views[1]])
    assert raw.shape == (2, in_chans, 112, 112) and raw.dtype == torch.uint8
    batch = normalize(raw, *spec.norm)
    assert batch.shape == (2, in_chans, 112, 112) and batch.dtype == torch.float32
    mean, std = spec.norm
    m, s = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in (mean, std))
    ref = (raw.double() / 255 - m) / s
    assert torch.allclose(batch.double(), ref, atol=1e-5)


def test_grayscale_source_to_three_channels():
    gray = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28), mode="L")
    (v3,) = make_views(gray, ViewSpec([CropGroup(1, 32)], "simclr", in_chans=3), _rngs(1))
    (v1,) = make_views(gray, ViewSpec([CropGroup(1, 32)], "simclr", in_chans=1), _rngs(1))
    assert v3.shape == (3, 32, 32) and v1.shape == (1, 32, 32)
    assert np.array_equal(v3[0], v3[2]) and np.array_equal(v3[:1], v1)


@pytest.mark.parametrize("policy", ["simclr", "dino"])
def test_grayscale_fast_path_equals_rgb_path(photo, policy):
    """A gray source augmented in one channel == the same source converted to RGB first."""
    gray = photo.convert("L").resize((64, 43))
    spec = ViewSpec(MULTI, policy=policy, in_chans=3)
    for seed in range(5):
        fast = make_views(gray, spec, _rngs(6, seed))
        ref = make_views(gray.convert("RGB"), spec, _rngs(6, seed))
        assert all(np.array_equal(a, b) for a, b in zip(fast, ref))


def test_deterministic_given_rng_and_varies_with_it(photo):
    spec = ViewSpec(MULTI, policy="dino")
    a = make_views(photo, spec, _rngs(6, seed=1))
    b = make_views(photo, spec, _rngs(6, seed=1))
    c = make_views(photo, spec, _rngs(6, seed=2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not any(np.array_equal(x, y) for x, y in zip(a, c))
    assert not np.array_equal(a[0], a[1])  # views of one image differ


def test_global_rng_untouched_and_unused(photo):
    spec = ViewSpec(MULTI, policy="simclr")
    torch.manual_seed(0)
    a = make_views(photo, spec, _rngs(6))
    before = torch.rand(1)
    torch.manual_seed(123)
    b = make_views(photo, spec, _rngs(6))
    torch.manual_seed(0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert torch.equal(torch.rand(1), before)


def test_per_group_overrides_solarize(photo):
    """solarize_p=1 on a group inverts bright pixels: a white image becomes black."""
    white = Image.new("RGB", (64, 64), (255, 255, 255))
    spec = ViewSpec([CropGroup(1, 32, solarize_p=1.0, blur_p=0.0), CropGroup(1, 32, blur_p=0.0)],
                    policy="supervised")
    sol, plain = make_views(white, spec, _rngs(2))
    assert sol.max() == 0 and plain.min() == 255


def test_crop_params_within_image():
    rng = view_rng(0)
    for _ in range(200):
        left, top, w, h = sample_crop(rng, 640, 427, (0.08, 1.0), (3 / 4, 4 / 3))
        assert 0 <= left and left + w <= 640 and 0 <= top and top + h <= 427
        assert 0.08 * 640 * 427 * 0.9 <= w * h <= 640 * 427


def test_eval_center_crop_geometry():
    """Resize shorter side to floor(size/crop_pct), center crop: exact pixel positions."""
    h, w = 256, 300
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[..., 0] = (np.arange(w) % 256)[None, :]
    arr[..., 1] = (np.arange(h) % 256)[:, None]
    img = Image.fromarray(arr)
    out = np.asarray(eval_crop(img, 224, 0.875))  # 224/0.875 = 256 = shorter side: no resize
    top, left = 16, 38  # round((256-224)/2), round((300-224)/2)
    assert np.array_equal(out, arr[top:top + 224, left:left + 224])
    small = eval_crop(Image.fromarray(arr[:28, :28]), 24, 0.875)  # upscale 28 -> 27, crop 24
    assert small.size == (24, 24)
    spec = eval_view_spec(224)
    (v,) = make_views(img, spec, _rngs(1))
    assert np.array_equal(v, out.transpose(2, 0, 1))


def test_hook_is_seeded_per_view(photo):
    import random

    def hook(im):  # a global-RNG transform, like timm's RandAugment
        return im.rotate(random.uniform(-30, 30))

    spec = ViewSpec([CropGroup(2, 64)], policy="supervised", hook=hook)
    a = make_views(photo, spec, _rngs(2))
    random.seed(99)
    b = make_views(photo, spec, _rngs(2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_spec_validation():
    with pytest.raises(ValueError):
        ViewSpec([CropGroup(1, 32)], policy="nope")
    with pytest.raises(ValueError):
        CropGroup(0, 32)
    with pytest.raises(ValueError):
        CropGroup(1, 32, scale=(0.5, 0.2))
    with pytest.raises(ValueError):
        ViewSpec([CropGroup(1, 32)], in_chans=1, mean=(0.1, 0.2, 0.3))
    assert ViewSpec([CropGroup(1, 32)], in_chans=1).norm[0] == pytest.approx((0.449,), abs=1e-3)


def test_blur_sigma_scale_scales_the_drawn_blur_only(photo):
    """blur_sigma_scale multiplies the sigma drawn from the policy's range and nothing else: the
    same draws (boxes, jitter) at any scale; scale 0 = the blur-free views; plans carry sigma x s."""
    from dist_ssl.data.crop_plan import plan_views

    groups = [CropGroup(2, 32, (0.3, 1.0), blur_p=1.0)]
    spec = ViewSpec(groups, policy="simclr")
    w, h = photo.size
    base = plan_views(w, h, spec, _rngs(2, seed=3))
    half = plan_views(w, h, ViewSpec(groups, policy="simclr", blur_sigma_scale=0.5), _rngs(2, seed=3))
    for a, b in zip(base, half):
        assert a.box == b.box and a.jitter_factors == b.jitter_factors
        assert b.blur_sigma == pytest.approx(0.5 * a.blur_sigma) and a.blur_sigma > 0.1
    no_blur = make_views(photo, ViewSpec(groups, policy="simclr", blur_sigma_scale=0.0), _rngs(2, seed=3))
    unblurred = make_views(photo, ViewSpec([CropGroup(2, 32, (0.3, 1.0), blur_p=0.0)], policy="simclr"),
                           _rngs(2, seed=3))
    blurred = make_views(photo, spec, _rngs(2, seed=3))
    # blur_p=0 draws no sigma, so its later draws (none here) could shift; boxes/jitter come first
    assert all(np.array_equal(a, b) for a, b in zip(no_blur, unblurred))
    assert not all(np.array_equal(a, b) for a, b in zip(blurred, unblurred))
    with pytest.raises(ValueError, match="blur_sigma_scale"):
        ViewSpec(groups, blur_sigma_scale=-1.0)
