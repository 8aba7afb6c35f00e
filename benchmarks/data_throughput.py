"""Images/s of the shard loader vs loose files, and of the shard writer vs a plain copy.

On the same real JPEGs (random crops of sklearn's two sample photos, seeded), the same
decode + view transform (``dist_ssl.data.augment.make_views``, one 112 px SimCLR view) and
the same batch size, DataLoader worker count and worker start method (``--mp-context``,
default: the project loader's), this measures:

  loader  wds      ``dist_ssl.data.loader.build_train_loader`` over the shards
          loose    a map-style Dataset reading the loose files + DataLoader(shuffle=True)
          raw-wds  ``webdataset.WebDataset(...).shuffle(1000).map(...).batched(...)`` over
                   the same shards (our loader's overhead vs plain webdataset)
  writer  shards   ``python tools/make_shards.py write imagefolder:DIR OUT`` (end to end,
                   interpreter start included; the tool's own rate is shown too)
          copy     ``shutil.copyfile`` of every file into a fresh folder

Each timed pass covers every image once (the shard loader pads its epoch to whole batches:
3008 of 3000; img/s counts delivered images). Warm-up rounds come first (loaders: the first
``--warmup-batches`` batches; writers: a full pass) and are not timed. In each timed round
every candidate runs once, in an order rotated per round, so load from other users of the
machine hits all candidates alike. Reported: median img/s over rounds [min-max], the median
of the per-round ratios [min-max], and CPU ms/img of all processes involved, which moves
much less with others' load than wall time does (but does not see I/O waits).

``--cold`` evicts the files a pass reads (loose files or shards; the writers' source files)
from the page cache before every pass (``fsync`` then ``posix_fadvise(DONTNEED)``, no root
needed; ``fincore`` confirms it). Without it everything is page-cached, which favours loose
files. On a VM the host may still cache the disk, so "cold" here is milder than a real cold
read from network or spinning storage.

    python benchmarks/data_throughput.py [--cold] [--classes 10 --per-class 300]
        [--workers 2 --batch-size 64 --rounds 3] [--workdir DIR] [--profile]

``--profile`` adds per-step CPU costs (tar read, file read, decode, views, make_shards'
validation decode, copyfile) and a cProfile of one in-process pass of each loader.
Results and their reading: ``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import cProfile
import inspect
import multiprocessing
import os
import pstats
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from dist_ssl.data.augment import make_views, normalize, stack_views, view_rng
from dist_ssl.data.decode import decode_sample
from dist_ssl.data.loader import build_train_loader
from dist_ssl.data.views import CropGroup, ViewSpec

REPO = Path(__file__).resolve().parents[1]
# The project loader's default worker start method; the baselines get the same one.
_LOADER_MP = inspect.signature(build_train_loader).parameters["mp_context"].default
SPEC = ViewSpec([CropGroup(1, 112, (0.14, 1.0))], policy="simclr")


# ---------------------------------------------------------------- data and cache control
def make_images(root: Path, classes: int, per_class: int, seed: int,
                lo: int = 160, hi: int = 400) -> list[tuple[Path, int]]:
    """``classes`` folders of ``per_class`` JPEGs (q90): random crops lo..hi px, random flips."""
    from sklearn.datasets import load_sample_images
    photos = [Image.fromarray(a) for a in load_sample_images().images]  # 2 x 427x640 RGB
    rng, items = random.Random(seed), []
    for c in range(classes):
        folder = root / f"class_{c:03d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            src = rng.choice(photos)
            w, h = rng.randint(lo, min(hi, src.width)), rng.randint(lo, min(hi, src.height))
            x, y = rng.randint(0, src.width - w), rng.randint(0, src.height - h)
            img = src.crop((x, y, x + w, y + h))
            if rng.random() < 0.5:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            path = folder / f"{c:03d}_{i:05d}.jpg"
            img.save(path, quality=90)
            items.append((path, c))
    return items


def evict(paths) -> None:
    """Drop ``paths`` from the page cache (dirty pages are not dropped: fsync them first)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(paths) -> int | None:
    """Page-cached bytes of ``paths`` via util-linux ``fincore`` (None if it is missing)."""
    if shutil.which("fincore") is None:
        return None
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                          *map(str, paths)], capture_output=True, text=True, check=True)
    return sum(int(x) for x in out.stdout.split())


