"""Data-only patch tokenizers for BEiT-style masked image modeling.

El-Nouby et al., "Are Large-scale Datasets Necessary for Self-Supervised Pre-training?" (2021),
Sec. 3.2: BEiT's DALL-E tokenizer needs 250M outside images; three tokenizers built from
nothing or from the target data work as well. Each patch gets the id of the codebook entry with
the highest cosine similarity in pixel space:

* random projection: V random unit vectors (i.i.d. uniform components, then normalised);
* random patches: V patches sampled from the training images;
* k-means: V centroids of patches sampled from the training images (spherical k-means,
  i.e. with the same cosine similarity as the assignment).

Pixel space = the normalised views the model sees ((x / 255 - mean) / std), flattened per patch
in (channel, row, column) order by :func:`patchify`. Shapes: x [B, C, H, W]; patches
[B, N, P] with N = (H / p) * (W / p), P = C * p * p; codebook [V, P]; ids [B, N] in [0, V).
Codebook files (``tools/fit_tokenizer.py``) are safetensors (``codebook`` [V, P] + string
metadata) or ``.pt`` dicts read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save
from safetensors import safe_open
from torch import nn

from dist_ssl.atomic import atomic_write_bytes

log = logging.getLogger(__name__)
KINDS = ("random_projection", "random_patches", "kmeans")
_CHUNK = 16384  # rows per similarity block: bounds the [rows, V] matrix (16384 x 8192 fp32 = 512 MiB)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, C * p * p], patches in row-major grid order."""
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image {h}x{w} is not divisible by the patch size {patch}")
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


@torch.no_grad()
def assign(patches: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, cosine similarity) of the best codebook entry per patch; patches [..., P],
    codebook [V, P] (any norm). Returns two tensors shaped like ``patches[..., 0]``."""
    flat = F.normalize(patches.reshape(-1, patches.shape[-1]).float(), dim=1)
    book = F.normalize(codebook.float(), dim=1).t()
    ids, sims = [], []
    for chunk in flat.split(_CHUNK):
        s, i = (chunk @ book).max(dim=1)
        ids.append(i)
        sims.append(s)
    shape = patches.shape[:-1]
    return torch.cat(ids).reshape(shape), torch.cat(sims).reshape(shape)


class PatchTokenizer(nn.Module):
    """Fixed pixel-space tokenizer: ``forward(x [B, C, H, W]) -> ids [B, N]`` (no gradient).

    The codebook is a buffer, so it travels with the method's state into checkpoints.
    """

    def __init__(self, codebook: torch.Tensor, patch_size: int):
        super().__init__()
        if codebook.ndim != 2:
            raise ValueError(f"codebook must be [V, P], got {tuple(codebook.shape)}")
        self.patch_size = patch_size
        self.register_buffer("codebook", F.normalize(codebook.float(), dim=1))

    @property
    def vocab_size(self) -> int:
        return self.codebook.shape[0]

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = patchify(x, self.patch_size)
        if patches.shape[-1] != self.codebook.shape[1]:
            raise ValueError(f"patches have {patches.shape[-1]} values but the codebook entries "
                             f"{self.codebook.shape[1]} (channels or patch size differ)")
        return assign(patches, self.codebook)[0]


def random_projection_codebook(vocab: int, dim: int, seed: int = 0) -> torch.Tensor:
    """[V, P] random unit vectors with i.i.d. U(-1, 1) components before normalisation."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.rand(vocab, dim, generator=g) * 2 - 1, dim=1)


def random_patches_codebook(patches: torch.Tensor, vocab: int, seed: int = 0) -> torch.Tensor:
    """[V, P]: V distinct rows of ``patches`` [M, P] drawn uniformly (M >= V)."""
    if patches.shape[0] < vocab:
        raise ValueError(f"need at least {vocab} patches to sample a vocabulary, got {patches.shape[0]}")
    g = torch.Generator().manual_seed(seed)
    return patches[torch.randperm(patches.shape[0], generator=g)[:vocab]].float().clone()


