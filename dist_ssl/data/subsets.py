"""``--subset`` rules and the selection of valid images.

Rules: ``per-class:K`` (K valid images from every class) or ``random:N`` (N valid images
ignoring labels), or ``None`` (every valid image).

Selection rule (bad files): candidates are visited in a seeded random order (per class for
``per-class``, over all records for ``random``); the subset is the first K (or N) candidates
that *decode*. A bad file is therefore replaced by the next candidate of the same group, and
only candidates that were actually needed get decoded (each at most once). The result depends
only on the seed and on which files are bad, never on the number of workers.
"""
from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from dist_ssl.data.errors import SourceError, SubsetError
from dist_ssl.data.sources import Record


@dataclass(frozen=True)
class SubsetRule:
    """A parsed ``--subset`` value."""

    kind: str  # "per-class" | "random"
    n: int

    def __str__(self) -> str:
        return f"{self.kind}:{self.n}"


def parse_subset(text: str | None) -> SubsetRule | None:
    """``"per-class:K"`` / ``"random:N"`` -> :class:`SubsetRule`; ``None``/"" -> ``None``."""
    if not text:
        return None
    kind, _, num = text.partition(":")
    if kind in ("per-class", "random") and num.isdigit() and int(num) > 0:
        return SubsetRule(kind, int(num))
    raise SubsetError(f"bad --subset {text!r}: expected per-class:K or random:N with K, N > 0")


def rng_for(purpose: str, seed: int) -> random.Random:
    """An RNG for one purpose; string seeds are hashed (sha512), stable across Python runs."""
    return random.Random(f"dist_ssl.make_shards.{purpose}.{seed}")


@dataclass
class Group:
    """Candidates in the order they are tried, and how many valid ones are wanted."""

    name: str
    candidates: list[Record]
    need: int


def candidate_groups(records: Sequence[Record], classes: Sequence[str],
                     rule: SubsetRule | None, seed: int) -> list[Group]:
    """Split records into groups to fill; checks counts that fail before any decoding."""
    by_class: list[list[Record]] = [[] for _ in classes]
    for r in records:
        by_class[r.label].append(r)
    if rule is None:
        return [Group(c, recs, len(recs)) for c, recs in zip(classes, by_class)]
    if rule.kind == "random":
        if rule.n > len(records):
            raise SubsetError(f"--subset {rule}: the source has only {len(records)} images")
        cands = sorted(records, key=lambda r: (r.label, r.ref))
        rng_for("subset", seed).shuffle(cands)
        return [Group("all classes", cands, rule.n)]
    groups = []
    for label, (name, recs) in enumerate(zip(classes, by_class)):
        if len(recs) < rule.n:
            raise SubsetError(f"--subset {rule}: class '{name}' has only {len(recs)} images")
        cands = list(recs)
        rng_for(f"subset.class{label}", seed).shuffle(cands)
        groups.append(Group(name, cands, rule.n))
    return groups


def select_valid(groups: list[Group], rule: SubsetRule | None,
                 check: Callable[[list[Record]], list[bool]]) -> list[Record]:
    """Take the first ``need`` valid candidates of every group.

    ``check`` decodes a batch (in parallel) and says which are valid; each round asks only
    for as many new candidates as are still missing, so nothing is decoded twice or in vain.
    Returns the selection sorted by ``(label, ref)``.
    """
    pos = [0] * len(groups)
    chosen: list[list[Record]] = [[] for _ in groups]
    while True:
        batch, owner = [], []
        for g, group in enumerate(groups):
            want = group.need - len(chosen[g])
            take = group.candidates[pos[g]: pos[g] + want]
            pos[g] += len(take)
            batch.extend(take)
            owner.extend([g] * len(take))
        if not batch:
            break
        for rec, g, ok in zip(batch, owner, check(batch)):
            if ok:
                chosen[g].append(rec)
    for group, got in zip(groups, chosen):
        _check_filled(group, len(got), rule)
    return sorted((r for got in chosen for r in got), key=lambda r: (r.label, r.ref))


def _check_filled(group: Group, got: int, rule: SubsetRule | None) -> None:
    if rule is None and got == 0:
        raise SourceError(f"class '{group.name}' has no valid images "
                          f"({len(group.candidates)} files, none decodes)")
    if rule is not None and got < group.need:
        what = "the source" if rule.kind == "random" else f"class '{group.name}'"
        raise SubsetError(f"--subset {rule}: {what} has only {got} valid images "
                          f"(of {len(group.candidates)} files)")


def shuffle_order(selected: list[Record], seed: int) -> list[Record]:
    """The final sample order; instance id = position in this list."""
    order = list(selected)
    rng_for("order", seed).shuffle(order)
    return order
