"""Per-core images/s of IDMM's views: torchvision ImageFolder vs our loader on byte-copied and
on ``--resize`` shards; the shard writer vs copying the same bytes.

Data: ~2,000 real photographs at ImageNet-like size (500x375 or 375x500, JPEG q90), cut with
seeded random regions, scales and flips from the real photos found on this machine: the 12
nature photographs of Debian's ``mate-backgrounds`` (``apt-get install mate-backgrounds``;
skipped when absent), scikit-learn's two sample photos and matplotlib's ``grace_hopper.jpg``
(``--photos DIR`` adds a folder of your own). No synthetic images.

Views: IDMM's (Cao et al., 2022): 2 global + 4 local crops at 112 px, scales (0.14, 1) and
(0.05, 0.4), the SimCLR policy (flip, colour jitter 0.8 p=0.8, grayscale p=0.2, blur p=0.5).

  loader (a) tv       torchvision ``ImageFolder`` + the transforms a user writes for this
                      (RandomResizedCrop, RandomHorizontalFlip, RandomApply(ColorJitter),
                      RandomGrayscale, RandomApply(GaussianBlur(11, (0.1, 2))), ToTensor,
                      Normalize) per view, DataLoader(shuffle=True)
         (b) copy     ``build_train_loader`` on byte-copied shards (``make_shards write``)
         (c) resize   ``build_train_loader`` on ``make_shards write --resize 160`` shards
         (g) gpu-wk   ``decode="gpu"`` on the byte-copied shards, worker side only: JPEG bytes
                      + crop plans reach the main process; the device decode is NOT measured
                      here (no GPU on this machine)
  writer shards       ``python tools/make_shards.py write`` (end to end, interpreter start
                      included; validation decode at 1/8 scale), copy or ``--resize 160``
         copy         ``shutil.copyfile`` of every file into a fresh folder

(b) and (c) batches are normalised with ``loader.to_device(batch, "cpu")`` in the main process
(on a GPU node that is device work): every candidate ends with normalised float32 views.
Same worker count, batch size and worker start method for all loaders. One warm-up round
(loaders: ``--warmup-batches`` batches), then timed rounds running every candidate once in an
order rotated per round. Reported: median img/s [min-max]; CPU ms per image of all processes
involved (main, workers, forkserver, the tool's pool): per-core img/s = 1000 / (CPU ms/img),
which moves much less with other users' load than wall time; ratios of per-core rates; and the
CPU cores one GPU needs to be fed 10,000 img/s.

    python benchmarks/data_throughput.py [--per-class 200 --classes 10] [--workers 2]
        [--batch-size 64 --rounds 3] [--resize-side 160] [--cold] [--profile] [--workdir DIR]

``--profile`` adds per-step CPU costs in one process (decode at each reduction, the six views,
the GPU path's worker step, validation decodes, copyfile) and PIL vs torchvision tensor ops per
112 px view (why the CPU path renders with PIL). Results: ``benchmarks/README.md``.
"""
from __future__ import annotations

import argparse
import glob
import inspect
import io
import multiprocessing
import os
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
from torch.utils.data import DataLoader

from dist_ssl.data.loader import build_train_loader
from dist_ssl.data.views import CropGroup, ViewSpec

REPO = Path(__file__).resolve().parents[1]
# The project loader's default worker start method; the baselines get the same one.
_LOADER_MP = inspect.signature(build_train_loader).parameters["mp_context"].default
SPEC = ViewSpec([CropGroup(2, 112, (0.14, 1.0)), CropGroup(4, 112, (0.05, 0.4))],
                policy="simclr")  # IDMM's defaults (methods/idmm.py)
PHOTO_GLOBS = ("/usr/share/backgrounds/mate/nature/*.jpg",)


# ---------------------------------------------------------------- data and cache control
def source_photos(extra: Path | None) -> list[tuple[str, Image.Image]]:
    """Real photographs to cut from: Debian's mate-backgrounds nature set if installed,
    scikit-learn's and matplotlib's sample photos, and ``extra``'s JPEGs."""
    from sklearn.datasets import load_sample_images
    paths = sorted(p for g in PHOTO_GLOBS for p in glob.glob(g))
    import matplotlib
    paths.append(os.path.join(matplotlib.get_data_path(), "sample_data", "grace_hopper.jpg"))
    if extra is not None:
        paths += sorted(str(p) for p in extra.rglob("*.jp*g"))
    photos = [(os.path.basename(p), Image.open(p).convert("RGB")) for p in paths
              if os.path.isfile(p)]
    sk = load_sample_images()
    photos += [(os.path.basename(f), Image.fromarray(a)) for f, a in zip(sk.filenames, sk.images)]
    return photos


