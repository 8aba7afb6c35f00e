"""Engine overhead: steps/s of dist_ssl's training loop vs a bare PyTorch loop, one process.

Both loops train the same model (same init) with the same AdamW param groups, the same
warmup-cosine LambdaLR and the same in-memory batches (data loading is excluded on purpose:
this measures what the engine adds — accelerate's accumulate/backward, method dispatch,
metric reductions and sinks, checkpoint/preemption checks). The two are timed alternately,
several rounds, and the median of each is compared.

    python benchmarks/trainer_overhead.py [--steps 60] [--rounds 5] [--model vit_pico_patch4_28]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


class InMemoryLoader:
    """Stands in for the shard loader: the same pre-made batches every epoch."""

    def __init__(self, batches, num_samples, num_classes):
        self.batches, self.num_samples, self.num_classes = batches, num_samples, num_classes

    def set_position(self, epoch, step):
        self.start = step

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        return iter(self.batches[getattr(self, "start", 0):])

    def to_device(self, batch, device, dtype=None):  # views are made float already
        return {k: [v.to(device, dtype=dtype) for v in x] if k == "views" else x.to(device)
                for k, x in batch.items()}


def make_batches(n, batch, size, in_chans, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"views": [torch.randn(batch, in_chans, size, size, generator=g)],
             "label": torch.randint(0, classes, (batch,), generator=g),
             "index": torch.arange(batch)} for _ in range(n)]


def build_engine(args, workdir: Path, batches):
    from dist_ssl.config import load_config
    from dist_ssl.data.shard_writer import write_dataset
    from dist_ssl.data.fashion_mnist import default_dir
    from dist_ssl.engine.trainer import Trainer

    shards = workdir / "shards"
    if not (shards / "manifest.json").exists():
        write_dataset(f"idx:{default_dir()}", shards, split="train", subset="random:256",
                      samples_per_shard=256, seed=0)
    cfg = load_config(REPO / "recipes" / "supervised_fmnist2k.yaml", [
        f"output_dir={workdir / 'run'}", f"data.train={shards}", "data.val=null",
        f"model.name={args.model}", "model.drop_path=0.0", f"train.batch_size={args.batch}",
        f"train.steps={args.steps * (args.rounds + 1)}", "ckpt.every_steps=1000000",
        "metrics.log_every_steps=10", "data.num_workers=0", "resume=none"])
    trainer = Trainer(cfg)
    trainer.parts.loader = InMemoryLoader(batches, 256, 10)
    trainer.parts.steps_per_epoch = len(batches)
    return trainer


def time_engine(trainer) -> float:
    from dist_ssl.engine.preemption import PreemptionFlag
    from dist_ssl.engine.progress import Progress

    flag, progress = PreemptionFlag(), Progress(1, enabled=False)
    trainer.step = 0  # epoch 0 from its first batch; the optimizer state just keeps going
    t0 = time.perf_counter()
    trainer._run_epoch(flag, progress)
    flag.close()
    return time.perf_counter() - t0


def time_bare(model, optimizer, scheduler, batches) -> float:
    t0 = time.perf_counter()
    for batch in batches:
        logits = model(batch["views"][0])
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    loss.item()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--model", default="vit_pico_patch4_28")
    args = parser.parse_args()
    torch.set_num_threads(1)  # steadier timings on a shared 2-core machine
    from dist_ssl.engine.optim import build_optimizer, param_groups
    from dist_ssl.engine.schedules import build_lr_scheduler

    batches = make_batches(args.steps, args.batch, 28, 1, 10)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = build_engine(args, Path(tmp), batches)
        model = copy.deepcopy(trainer.parts.method.backbone())
        cfg = trainer.cfg
        optimizer = build_optimizer(cfg.optim, param_groups(model, cfg.optim.weight_decay),
                                    trainer.parts.lr)
        scheduler = build_lr_scheduler(optimizer, total_steps=trainer.parts.total_steps,
                                       warmup_steps=0, lr=trainer.parts.lr, min_lr=cfg.optim.min_lr)
        time_bare(model, optimizer, scheduler, batches[:5])  # warm-up both
        time_engine(trainer)
        engine, bare = [], []
        for _ in range(args.rounds):
            engine.append(args.steps / time_engine(trainer))
            bare.append(args.steps / time_bare(model, optimizer, scheduler, batches))
        trainer.sinks.close()
    e, b = statistics.median(engine), statistics.median(bare)
    print(f"model {args.model}, batch {args.batch}, {args.steps} steps x {args.rounds} rounds, 1 thread")
    print(f"engine  {e:8.2f} steps/s  (rounds: {', '.join(f'{v:.2f}' for v in engine)})")
    print(f"bare    {b:8.2f} steps/s  (rounds: {', '.join(f'{v:.2f}' for v in bare)})")
    print(f"engine / bare = {e / b:.3f}  (overhead {100 * (1 - e / b):.1f}%; target < 5%)")


if __name__ == "__main__":
    main()
