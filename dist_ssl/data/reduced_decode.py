"""A sample's views from one decode at the smallest JPEG scale that still serves every crop.

Order of work per sample (CPU path):

1. parse the header (``open_sample``): size (upright, after the EXIF orientation) and mode,
   nothing decoded;
2. draw every view's plan from the size (``plan_views``: the same seeded draws as a full
   decode, so the crop boxes, flips, jitter factors ... are identical and resume stays exact);
3. pick r in 1, 2, 4, 8, the largest with every crop box at least its output size at 1/r
   (``max_reduction``), and decode once at that scale (libjpeg's DCT scaling, ``Image.draft``);
4. cut each box in the reduced image's coordinates (box / r) and render the view.

At 112 px views from ~500x375 photos, r is often 2 for global crops' samples and the decode
(the most expensive step for large JPEGs) costs less; on shards written with ``--resize`` the
source is already small and r is mostly 1. The libjpeg reduction is a DCT-domain low-pass, so
views differ from a full decode by a small pixel error (``tests/unit/test_reduced_decode.py``
bounds it), not by geometry. PNG and other formats decode at full size (r = 1).
"""
from __future__ import annotations

import random
from typing import Callable, Optional

import numpy as np

from dist_ssl.data.augment import render_views
from dist_ssl.data.crop_plan import max_reduction, plan_views
from dist_ssl.data.decode import load_image, open_sample
from dist_ssl.data.views import ViewSpec

RngsFor = Callable[[int], list[random.Random]]  # instance id -> one RNG per view


def decode_views(sample: Optional[dict], spec: ViewSpec, rngs_for: RngsFor,
                 reduced: bool = True) -> tuple[list[np.ndarray], int, int]:
    """(uint8 views [C, H, W], class id, instance id) of one raw tar sample.

    ``rngs_for(idx)`` gives the views' RNGs (they depend on the id, read from the sample).
    ``reduced=False`` decodes at full size (bit-identical to ``make_views`` on a full decode).
    Raises :class:`~dist_ssl.data.decode.SampleError` for a sample that does not decode.
    """
    opened = open_sample(sample)
    width, height = opened.size  # upright: EXIF orientation is applied by load_image
    plans = plan_views(width, height, spec, rngs_for(opened.idx))
    img, scale = load_image(opened, max_reduction(plans) if reduced else 1)
    return render_views(img, spec, plans, scale), opened.label, opened.idx