def make_images(root: Path, photos, classes: int, per_class: int,
                seed: int) -> list[tuple[Path, int]]:
    """``classes`` folders of ``per_class`` JPEGs (q90) of 500x375 (1 in 4: 375x500): seeded
    random 4:3 regions (40-100 % of the largest that fits) of random photos, random flips."""
    rng, items = random.Random(seed), []
    for c in range(classes):
        folder = root / f"class_{c:03d}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            _, src = rng.choice(photos)
            out = (375, 500) if rng.random() < 0.25 else (500, 375)
            aspect = out[0] / out[1]
            w_max = min(src.width, src.height * aspect)
            w = rng.uniform(0.4, 1.0) * w_max
            h = w / aspect
            x, y = rng.uniform(0, src.width - w), rng.uniform(0, src.height - h)
            img = src.resize(out, Image.Resampling.LANCZOS, box=(x, y, x + w, y + h))
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




# ---------------------------------------------------------------- the loaders
def torchvision_transform(spec: ViewSpec):
    """What a user writes with torchvision for these views: one Compose per crop group."""
    from torchvision import transforms as T
    mean, std = spec.norm

    def group(g: CropGroup):
        return T.Compose([
            T.RandomResizedCrop(g.size, scale=g.scale),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.RandomApply([T.GaussianBlur(11, sigma=(0.1, 2.0))], p=0.5),  # 10 % of 112, odd
            T.ToTensor(), T.Normalize(mean, std)])

    return MultiView([group(g) for g in spec.view_groups])


class MultiView:
    """One transform per view (picklable, for the forkserver workers)."""

    def __init__(self, per_view):
        self.per_view = per_view

    def __call__(self, img):
        return [t(img) for t in self.per_view]


def _worker_kwargs(workers: int, mp_context: str | None) -> dict:
    # As dist_ssl's TrainLoader: prefetch 2, workers started every epoch, same start method.
    if workers == 0:
        return {}
    return {"prefetch_factor": 2, "persistent_workers": False,
            "multiprocessing_context": multiprocessing.get_context(mp_context)}


def _drain(loader, finish, limit: int | None) -> tuple[int, float, float]:
    """(images, seconds, seconds to the first batch) of one pass, or of its first ``limit``
    batches; ``finish(batch)`` is the main process's last step. Worker start-up included."""
    t0, n, first = time.perf_counter(), 0, None
    for i, batch in enumerate(loader):
        batch = finish(batch)
        n += len(batch["index"] if isinstance(batch, dict) else batch[1])
        first = first or time.perf_counter() - t0
        if limit is not None and i + 1 >= limit:
            break
    return n, time.perf_counter() - t0, first


def tv_pass(folder: Path, batch_size: int, workers: int, mp_context, seed: int, epoch: int,
            limit=None):
    from torchvision.datasets import ImageFolder
    torch.manual_seed(seed + epoch)  # torchvision's transforms draw from the global RNGs
    ds = ImageFolder(str(folder), transform=torchvision_transform(SPEC))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(seed + epoch),
                        **_worker_kwargs(workers, mp_context))
    return _drain(loader, lambda b: b, limit)


def ours_pass(shard_dir: Path, batch_size: int, workers: int, mp_context, seed: int,
              epoch: int, limit=None, decode: str = "cpu"):
    loader = build_train_loader(shard_dir, SPEC, batch_size, num_workers=workers, seed=seed,
                                mp_context=mp_context, uint8_views=True, decode=decode)
    loader.set_epoch(epoch)
    if decode == "gpu":  # the device half is not measured here
        return _drain(loader, lambda b: b, limit)
    return _drain(loader, lambda b: loader.to_device(b, "cpu"), limit)