@torch.no_grad()
def kmeans_codebook(patches: torch.Tensor, vocab: int, seed: int = 0, iters: int = 30,
                    tol: float = 1e-3) -> tuple[torch.Tensor, list[dict]]:
    """Spherical k-means (Dhillon & Modha, 2001) of ``patches`` [M, P] -> centroids [V, P].

    Assignment = highest cosine similarity (what the tokenizer does); update = normalised sum
    of the members. Empty clusters are re-seeded with the worst-served points. Both steps
    never lower the objective (mean best cosine similarity), which the returned history
    [{"iter", "objective", "changed"}] records; stops once at most a fraction ``tol`` of the
    points changed cluster (``tol=0``: at the fixed point). Runs on ``patches.device``.
    """
    m = patches.shape[0]
    if m < vocab:
        raise ValueError(f"k-means needs at least {vocab} patches, got {m}")
    x = F.normalize(patches.float(), dim=1)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randperm(m, generator=g)[:vocab].to(x.device)].clone()
    ids = torch.full((m,), -1, dtype=torch.long, device=x.device)
    history: list[dict] = []
    for it in range(iters):
        new_ids, sims = assign(x, centroids)
        changed = (new_ids != ids).float().mean().item()
        ids = new_ids
        history.append({"iter": it, "objective": sims.mean().item(), "changed": changed})
        log.info("k-means iter %d: objective %.5f, %.4f of the points changed", it,
                 history[-1]["objective"], changed)
        if changed <= tol:
            break
        sums = torch.zeros_like(centroids).index_add_(0, ids, x)
        counts = torch.bincount(ids, minlength=vocab)
        empty = (counts == 0).nonzero().flatten()
        centroids = torch.where(counts[:, None] > 0, F.normalize(sums, dim=1), centroids)
        if empty.numel():  # worst-served points become the empty clusters' centroids
            centroids[empty] = x[sims.argsort()[: empty.numel()]]
    return centroids, history


def save_codebook(path: str | Path, codebook: torch.Tensor, meta: dict[str, str]) -> Path:
    """Atomically write ``codebook`` [V, P] and string ``meta`` as safetensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = save({"codebook": codebook.detach().float().cpu().contiguous()},
                metadata={k: str(v) for k, v in meta.items()})
    atomic_write_bytes(path, data)
    return path


def load_codebook(path: str | Path) -> tuple[torch.Tensor, dict[str, str]]:
    """(codebook [V, P], metadata) from a safetensors file or a ``.pt`` dict
    ``{"codebook": tensor, "meta": {str: str}}`` (loaded with ``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer codebook not found: {path} (make it with tools/fit_tokenizer.py)")
    if path.suffix == ".pt":
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(obj, dict) or "codebook" not in obj:
            raise ValueError(f"{path}: expected a dict with a 'codebook' tensor")
        return obj["codebook"].float(), {k: str(v) for k, v in (obj.get("meta") or {}).items()}
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return load_file(str(path))["codebook"].float(), meta


def build_tokenizer(kind: str, vocab: int, patch_size: int, in_chans: int, *,
                    path: Optional[str] = None, seed: int = 0) -> PatchTokenizer:
    """A tokenizer for ``patch_size`` x ``patch_size`` patches of ``in_chans`` channels.

    ``random_projection`` is drawn from ``seed`` (or read from ``path``); ``random_patches`` and
    ``kmeans`` need the codebook file ``tools/fit_tokenizer.py`` wrote from the training shards.
    """
    if kind not in KINDS:
        raise ValueError(f"tokenizer: unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    dim = in_chans * patch_size * patch_size
    if path is None:
        if kind != "random_projection":
            raise ValueError(f"tokenizer_path: a {kind} tokenizer needs a codebook file "
                             f"(tools/fit_tokenizer.py --kind {kind})")
        return PatchTokenizer(random_projection_codebook(vocab, dim, seed), patch_size)
    codebook, meta = load_codebook(path)
    if meta.get("kind", kind) != kind:
        raise ValueError(f"tokenizer_path: {path} holds a {meta['kind']} codebook, the recipe says {kind}")
    if tuple(codebook.shape) != (vocab, dim):
        raise ValueError(f"tokenizer_path: {path} is [{codebook.shape[0]}, {codebook.shape[1]}], "
                         f"expected [vocab_size={vocab}, {in_chans}x{patch_size}x{patch_size}={dim}]")
    return PatchTokenizer(codebook, patch_size)
