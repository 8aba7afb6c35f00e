"""`dist-ssl-fit-tokenizer` (also ``tools/fit_tokenizer.py``): write a data-only BEiT tokenizer
codebook from training shards (El-Nouby et al., 2021).

    dist-ssl-fit-tokenizer --shards runs/data/fmnist2k --out runs/tokenizers/fmnist2k_kmeans256.safetensors \
        --kind kmeans --vocab 256 --patch-size 4 --img-size 28 --in-chans 1

Patches come from the same training views the MIM methods see (random resized crop + flip at
``--img-size``, normalised like the loader does), so the codebook lives in the pixel space the
tokenizer assigns in. ``kmeans`` runs spherical k-means on up to ``--max-patches`` of them,
``random_patches`` samples ``--vocab`` of them, ``random_projection`` needs no data. The file is
written atomically (safetensors: ``codebook`` [V, C*p*p] + metadata the methods check) and
recipes point ``method.tokenizer_path`` at it. Exit codes: 0 done, 2 bad input.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from dist_ssl.data.loader import build_train_loader
from dist_ssl.data.views import CropGroup, ViewSpec
from dist_ssl.errors import UserError, exit_with_message
from dist_ssl.models.tokenizers import (
    KINDS, kmeans_codebook, patchify, random_patches_codebook, random_projection_codebook,
    save_codebook)

PROG = "fit_tokenizer.py"  # the name its error lines have always carried
log = logging.getLogger("fit_tokenizer")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", help="training shard dir (manifest.json); not needed for random_projection")
    p.add_argument("--out", required=True, help="codebook file to write (.safetensors)")
    p.add_argument("--kind", choices=KINDS, default="kmeans")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary size V")
    p.add_argument("--patch-size", type=int, default=16)
    p.add_argument("--img-size", type=int, default=224, help="training crop size of the MIM recipe")
    p.add_argument("--in-chans", type=int, default=3, choices=(1, 3))
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.2, 1.0), metavar=("LO", "HI"))
    p.add_argument("--images", type=int, default=20000, help="training views to cut patches from")
    p.add_argument("--max-patches", type=int, default=1_000_000, help="k-means sample size cap")
    p.add_argument("--iters", type=int, default=30, help="k-means iterations (at most)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def sample_patches(args) -> torch.Tensor:
    """[M, C*p*p] patches of ``args.images`` training views (epoch 0 of a seeded loader)."""
    spec = ViewSpec([CropGroup(1, args.img_size, tuple(args.crop_scale))], policy="supervised",
                    in_chans=args.in_chans)
    loader = build_train_loader(args.shards, spec, batch_size=256, num_workers=0, seed=args.seed)
    loader.set_epoch(0)
    parts, seen = [], 0
    for batch in loader:
        x = batch["views"][0][: args.images - seen]
        parts.append(patchify(x, args.patch_size).flatten(0, 1))
        seen += x.shape[0]
        if seen >= args.images:
            break
    patches = torch.cat(parts)
    if patches.shape[0] > args.max_patches:
        g = torch.Generator().manual_seed(args.seed)
        patches = patches[torch.randperm(patches.shape[0], generator=g)[: args.max_patches]]
    log.info("%d patches of dim %d from %d views", patches.shape[0], patches.shape[1], seen)
    return patches


def fit(args) -> tuple[torch.Tensor, dict]:
    dim = args.in_chans * args.patch_size ** 2
    meta = {"kind": args.kind, "vocab": args.vocab, "patch_size": args.patch_size,
            "in_chans": args.in_chans, "img_size": args.img_size, "seed": args.seed,
            "crop_scale": list(args.crop_scale), "shards": args.shards or ""}
    if args.kind == "random_projection":
        return random_projection_codebook(args.vocab, dim, args.seed), meta
    if not args.shards:
        raise ValueError(f"--shards is required for --kind {args.kind}")
    patches = sample_patches(args)
    if args.kind == "random_patches":
        return random_patches_codebook(patches, args.vocab, args.seed), meta
    codebook, history = kmeans_codebook(patches.to(args.device), args.vocab, args.seed, args.iters)
    meta.update(num_patches=patches.shape[0], iters=len(history),
                objective=f"{history[-1]['objective']:.6f}", changed=f"{history[-1]['changed']:.6f}")
    return codebook.cpu(), meta


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    t0 = time.perf_counter()
    try:
        if args.vocab < 1 or args.patch_size < 1 or args.img_size % args.patch_size:
            raise ValueError("--vocab and --patch-size must be positive and divide --img-size")
        codebook, meta = fit(args)
    except (UserError, ValueError, OSError) as exc:  # ValueError: its own argument checks
        return exit_with_message(PROG, exc)
    path = save_codebook(args.out, codebook, meta)
    log.info("wrote %s codebook [%d, %d] to %s in %.1f s", args.kind, *codebook.shape, path,
             time.perf_counter() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