# ---------------------------------------------------------------- the writers
def shard_pass(loose: Path, out: Path, sps: int, workers: int, extra: list, tool_rates: list):
    """The sharding CLI end to end into ``out`` (made empty before); records the tool's rate."""
    cmd = [sys.executable, str(REPO / "tools" / "make_shards.py"), "-q", "write",
           f"imagefolder:{loose}", str(out), "--samples-per-shard", str(sps),
           "--workers", str(workers), *extra]
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


def per_core(res: dict, name: str) -> list[float]:
    return [1000.0 / c for c in res[name]["cpu"]]


def ratio_row(res: dict, a: str, b: str, target: float | None) -> str:
    """Per-core (CPU-time) and wall-clock ratios a/b, paired by round."""
    cpu = [x / y for x, y in zip(per_core(res, a), per_core(res, b))]
    wall = [x / y for x, y in zip(res[a]["rate"], res[b]["rate"])]
    row = (f"{a}/{b}: per core {_stat(cpu, '.2f')}, wall {_stat(wall, '.2f')}")
    if target is not None:
        met = statistics.median(cpu) >= target
        row += f"  (target >= {target} per core: {'met' if met else 'NOT met'})"
    return row


def report(a, n: int, loader: dict, writer: dict, tool_rates: dict) -> None:
    print(f"\n=== {n} JPEGs, {a.workers} workers, batch {a.batch_size}, "
          f"{'COLD (evicted before every pass)' if a.cold else 'warm'} page cache; "
          f"median [min-max] of {a.rounds} rounds; load average now {os.getloadavg()[0]:.2f} ===")
    print(f"{'':10s} {'wall img/s':>18s} {'cpu ms/img':>20s} {'per-core img/s':>18s} "
          f"{'cores for 10k img/s':>20s}")
    for name, r in {**loader, **writer}.items():
        cores = [10.0 * c for c in r["cpu"]]  # 10,000 img/s x ms/img / 1000
        print(f"{name:10s} {_stat(r['rate']):>18s} {_stat(r['cpu'], '.2f'):>20s} "
              f"{_stat(per_core({name: r}, name)):>18s} {_stat(cores, '.1f'):>20s}")
    if loader:
        print(ratio_row(loader, "resize", "tv", 3.0))
        print(ratio_row(loader, "copy", "tv", 1.3))
        print(ratio_row(loader, "resize", "copy", None))
        if "gpu-wk" in loader:
            print(ratio_row(loader, "gpu-wk", "tv", None) + "  (worker side only)")
        print("first batch s: " + " | ".join(f"{k} {_stat(v['first'], '.2f')}"
                                             for k, v in loader.items()))
    if writer:
        print(ratio_row(writer, "shards", "cp", 0.8))
        print(ratio_row(writer, "shards-rs", "cp", None))
        print("make_shards' own rate (interpreter start excluded): " + " | ".join(
            f"{k} {_stat(v[a.warmup:])} img/s" for k, v in tool_rates.items()))


def bench_writers(a, work: Path, items, tool_rates: dict) -> dict:
    loose, files = work / "loose", [p for p, _ in items]
    resize = ["--resize", str(a.resize_side)]
    tool_rates.update({"shards": [], "shards-rs": []})
    cands = {"shards": lambda r, _: shard_pass(loose, work / "shards", a.samples_per_shard,
                                               a.workers, [], tool_rates["shards"]),
             "shards-rs": lambda r, _: shard_pass(loose, work / "resized", a.samples_per_shard,
                                                  a.workers, resize, tool_rates["shards-rs"]),
             "cp": lambda r, _: copy_pass(files, loose, work / "copy")}
    print(f"\nwriter: make_shards --workers {a.workers} (bytes copied / --resize "
          f"{a.resize_side}) vs shutil.copyfile (1 process)")
    reads = {k: (lambda: files) for k in cands}
    dirs = {"shards": "shards", "shards-rs": "resized", "cp": "copy"}
    before = {k: (lambda k=k: shutil.rmtree(work / dirs[k], ignore_errors=True)) for k in cands}
    return run_rounds(cands, reads, a, before)