# ---------------------------------------------------------------- the three loaders
def collate(items) -> dict:
    """(views, label, idx) tuples -> a batch dict with uint8 views, as the loader's workers
    send it (``ShardStream._collate``); :func:`_drain` normalises it in the main process."""
    return {"index": torch.tensor([it[2] for it in items], dtype=torch.long),
            "label": torch.tensor([it[1] for it in items], dtype=torch.long),
            "views": [stack_views([it[0][v] for it in items]) for v in range(SPEC.num_views)]}


class LooseFiles(Dataset):
    """Map-style dataset over loose image files; per-image work identical to the loader's."""

    def __init__(self, items: list[tuple[Path, int]], spec: ViewSpec, seed: int):
        self.items, self.spec, self.seed, self.epoch = items, spec, seed, 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        path, label = self.items[i]
        with Image.open(path) as img:
            img.load()
        rngs = [view_rng(self.seed, self.epoch, i, 0, v) for v in range(self.spec.num_views)]
        return make_views(img, self.spec, rngs), label, i


class RawDecode:
    """webdataset map function: tar sample dict -> (views, label, idx), as the loader does."""

    def __init__(self, spec: ViewSpec, seed: int):
        self.spec, self.seed, self.epoch = spec, seed, 0

    def __call__(self, sample):
        img, label, idx = decode_sample(sample)
        rngs = [view_rng(self.seed, self.epoch, idx, 0, v) for v in range(self.spec.num_views)]
        return make_views(img, self.spec, rngs), label, idx


def _worker_kwargs(workers: int, mp_context: str | None) -> dict:
    # As dist_ssl's TrainLoader: prefetch 2, workers started every epoch, same start method.
    if workers == 0:
        return {}
    return {"prefetch_factor": 2, "persistent_workers": False,
            "multiprocessing_context": multiprocessing.get_context(mp_context)}


def _drain(loader, normalise: bool, limit: int | None) -> tuple[int, float, float]:
    """(images, seconds, seconds to the first batch) of one pass, or of its first ``limit``
    batches. Worker start-up is included (workers start every epoch). ``normalise``: uint8 ->
    float in this process, as ``TrainLoader`` does by default.
    """
    t0, n, first, (mean, std) = time.perf_counter(), 0, None, SPEC.norm
    for i, batch in enumerate(loader):
        views = [normalize(v, mean, std) for v in batch["views"]] if normalise else batch["views"]
        n += views[0].shape[0]
        first = first or time.perf_counter() - t0
        if limit is not None and i + 1 >= limit:
            break
    return n, time.perf_counter() - t0, first


def loose_pass(items, batch_size: int, workers: int, mp_context, seed: int, epoch: int,
               limit=None):
    ds = LooseFiles(items, SPEC, seed)
    ds.epoch = epoch
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed + epoch),
                        collate_fn=collate, **_worker_kwargs(workers, mp_context))
    return _drain(loader, True, limit)


def wds_pass(shard_dir: Path, batch_size: int, workers: int, mp_context, seed: int,
             epoch: int, limit=None):
    loader = build_train_loader(shard_dir, SPEC, batch_size, rank=0, world_size=1,
                                num_workers=workers, seed=seed, mp_context=mp_context)
    loader.set_epoch(epoch)
    return _drain(loader, False, limit)  # TrainLoader normalises (uint8_views=False)


def raw_wds_pass(shards: list[Path], batch_size: int, workers: int, mp_context, seed: int,
                 epoch: int, limit=None):
    import webdataset as wds
    fn = RawDecode(SPEC, seed)
    fn.epoch = epoch
    ds = (wds.WebDataset([str(p) for p in shards], shardshuffle=len(shards),
                         seed=seed + epoch, empty_check=False)
          .shuffle(1000).map(fn)
          .batched(batch_size, collation_fn=collate))
    loader = DataLoader(ds, batch_size=None, num_workers=workers,
                        **_worker_kwargs(workers, mp_context))
    return _drain(loader, True, limit)


