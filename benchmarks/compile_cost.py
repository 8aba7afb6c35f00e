"""What the first torch.compile of a tiny ViT costs on this machine (why the suite compiles once).

vit_pico_patch4_28 (0.46M parameters), batch 8, compiled in place (``m.compile()``, what
``parallel.compile`` does); prints the wall time and CPU of the first forward+backward (the
compile), CPU of this process and of its children (inductor's gcc runs), and the time of the next
steps. Set ``TORCHINDUCTOR_CACHE_DIR`` to a new folder for a cold cache.

    TORCHINDUCTOR_COMPILE_THREADS=1 python benchmarks/compile_cost.py [--backend inductor|aot_eager|eager]
"""
from __future__ import annotations

import argparse
import resource
import sys
import time

import timm
import torch

import dist_ssl.models.factory  # noqa: F401  (registers the small ViTs with timm)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="inductor")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model("vit_pico_patch4_28", pretrained=False, num_classes=0, in_chans=1)
    x = torch.randn(8, 1, 28, 28)
    model.compile(backend=args.backend)
    t0, c0, k0 = time.perf_counter(), time.process_time(), _children_cpu()
    model(x).sum().backward()
    wall, cpu, kids = time.perf_counter() - t0, time.process_time() - c0, _children_cpu() - k0
    t0 = time.perf_counter()
    for _ in range(3):
        model(x).sum().backward()
    step = (time.perf_counter() - t0) / 3
    print(f"{args.backend}: first forward+backward {wall:.1f} s wall, {cpu:.1f} s CPU in this process, "
          f"{kids:.1f} s CPU in child processes (compilers); next steps {step:.3f} s each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