def bench_loaders(a, work: Path) -> dict:
    kw = {"batch_size": a.batch_size, "workers": a.workers, "seed": a.seed,
          "mp_context": a.mp_context}
    cands = {"tv": lambda r, lim: tv_pass(work / "loose", epoch=r, limit=lim, **kw),
             "copy": lambda r, lim: ours_pass(work / "shards", epoch=r, limit=lim, **kw),
             "resize": lambda r, lim: ours_pass(work / "resized", epoch=r, limit=lim, **kw)}
    if not a.no_gpu_workers:
        cands["gpu-wk"] = lambda r, lim: ours_pass(work / "shards", epoch=r, limit=lim,
                                                   decode="gpu", **kw)
    files = sorted((work / "loose").rglob("*.jpg"))
    reads = {"tv": lambda: files, "copy": lambda: sorted((work / "shards").glob("*.tar")),
             "resize": lambda: sorted((work / "resized").glob("*.tar")),
             "gpu-wk": lambda: sorted((work / "shards").glob("*.tar"))}
    print(f"\nloader: {a.workers} workers ({a.mp_context}), batch {a.batch_size}, IDMM views "
          f"(2x112 (0.14, 1) + 4x112 (0.05, 0.4), simclr); warm-up passes stop after "
          f"{a.warmup_batches or 'all'} batches")
    return run_rounds(cands, reads, a)


def stage_costs(work: Path, files: list[Path], n: int = 200) -> None:
    """CPU microseconds per image of each step in this process (page-cached; process_time, so
    other users' load hardly matters), over the first ``n`` images."""
    from dist_ssl.data import gpu_payload
    from dist_ssl.data.augment import render_views, view_rng
    from dist_ssl.data.crop_plan import max_reduction, plan_views
    from dist_ssl.data.decode import load_image, open_sample
    from dist_ssl.data.images import probe_image
    from dist_ssl.data.shard_resize import resize_image
    (work / "stage_copy").mkdir()
    raws = [{"__key__": str(i), "jpg": p.read_bytes(), "cls": b"0", "idx": str(i).encode()}
            for i, p in enumerate(files[:n])]
    small = [dict(r, jpg=resize_image(r["jpg"], 160, 90)) for r in raws]
    cost, reductions = {}, []

    def timed(name, fn, samples):
        t0 = time.process_time()
        for i, s in enumerate(samples):
            fn(i, s)
        cost[name] = (time.process_time() - t0) / len(samples) * 1e6

    def rngs(i):
        return [view_rng(0, 0, i, 0, v) for v in range(SPEC.num_views)]

    def views(i, s, reduced=True):
        o = open_sample(s)
        plans = plan_views(*o.image.size, SPEC, rngs(i))
        r = max_reduction(plans) if reduced else 1
        reductions.append(r)
        img, scale = load_image(o, r)
        render_views(img, SPEC, plans, scale)

    for r in (1, 2, 4, 8):
        timed(f"decode 1/{r}", lambda i, s: load_image(open_sample(s), r), raws)
    timed("decode 160px", lambda i, s: load_image(open_sample(s), 1), small)
    timed("views full", lambda i, s: views(i, s, False), raws)
    reductions.clear()
    timed("views reduced", views, raws)
    share = sum(r > 1 for r in reductions) / len(reductions)
    timed("views 160px", views, small)
    timed("gpu worker", lambda i, s: gpu_payload.prepare(s, SPEC, rngs), raws)
    timed("probe 1/8", lambda i, s: probe_image(files[i]), raws)
    timed("copyfile", lambda i, s: shutil.copyfile(files[i], work / "stage_copy" / f"{i}.jpg"),
          raws)
    print(f"\nper-image CPU cost, one process, page-cached, {len(raws)} images (us):")
    print("  " + " | ".join(f"{k} {v:.0f}" for k, v in cost.items()))
    print(f"  ({share:.0%} of the 500x375 samples decode reduced for IDMM's views: the smallest "
          f"local crop decides)")