# ---------------------------------------------------------------- the two writers
def shard_pass(loose: Path, out: Path, sps: int, workers: int, tool_rates: list):
    """The sharding CLI end to end into ``out`` (made empty before); records the tool's rate."""
    cmd = [sys.executable, str(REPO / "tools" / "make_shards.py"), "-q", "write",
           f"imagefolder:{loose}", str(out), "--samples-per-shard", str(sps),
           "--workers", str(workers)]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    if res.returncode:
        sys.exit(f"make_shards failed ({res.returncode}): {res.stderr.strip()}")
    m = re.search(r": (\d+) samples.*?(\d+) images/s", res.stdout)
    tool_rates.append(float(m.group(2)))
    return int(m.group(1)), dt, None


def copy_pass(files: list[Path], loose: Path, out: Path):
    """``shutil.copyfile`` of every file into ``out`` (removed before); makes class folders."""
    t0, made = time.perf_counter(), set()
    for src in files:
        dst = out / src.relative_to(loose)
        if dst.parent not in made:
            dst.parent.mkdir(parents=True)
            made.add(dst.parent)
        shutil.copyfile(src, dst)
    return len(files), time.perf_counter() - t0, None


# ---------------------------------------------------------------- measuring and reporting
def run_rounds(cands: dict, reads: dict, a, before: dict | None = None) -> dict:
    """{name: {"rate": img/s, "first": s to first batch, "cpu": CPU ms/img}} per timed round.

    ``cands[name](epoch, limit) -> (images, seconds, first_batch_s | None)``; warm-up rounds
    pass ``limit=a.warmup_batches``. ``reads[name]()`` lists the files a pass reads, evicted
    from the page cache before the pass with ``--cold``; ``before[name]()`` (untimed) clears
    a writer's output. The order rotates every round.
    CPU time counts this process and all its descendants (DataLoader workers, forkserver,
    make_shards and its pool): unlike wall time it moves little with other users' load, but
    it does not see I/O waits.
    """
    names, out = list(cands), {k: {"rate": [], "first": [], "cpu": []} for k in cands}
    for r in range(a.warmup + a.rounds):
        k, warm_up = r % len(names), r < a.warmup
        for name in names[k:] + names[:k]:
            if before and name in before:
                before[name]()
            if a.cold:
                evict(reads[name]())
            cpu0 = _cpu_seconds()
            n, dt, first = cands[name](r, a.warmup_batches if warm_up else None)
            cpu = (_cpu_seconds() - cpu0) / n * 1e3
            tag = "warm-up" if warm_up else f"round {r - a.warmup + 1}"
            extra = "" if first is None else f", first batch {first:.2f} s"
            print(f"  {tag:8s} {name:8s} {n:5d} img in {dt:6.2f} s = {n / dt:5.0f} img/s "
                  f"(cpu {cpu:.2f} ms/img{extra})", flush=True)
            if not warm_up:
                for key, v in (("rate", n / dt), ("first", first), ("cpu", cpu)):
                    out[name][key].append(v)
    return out


def _cpu_seconds() -> float:
    """CPU seconds of this process and all its descendants, reaped or alive.

    forkserver workers are children of the server, not of this process, so RUSAGE_CHILDREN
    alone misses them: live descendants are found through /proc (utime + stime + their
    reaped children's cutime + cstime).
    """
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    children, ticks = {}, {}
    for d in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # from field 3 (state) on
        except OSError:
            continue  # exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(d))
        ticks[int(d)] = sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
    live, todo = 0, list(children.get(os.getpid(), []))
    while todo:
        pid = todo.pop()
        live += ticks[pid]
        todo += children.get(pid, [])
    return (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
            + live / os.sysconf("SC_CLK_TCK"))


def _stat(xs: list[float], fmt: str = ".0f") -> str:
    return f"{statistics.median(xs):{fmt}} [{min(xs):{fmt}}-{max(xs):{fmt}}]"


