"""One command that measures dist_ssl's compute path on one GPU and prints one table (< 8 min).

    python benchmarks/gpu_check.py [--json OUT]      # one GPU
    python benchmarks/gpu_check.py --smoke           # the same code at tiny sizes on CPU (the tests run it)

Sections (rows of the table):

  idmm    IDMM (2 global + 4 local crops, CutMix, label smoothing, the N-way classifier of
          ``ShardedLinear``) with DeiT-Tiny at 112 px on synthetic batches, one process:
          eager / compiled (``parallel.compile``: ``compile_student``, inductor) x fp32 / bf16
          (autocast, what ``parallel.mixed_precision: bf16`` does; the classifier then computes
          in bf16). img/s (images, each 6 crops), step seconds, first-step seconds (compile),
          peak memory of the timed steps above the weights, optimizer state and batches
          (activations, gradients), MFU = model FLOPs per step (``torch.utils.flop_counter`` on one eager
          forward+backward, classifier included; the optimizer is not counted) / step time /
          the device's dense bf16 peak (``PEAK_BF16_TFLOPS``; all rows on that one scale).
          fp32 matmuls run with torch's default precision (no TF32).
  fc      the classifier alone, forward+backward at N = 1,281,167, D = 192, M rows: dense
          (``x @ W.T`` + cross-entropy), torch's chunked ``F.linear_cross_entropy`` (its default
          chunking and one chunk), ours (one logit block; 256-row class blocks), Apple's CCE
          (Triton: GPU only) in fp32 / bf16; seconds, peak memory above W and the inputs, loss
          minus dense fp32. Hard labels without smoothing: the only case torch's chunked path runs.
  loader  ``build_train_loader`` img/s with IDMM's views on synthetic JPEG shards, batches moved
          to the device: CPU decode, and GPU decode when the loader has a ``decode`` option
          (``data.decode: gpu``; otherwise the row says it was skipped).
  drift   bf16 vs fp32 IDMM loss over 50 eager steps from the same weights and batches: the
          relative difference at the first, worst and last step.

Device peaks: bf16 dense tensor-core TFLOPS from the vendors' data sheets, matched on
``torch.cuda.get_device_name()``; an unknown device (or the CPU in smoke mode) uses the measured
throughput of a large matmul in that device's best dtype instead, and says so.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

import dist_ssl.models.factory  # noqa: F401  (registers the small ViTs with timm)
from dist_ssl.methods import MethodContext, build_method
from dist_ssl.methods.configs.idmm import IDMMConfig
from dist_ssl.models.config import ModelConfig
from dist_ssl.parallel.compile import compile_student
from dist_ssl.parallel.sharded_soft_ce import sharded_soft_cross_entropy

IMAGENET = 1_281_167
PEAK_BF16_TFLOPS = [  # (name fragment, dense bf16 TFLOPS), most specific first
    ("H200 NVL", 835.0), ("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),
    ("A100", 312.0),
]


@dataclass(frozen=True)
class Sizes:
    model: str = "deit_tiny"
    img: int = 112
    batch: int = 128  # images per step (x 6 crops)
    instances: int = IMAGENET  # IDMM's N
    compile_backend: str = "inductor"
    warmup: int = 3
    steps: int = 20
    fc_rows: int = 1024
    fc_n: int = IMAGENET
    fc_d: int = 192
    fc_chunk: int = 256
    fc_reps: int = 5
    drift_steps: int = 50
    loader_images: int = 2048
    loader_batch: int = 128
    loader_batches: int = 12
    loader_workers: int = min(8, os.cpu_count() or 1)


SMOKE = Sizes(model="vit_pico_patch4_28", img=16, batch=4, instances=500, compile_backend="aot_eager", warmup=1,
              steps=2, fc_rows=32, fc_n=2000, fc_d=16, fc_chunk=8, fc_reps=1, drift_steps=3, loader_images=48,
              loader_batch=8, loader_batches=3, loader_workers=0)


# ----------------------------------------------------------------------------- device helpers
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak bytes allocated above the level at entry: CUDA allocator stats, or on CPU the RSS
    high-water mark (Linux /proc; reset on entry)."""

    def __init__(self, device: torch.device):
        self.device, self.bytes = device, 0

    def __enter__(self):
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self.base = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        sync(self.device)
        peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                else _status_kb("VmHWM") * 1024)
        self.bytes = max(peak - self.base, 0)


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def device_peak(device: torch.device) -> tuple[float, str]:
    """(dense bf16 peak FLOP/s, where the number comes from)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, tflops in PEAK_BF16_TFLOPS:
            if fragment in name:
                return tflops * 1e12, f"{name}: data-sheet dense bf16 {tflops:g} TFLOPS"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPUs here have no bf16 units
    a = torch.randn(2048, 2048, device=device, dtype=dtype)
    (a @ a).sum().item()
    sync(device)
    t0, reps = time.perf_counter(), 5
    for _ in range(reps):
        a @ a
    sync(device)
    flops = 2 * 2048**3 * reps / (time.perf_counter() - t0)
    return flops, f"{device}: no data-sheet peak known, measured {dtype} 2048^3 matmul {flops / 1e12:.3g} TFLOPS"


def _free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- IDMM steps
def build_idmm(sz: Sizes, device: torch.device):
    model = ModelConfig(name=sz.model, img_size=sz.img, in_chans=3)
    ctx = MethodContext(model=model, num_samples=sz.instances, num_classes=1, in_chans=3)
    torch.manual_seed(0)
    method = build_method(IDMMConfig(global_size=sz.img, seed=0), ctx).to(device)
    opts = [torch.optim.AdamW(method.student.parameters(), lr=1e-4),
            torch.optim.AdamW(method.classifier.parameters(), lr=1e-4)]
    return method, opts


def synthetic_batch(method, sz: Sizes, device: torch.device, seed: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(seed)
    views = [torch.randn(sz.batch, 3, grp.size, grp.size, generator=g).to(device)
             for grp in method.train_views().view_groups]
    index = torch.randperm(sz.instances, generator=g)[:sz.batch].to(device)
    return {"index": index, "label": torch.zeros(sz.batch, dtype=torch.long, device=device), "views": views}


def idmm_step(method, opts, batch, step: int, bf16: bool, backward_only: bool = False) -> torch.Tensor:
    dev = batch["views"][0].device.type
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
        loss = method(batch, step)["loss"]
    loss.backward()
    if not backward_only:
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
    return loss.detach()


def idmm_flops(sz: Sizes, device: torch.device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    method, opts = build_idmm(sz, device)
    batch = synthetic_batch(method, sz, device, 0)
    with FlopCounterMode(display=False) as counter:
        idmm_step(method, opts, batch, 0, bf16=False, backward_only=True)
    return float(counter.get_total_flops())


def idmm_row(sz: Sizes, device: torch.device, compiled: bool, bf16: bool, flops: float, peak: float) -> dict:
    method, opts = build_idmm(sz, device)
    if compiled:
        compile_student(method.student, backend=sz.compile_backend)
    batches = [synthetic_batch(method, sz, device, s) for s in range(2)]
    sync(device)
    t0 = time.perf_counter()
    idmm_step(method, opts, batches[0], 0, bf16)  # compiles when compiled
    sync(device)
    first = time.perf_counter() - t0
    for s in range(1, sz.warmup):
        idmm_step(method, opts, batches[s % 2], s, bf16)
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        for s in range(sz.steps):
            loss = idmm_step(method, opts, batches[s % 2], sz.warmup + s, bf16)
        sync(device)
        step_s = (time.perf_counter() - t0) / sz.steps
    row = {"section": "idmm", "name": f"{'compiled' if compiled else 'eager'} {'bf16' if bf16 else 'fp32'}",
            "img_s": sz.batch / step_s, "step_s": step_s, "first_step_s": first, "peak_mb": mem.bytes / 2**20,
            "mfu": flops / step_s / peak, "tflops": flops / step_s / 1e12, "loss": loss.item()}
    del method, opts, batches
    _free(device)
    return row


def drift_row(sz: Sizes, device: torch.device) -> dict:
    """bf16 vs fp32 losses from the same weights over the same batches (eager)."""
    losses = {}
    for bf16 in (False, True):
        method, opts = build_idmm(sz, device)
        losses[bf16] = [idmm_step(method, opts, synthetic_batch(method, sz, device, 100 + s), s, bf16).item()
                        for s in range(sz.drift_steps)]
    rel = [abs(b - f) / abs(f) for f, b in zip(losses[False], losses[True])]
    return {"section": "drift", "name": f"bf16 vs fp32, {sz.drift_steps} steps", "first_rel": rel[0],
            "max_rel": max(rel), "last_rel": rel[-1], "fp32_last": losses[False][-1], "bf16_last": losses[True][-1]}


# ----------------------------------------------------------------------------- the classifier
def fc_rows(sz: Sizes, device: torch.device) -> list[dict]:
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(sz.fc_rows, sz.fc_d, generator=g).to(device)
    w = (torch.randn(sz.fc_n, sz.fc_d, generator=g) * 0.02).to(device)
    a = torch.randint(0, sz.fc_n, (sz.fc_rows,), generator=g).to(device)
    ones = torch.ones(sz.fc_rows, device=device)
    kinds = {  # bf16 rows run under a bf16 autocast; torch's loss is not on autocast's list: cast for it
        "dense": lambda xs, ws: F.cross_entropy(xs @ ws.t(), a),
        "torch auto": lambda xs, ws: _torch_lce(*_autocast_dtype(xs, ws), a, None),
        "torch 1 chunk": lambda xs, ws: _torch_lce(*_autocast_dtype(xs, ws), a, sz.fc_rows),
        "ours": lambda xs, ws: sharded_soft_cross_entropy(xs, ws, 0, sz.fc_n, a, a, ones),
        f"ours {sz.fc_chunk}-row blocks": lambda xs, ws: sharded_soft_cross_entropy(
            xs, ws, 0, sz.fc_n, a, a, ones, chunk_size=sz.fc_chunk),
        "cce": lambda xs, ws: _cce(xs, ws, a),
    }
    rows, reference = [], None
    for precision in ("fp32", "bf16"):
        for name, fn in kinds.items():
            row = {"section": "fc", "name": f"{name} {precision}", "n": sz.fc_n, "d": sz.fc_d, "m": sz.fc_rows}
            if name == "cce" and (device.type != "cuda" or precision == "fp32"):
                rows.append({**row, "skipped": "CCE's Triton kernel needs a GPU and bf16/fp16 inputs"})
                continue
            res = _time_fc(fn, x, w, device, precision == "bf16", sz.fc_reps)
            reference = res["loss"] if reference is None else reference
            rows.append({**row, **res, "loss_minus_dense_fp32": res["loss"] - reference})
    return rows


def _autocast_dtype(*tensors):
    """The tensors in the active autocast dtype (as autocast would cast a matmul's inputs)."""
    dev = tensors[0].device.type
    if not torch.is_autocast_enabled(dev):
        return tensors
    return tuple(t.to(torch.get_autocast_dtype(dev)) for t in tensors)


def _torch_lce(x, w, target, rows):
    from torch.nn import LinearCrossEntropyOptions

    opts = LinearCrossEntropyOptions() if rows is None else LinearCrossEntropyOptions(batch_chunk_size=rows,
                                                                                         chunking_method=None)
    return F.linear_cross_entropy(x, w, target, options=opts)


def _cce(x, w, target):
    """Apple's CCE as its users call it: default gradient filtering (filter_eps="high" skips
    gradient entries below bf16 resolution), bf16 inputs."""
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy(x.to(torch.bfloat16), w.to(torch.bfloat16), target).float()


def _time_fc(fn, x, w, device, bf16: bool, reps: int) -> dict:
    times = []
    for i in range(reps + 1):  # the first is a warm-up (allocator, kernels, autotuning)
        xs, ws = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = fn(xs, ws)
            loss.backward()
            sync(device)
            elapsed = time.perf_counter() - t0
        times.append(elapsed)
        del xs, ws
        if i == 1 and times[0] > 2.0:  # a slow kind (torch's 1-row chunks): one timed run is enough
            break
    timed = times[1:]
    return {"fwd_bwd_s": sorted(timed)[len(timed) // 2], "peak_mb": mem.bytes / 2**20, "loss": loss.item()}


# ----------------------------------------------------------------------------- the loader
def loader_rows(sz: Sizes, device: torch.device) -> list[dict]:
    from dist_ssl.data.loader import build_train_loader
    from dist_ssl.data.shard_writer import write_dataset
    from dist_ssl.data.views import ViewSpec

    idmm = IDMMConfig(global_size=sz.img)
    spec = ViewSpec(idmm.crop_groups(), policy=idmm.policy, in_chans=3)  # IDMM.train_views(), no W needed

    has_decode = "decode" in inspect.signature(build_train_loader).parameters
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _write_jpegs(Path(tmp) / "images", sz.loader_images)
        write_dataset(f"imagefolder:{Path(tmp) / 'images'}", Path(tmp) / "shards", samples_per_shard=256)
        for decode in ("cpu", "gpu"):
            row = {"section": "loader", "name": f"{decode} decode", "workers": sz.loader_workers}
            if decode == "gpu" and not has_decode:
                rows.append({**row, "skipped": "this build's loader has no decode option (data.decode: gpu)"})
                continue
            extra = {"decode": decode} if has_decode else {}
            loader = build_train_loader(Path(tmp) / "shards", spec, sz.loader_batch,
                                        num_workers=sz.loader_workers, **extra)
            rows.append({**row, **_time_loader(loader, sz, device)})
    return rows


def _time_loader(loader, sz: Sizes, device: torch.device) -> dict:
    move = getattr(loader, "to_device", None)
    loader.set_epoch(0)
    seen, t0 = 0, None
    for i, batch in enumerate(loader):
        views = move(batch, device)["views"] if move else [v.to(device) for v in batch["views"]]
        sync(device)
        if i == 0:  # worker start-up and the shuffle buffer fill are not throughput
            t0 = time.perf_counter()
        else:
            seen += views[0].shape[0]
        if i == sz.loader_batches:
            break
    return {"img_s": seen / (time.perf_counter() - t0), "batches": i}


def _write_jpegs(root: Path, n: int) -> None:
    """n smooth random photos-like JPEGs (160-400 px, quality 90) in 4 class folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class_{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(160, 400, size=2)
        grid = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
        img = Image.fromarray(grid).resize((int(w), int(h)), Image.BICUBIC)
        noise = rng.normal(0, 8, size=(int(h), int(w), 3))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
        img.save(folder / f"{i:05d}.jpg", quality=90)


# ----------------------------------------------------------------------------- report
def run(sz: Sizes, device: torch.device) -> dict:
    t_start = time.perf_counter()
    peak, peak_note = device_peak(device)
    print(f"device: {peak_note}", flush=True)
    flops = idmm_flops(sz, device)
    print(f"IDMM step: {flops / 1e12:.3f} TFLOP forward+backward ({sz.model} {sz.img} px, {sz.batch} images x 6 "
          f"crops, N = {sz.instances})", flush=True)
    rows = []
    for compiled in (False, True):
        for bf16 in (False, True):
            rows.append(idmm_row(sz, device, compiled, bf16, flops, peak))
            _print_row(rows[-1], t_start)
            torch._dynamo.reset()
    for row in fc_rows(sz, device):
        rows.append(row)
        _print_row(row, t_start)
    for row in loader_rows(sz, device):
        rows.append(row)
        _print_row(row, t_start)
    rows.append(drift_row(sz, device))
    _print_row(rows[-1], t_start)
    total = time.perf_counter() - t_start
    print(f"\ntotal {total:.0f} s")
    return {"device": peak_note, "device_name": _device_name(device), "sizes": asdict(sz),
            "flops_per_step": flops, "rows": rows, "total_s": total, "torch": torch.__version__}


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _print_row(row: dict, t_start: float) -> None:
    keys = [k for k in row if k not in ("section", "name")]
    cells = []
    for k in keys:
        v = row[k]
        cells.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    print(f"[{time.perf_counter() - t_start:6.0f} s] {row['section']:>6} | {row['name']:<26} | " + ", ".join(cells),
          flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (what the tests run)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--steps", type=int, default=None, help="timed IDMM steps per configuration")
    args = ap.parse_args(argv)
    sz = SMOKE if args.smoke else Sizes()
    if args.steps:
        sz = replace(sz, steps=args.steps)
    if args.smoke:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        ap.error("no GPU: run with --smoke for the CPU version at tiny sizes")
    result = run(sz, device)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    bad = [r["name"] for r in result["rows"] for v in r.values() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        print(f"non-finite numbers in rows {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