def op_costs(n: int = 200) -> None:
    """PIL vs torchvision tensor ops on one 112 px uint8 view, CPU us per call (one thread)."""
    import numpy as np
    from PIL import ImageFilter
    from sklearn.datasets import load_sample_images
    from torchvision.transforms import functional as TF
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F2
    photo = Image.fromarray(load_sample_images().images[0])
    pil = photo.resize((112, 112), Image.Resampling.BICUBIC, box=(100, 50, 400, 350))
    ten = torch.from_numpy(np.ascontiguousarray(np.asarray(pil).transpose(2, 0, 1)))
    box = (100, 50, 400, 350)
    pairs = {
        "resize": (lambda: photo.resize((112, 112), Image.Resampling.BICUBIC, box=box),
                   lambda: F2.resized_crop(big, 50, 100, 300, 300, [112, 112], antialias=True,
                                           interpolation=InterpolationMode.BICUBIC)),
        "brightness": (lambda: TF.adjust_brightness(pil, 1.3), lambda: F2.adjust_brightness(ten, 1.3)),
        "contrast": (lambda: TF.adjust_contrast(pil, 1.3), lambda: F2.adjust_contrast(ten, 1.3)),
        "saturation": (lambda: TF.adjust_saturation(pil, 1.3), lambda: F2.adjust_saturation(ten, 1.3)),
        "hue": (lambda: TF.adjust_hue(pil, 0.1), lambda: F2.adjust_hue(ten, 0.1)),
        "blur": (lambda: pil.filter(ImageFilter.GaussianBlur(1.0)),
                 lambda: F2.gaussian_blur(ten, [11, 11], [1.0, 1.0])),
    }
    big = torch.from_numpy(np.ascontiguousarray(np.asarray(photo).transpose(2, 0, 1)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    print("\nper-op CPU cost on a 112 px view, one thread (us): PIL uint8 vs torchvision uint8 "
          "tensor")
    for name, (p, t) in pairs.items():
        times = []
        for fn in (p, t):
            fn()
            t0 = time.process_time()
            for _ in range(n):
                fn()
            times.append((time.process_time() - t0) / n * 1e6)
        print(f"  {name:10s} PIL {times[0]:6.0f} | tensor {times[1]:6.0f} | "
              f"tensor/PIL {times[1] / times[0]:.2f}")
    torch.set_num_threads(threads)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--per-class", type=int, default=200)
    p.add_argument("--workers", type=int, default=2, help="DataLoader and make_shards workers")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--samples-per-shard", type=int, default=250)
    p.add_argument("--resize-side", type=int, default=160, help="make_shards --resize of (c)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (each runs every candidate)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--warmup-batches", type=int, default=4,
                   help="loader batches per warm-up pass (0: a full pass); writers do full ones")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mp-context", default=_LOADER_MP, choices=("fork", "forkserver", "spawn"),
                   help=f"worker start method of all loaders (default: ours, {_LOADER_MP})")
    p.add_argument("--cold", action="store_true",
                   help="evict the files a pass reads from the page cache before every pass")
    p.add_argument("--no-gpu-workers", action="store_true", help="skip the (g) gpu-wk row")
    p.add_argument("--photos", type=Path, default=None, help="more real JPEG photos to cut from")
    p.add_argument("--only", choices=("writers", "loaders"), default=None,
                   help="run one half (loaders still need the shards: writers run once, "
                        "untimed)")
    p.add_argument("--profile", action="store_true",
                   help="then: per-step CPU costs and PIL vs tensor op costs")
    p.add_argument("--workdir", type=Path, default=None,
                   help="parent folder for all files (default: the system temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    return p


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
        photos = source_photos(a.photos)
        items = make_images(work / "loose", photos, a.classes, a.per_class, a.seed)
        size = sum(p.stat().st_size for p, _ in items)
        print(f"made {len(items)} JPEGs ({size / 2**20:.1f} MiB, {size / len(items) / 1024:.1f} "
              f"KiB each) from {len(photos)} photos ({', '.join(n for n, _ in photos)}) in "
              f"{time.perf_counter() - t0:.1f} s")
        tool_rates: dict = {}
        if a.only == "loaders":  # make the shards once, untimed
            a_once = argparse.Namespace(**{**vars(a), "rounds": 0, "warmup": 1})
            bench_writers(a_once, work, items, tool_rates)
            writer = {}
        else:
            writer = bench_writers(a, work, items, tool_rates)
        loader = {}
        if a.only != "writers":
            if a.mp_context == "forkserver":  # what TrainLoader asks for, for all loaders
                multiprocessing.get_context("forkserver").set_forkserver_preload(
                    ["__main__", "dist_ssl.data.loader"])
            loader = bench_loaders(a, work)  # on the last writer passes' shards
        report(a, len(items), loader, writer, tool_rates)
        if a.profile:
            stage_costs(work, [p for p, _ in items])
            op_costs()
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