def table_row(kind: str, res: dict, a: str, b: str, target: float | None) -> str:
    ratios = [x / y for x, y in zip(res[a]["rate"], res[b]["rate"])]  # paired: same round
    row = (f"{kind:6s} {a:6s} {_stat(res[a]['rate']):>16s} img/s | {b:7s} "
           f"{_stat(res[b]['rate']):>16s} img/s | ratio {a}/{b} {_stat(ratios, '.2f')}")
    if target is not None:
        met = statistics.median(ratios) >= target
        row += f"  (target >= {target}: {'met' if met else 'NOT met'})"
    return row


def stage_costs(work: Path, files: list[Path], n: int = 500) -> None:
    """CPU microseconds per image of each step in this process (page-cached; process_time, so
    other users' load hardly matters), over the first ``n`` images."""
    from dist_ssl.data.decode import read_range
    from dist_ssl.data.images import probe_image
    from dist_ssl.data.manifest import load_manifest
    shards = load_manifest(work / "shards").shards
    (work / "stage_copy").mkdir()
    files, cost = files[:n], {}

    def timed(name, fn, count):
        t0 = time.process_time()
        out = fn()
        cost[name] = (time.process_time() - t0) / count * 1e6
        return out

    k = max(1, -(-n // shards[0].num_samples))  # whole shards, as the loader reads them
    tars = [(work / "shards" / s.name, s.num_samples) for s in shards[:k]]
    raws = timed("tar", lambda: [r for p, c in tars for r in read_range(p, 0, c, lambda i: True)],
                 sum(c for _, c in tars))[:n]
    timed("loose", lambda: [p.read_bytes() for p in files], len(files))
    imgs = timed("decode", lambda: [decode_sample(r)[0] for r in raws], len(raws))
    timed("views", lambda: [make_views(im, SPEC, [view_rng(0, 0, i, 0, 0)])
                            for i, im in enumerate(imgs)], len(imgs))
    timed("probe", lambda: [probe_image(p) for p in files], len(files))
    timed("copy", lambda: [shutil.copyfile(p, work / "stage_copy" / f"{i}.jpg")
                           for i, p in enumerate(files)], len(files))
    print("\nper-image CPU cost, one process, page-cached (us): "
          f"tar read {cost['tar']:.0f} | loose read {cost['loose']:.0f} | decode "
          f"{cost['decode']:.0f} | views {cost['views']:.0f} || make_shards validation decode "
          f"{cost['probe']:.0f} | copyfile {cost['copy']:.0f}")


def profile_in_process(name: str, run, top: int) -> None:
    """cProfile one pass with workers=0 (all work in this process), top functions by tottime."""
    prof = cProfile.Profile()
    prof.enable()
    n, dt, _ = run()
    prof.disable()
    print(f"\n--- profile {name}: {n} img in {dt:.2f} s in-process ({n / dt:.0f} img/s, "
          f"profiler overhead included) ---")
    pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(top)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=300)
    p.add_argument("--workers", type=int, default=2, help="DataLoader and make_shards workers")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs every candidate)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--warmup-batches", type=int, default=8,
                   help="loader batches per warm-up pass (0: a full pass); writers do full ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mp-context", default=_LOADER_MP, choices=("fork", "forkserver", "spawn"),
                   help="worker start method of all three loaders (default: the project "
                        f"loader's, {_LOADER_MP})")
    p.add_argument("--cold", action="store_true",
                   help="evict the files a pass reads from the page cache before every pass")
    p.add_argument("--no-raw-wds", action="store_true", help="skip the plain webdataset row")
    p.add_argument("--profile", action="store_true",
                   help="then: per-stage costs and a cProfile of one in-process pass per loader")
    p.add_argument("--workdir", type=Path, default=None,
                   help="parent folder for all files (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    return p


def bench_writers(a, work: Path, items, tool_rates: list) -> dict:
    loose, files = work / "loose", [p for p, _ in items]
    cands = {"shards": lambda r, _: shard_pass(loose, work / "shards", a.samples_per_shard,
                                               a.workers, tool_rates),
             "copy": lambda r, _: copy_pass(files, loose, work / "copy")}
    print(f"\nwriter: make_shards --workers {a.workers} vs shutil.copyfile (1 process)")
    reads = {"shards": lambda: files, "copy": lambda: files}
    before = {k: (lambda k=k: shutil.rmtree(work / k, ignore_errors=True)) for k in cands}
    return run_rounds(cands, reads, a, before)


def bench_loaders(a, shard_dir: Path, items) -> dict:
    shards, files = sorted(shard_dir.glob("shard-*.tar")), [p for p, _ in items]
    kw = {"batch_size": a.batch_size, "workers": a.workers, "seed": a.seed,
          "mp_context": a.mp_context}
    cands = {"wds": lambda r, lim: wds_pass(shard_dir, epoch=r, limit=lim, **kw),
             "loose": lambda r, lim: loose_pass(items, epoch=r, limit=lim, **kw)}
    if not a.no_raw_wds:
        cands["raw-wds"] = lambda r, lim: raw_wds_pass(shards, epoch=r, limit=lim, **kw)
    reads = {"wds": lambda: shards, "loose": lambda: files, "raw-wds": lambda: shards}
    if a.cold:
        evict(files + shards)
        print(f"\npage cache after eviction: {resident_bytes(files + shards)} of "
              f"{sum(p.stat().st_size for p in files + shards)} bytes resident (fincore)")
    g = SPEC.groups[0]
    print(f"\nloader: {a.workers} workers ({a.mp_context}), batch {a.batch_size}, "
          f"{SPEC.policy} {g.count}x{g.size}px scale {g.scale}; "
          f"warm-up passes stop after {a.warmup_batches or 'all'} batches")
    return run_rounds(cands, reads, a)


def report(a, n: int, loader: dict, writer: dict, tool_rates: list) -> None:
    print(f"\n=== {n} JPEGs, {a.workers} workers, batch {a.batch_size}, "
          f"{'COLD (evicted before every pass)' if a.cold else 'warm'} page cache; "
          f"median [min-max] of {a.rounds} rounds; ratio = median of per-round ratios ===")
    print(table_row("loader", loader, "wds", "loose", 1.5))
    if not a.no_raw_wds:
        print(table_row("loader", loader, "wds", "raw-wds", None))
    print(table_row("writer", writer, "shards", "copy", 1.0))
    both = {**loader, **writer}
    print("cpu ms/img (all processes): " + " | ".join(
        f"{k} {_stat(v['cpu'], '.2f')}" for k, v in both.items()))
    print("first batch s: " + " | ".join(f"{k} {_stat(v['first'], '.2f')}"
                                         for k, v in loader.items()))
    print(f"make_shards' own rate (interpreter start excluded): "
          f"{_stat(tool_rates[a.warmup:])} img/s; load average now {os.getloadavg()[0]:.2f}")


def main(argv=None) -> None:
    a = _parser().parse_args(argv)
    if a.rounds < 1 or a.warmup < 0:
        sys.exit("--rounds must be >= 1 and --warmup >= 0")
    if a.workdir is not None:
        a.workdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="data_throughput_", dir=a.workdir))
    try:
        print(f"workdir {work}; load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} "
              f"cpus; torch {torch.__version__}")
        t0 = time.perf_counter()
        items = make_images(work / "loose", a.classes, a.per_class, a.seed)
        size = sum(p.stat().st_size for p, _ in items)
        print(f"made {len(items)} JPEGs ({size / 2**20:.1f} MiB, {size / len(items) / 1024:.1f} "
              f"KiB each) in {time.perf_counter() - t0:.1f} s")
        tool_rates = []
        writer = bench_writers(a, work, items, tool_rates)
        if a.mp_context == "forkserver":  # what TrainLoader asks for, for all three loaders
            multiprocessing.get_context("forkserver").set_forkserver_preload(
                ["__main__", "dist_ssl.data.loader"])
        loader = bench_loaders(a, work / "shards", items)  # the last writer pass's shards
        report(a, len(items), loader, writer, tool_rates)
        if a.profile:
            stage_costs(work, [p for p, _ in items])
            kw = {"batch_size": a.batch_size, "workers": 0, "mp_context": None, "seed": a.seed,
                  "epoch": 0}
            profile_in_process("wds", lambda: wds_pass(work / "shards", **kw), 12)
            profile_in_process("loose", lambda: loose_pass(items, **kw), 12)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
