"""The training loop: method-agnostic, resumable, preemptible.

Position bookkeeping: ``step`` counts optimizer steps (the unit of schedules, logs and
checkpoints). Epoch e covers steps [e * S, (e + 1) * S) with S = steps per epoch; the data
position of step k is (epoch k // S, micro-batch (k % S) * accumulation), which the loader
jumps to without touching the skipped samples, so a resumed run sees exactly the batches an
uninterrupted one would.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import torch

from dist_ssl.config.errors import ConfigError
from dist_ssl.config.run import save_config
from dist_ssl.engine.checkpoint import CheckpointError, CheckpointManager
from dist_ssl.engine.evaluate import evaluate_topk
from dist_ssl.engine.metrics import build_sinks, memory_stats
from dist_ssl.engine.optim import set_weight_decay
from dist_ssl.engine.preemption import REQUEUE_EXIT_CODE, PreemptionFlag, check_due
from dist_ssl.engine.progress import Progress
from dist_ssl.step_schedules import cosine
from dist_ssl.engine.setup import RunParts, build_run, run_name
from dist_ssl.methods.base import MethodState
from dist_ssl.parallel.accelerator import describe
from dist_ssl.parallel.rank_local import STATE_NAME as RANK_LOCAL
from dist_ssl.atomic import atomic_write_json
from dist_ssl.models.export import export_backbone, export_head
from dist_ssl.run_files import BACKBONE_FILE, CONFIG_FILE, EVAL_FILE, HEAD_FILE, RUN_INFO_FILE

log = logging.getLogger(__name__)


def _backbone_state(state: dict, student, backbone) -> dict:
    """The backbone's entries of the student's gathered state dict, keys as the backbone names
    them (the student may wrap it, e.g. a multi-crop wrapper with a projection head)."""
    from dist_ssl.models.export import strip_wrapper_prefixes, unwrap_model

    prefix = next((n for n, m in unwrap_model(student).named_modules() if m is backbone), "")
    if not prefix:
        return state
    state = strip_wrapper_prefixes(state)
    return {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}


class Trainer:
    """``Trainer(cfg).fit()`` trains a run. ``parts`` (what ``build_run(cfg)`` returns) may be
    built by the caller instead, e.g. a test that trains in-process or swaps the loader."""

    def __init__(self, cfg, parts: Optional[RunParts] = None):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)
        _check_output_dir(self.out)
        self.parts: RunParts = parts if parts is not None else build_run(cfg)
        acc = self.parts.accelerator
        self.is_main = acc.is_main_process
        self.ckpt = CheckpointManager(self.out, keep_last=cfg.ckpt.keep_last)
        # what the accelerator does not save, by name; each object says whether it is per rank
        self.stateful = {"method": MethodState(self.parts.method)}
        if self.parts.ema is not None:
            self.stateful["ema"] = self.parts.ema
        if self.parts.rank_local is not None:
            self.stateful[RANK_LOCAL] = self.parts.rank_local
        self.step = 0
        self.sinks = build_sinks(cfg.metrics, self.out, run=run_name(cfg), rank=acc.process_index,
                                 local_rank=acc.local_process_index, is_main=self.is_main)

    # ------------------------------------------------------------------ lifecycle
    def fit(self) -> int:
        """Train to the end (0) or until preempted (REQUEUE_EXIT_CODE, after a checkpoint)."""
        acc, parts = self.parts.accelerator, self.parts
        flag, progress, ok = PreemptionFlag(), None, False
        try:
            self._maybe_resume()  # first: a refused resume leaves the run dir as it was
            if self.is_main:
                save_config(self.cfg, self.out / CONFIG_FILE)
                atomic_write_json(self.out / RUN_INFO_FILE, self.run_info())
            self.sinks.rewind(self.step)  # rows of steps after the checkpoint are redone: one row per step
            progress = Progress(parts.total_steps, enabled=self.is_main, start=self.step)
            while self.step < parts.total_steps:
                if self._run_epoch(flag, progress):
                    self._save()
                    log.warning("preempted by signal %s at step %d: checkpointed, exiting %d",
                                flag.signum, self.step, REQUEUE_EXIT_CODE)
                    ok = True
                    return REQUEUE_EXIT_CODE
            if not (self.ckpt.latest() and self.ckpt.latest().name == self.ckpt.path_for(self.step).name):
                self._save()
            self._export_backbone()
            self._final_eval()
            ok = True
            return 0
        finally:
            if progress is not None:
                progress.close()
            flag.close()
            self.sinks.close()
            if ok:  # after an exception no collective: the other ranks may be inside another one
                acc.wait_for_everyone()
                acc.end_training()  # destroys the process group: without it ranks can abort at exit

    def run_info(self) -> dict:
        parts = self.parts
        return {**describe(parts.accelerator), "global_batch": parts.global_batch, "lr": parts.lr,
                "steps_per_epoch": parts.steps_per_epoch, "total_steps": parts.total_steps,
                "num_samples": parts.loader.num_samples, "num_classes": parts.loader.num_classes,
                "method": self.cfg.method.name}

    def _maybe_resume(self) -> None:
        path = self.ckpt.resolve(self.cfg.resume)
        if path is None:
            return
        self._check_resume_topology(path, self.ckpt.peek(path))  # before anything is loaded
        state = self.ckpt.load(path, self.parts.accelerator, stateful=self.stateful)
        self.step = int(state["step"])
        log.info("resumed from %s at step %d", path, self.step)
        if self.step >= self.parts.total_steps:
            log.warning("the checkpoint (step %d) is at or past this run's %d total steps: nothing left to train; "
                        "evaluating and exporting it as it is (resume=none starts over)",
                        self.step, self.parts.total_steps)

    def _check_resume_topology(self, path: Path, state: dict) -> None:
        """The step counter is the position: it means the same samples, epoch and lr only with the
        same global batch, so a change is an error; another world size with the same global batch
        (e.g. IDMM's shards re-sharded) is fine at an epoch boundary, approximate mid-epoch."""
        parts, acc = self.parts, self.parts.accelerator
        saved_batch, saved_world = state.get("global_batch"), state.get("num_processes")
        if saved_batch is not None and saved_batch != parts.global_batch:
            accum = self.cfg.parallel.grad_accum_steps
            raise CheckpointError(
                f"{path}: written with global batch {saved_batch} ({saved_world} processes), this run has "
                f"{parts.global_batch} ({acc.num_processes} x {self.cfg.train.batch_size} x {accum} accumulation); "
                f"resume with the same global batch (set train.batch_size or parallel.grad_accum_steps) "
                f"or start a new run (resume=none)")
        if saved_world is not None and saved_world != acc.num_processes and int(state.get("step", 0)) % parts.steps_per_epoch:
            log.warning("resuming mid-epoch with %d processes instead of %d: the rest of this epoch is drawn "
                        "from the new per-rank split, so some of its samples may repeat or be skipped "
                        "(exact only with the same world size)", acc.num_processes, saved_world)

    # ------------------------------------------------------------------ one epoch
    def _run_epoch(self, flag: PreemptionFlag, progress: Progress) -> bool:
        """Run from the current position to the epoch's end; True if preempted."""
        parts, acc, cfg = self.parts, self.parts.accelerator, self.cfg
        accum = cfg.parallel.grad_accum_steps
        spe = parts.steps_per_epoch
        epoch = self.step // spe
        parts.loader.set_position(epoch, (self.step % spe) * accum)
        micro = (self.step % spe) * accum
        t_wait = t_last = time.perf_counter()
        waited = 0.0
        for batch in parts.loader:
            waited += time.perf_counter() - t_wait
            loss, logs = self._micro_step(batch)
            micro += 1
            if micro % accum:
                t_wait = time.perf_counter()
                continue
            self.step += 1
            now = time.perf_counter()
            if self.step % cfg.metrics.log_every_steps == 0 or self.step == parts.total_steps:
                self._log(epoch, loss, logs, now - t_last, waited)
            progress.update(self.step, parts.global_batch / max(now - t_last, 1e-9),
                            loss if self.step % cfg.metrics.log_every_steps == 0 else None)
            t_last, waited = now, 0.0
            if self.step % cfg.ckpt.every_steps == 0 and self.step < parts.total_steps:
                self._save()
            if check_due(self.step, cfg.train.preemption_check_steps, spe, parts.total_steps) and \
                    flag.agreed(acc.device, acc.num_processes):
                return True
            if cfg.train.eval_every_epochs and self.step % spe == 0 and \
                    (self.step // spe) % cfg.train.eval_every_epochs == 0 and self.step < parts.total_steps:
                self._evaluate(tag=f"epoch_{self.step // spe}")
            if self.step >= parts.total_steps or micro >= spe * accum:
                break
            t_wait = time.perf_counter()
        return False

    def _micro_step(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        parts, acc = self.parts, self.parts.accelerator
        batch = _to_device(batch, acc.device, parts.input_dtype, parts.loader)
        with acc.accumulate(parts.method.student):
            out = parts.method(batch, self.step)
            loss = out["loss"]
            acc.backward(loss)
            if acc.sync_gradients and self.cfg.optim.clip_grad and not _is_deepspeed(acc):
                norm = acc.clip_grad_norm_(parts.method.student.parameters(), self.cfg.optim.clip_grad)
                # FSDP2 returns a DTensor; the log reduction needs a plain tensor
                out["logs"]["grad_norm"] = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
            if acc.sync_gradients and (wd := self._weight_decay_at(self.step)) is not None:
                self._apply_weight_decay(wd)
            parts.optimizer.step()
            if acc.sync_gradients:
                if parts.rank_local is not None:
                    parts.rank_local.step()
                parts.scheduler.step()
            parts.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            parts.method.after_step(self.step + 1)
            if parts.ema is not None:
                parts.ema.update(parts.method.student)
        return loss.detach(), out["logs"]

    def _weight_decay_at(self, step: int) -> float | None:
        """Scheduled weight decay of optimizer step ``step`` (0-based); None when not scheduled."""
        o = self.cfg.optim
        if o.weight_decay_end is None:
            return None
        return cosine(step, self.parts.total_steps, o.weight_decay, o.weight_decay_end)

    def _apply_weight_decay(self, wd: float) -> None:
        set_weight_decay(self.parts.optimizer, wd)
        if self.parts.rank_local is not None:
            set_weight_decay(self.parts.rank_local.optimizer, wd)

    # ------------------------------------------------------------------ outputs
    def _log(self, epoch: int, loss: torch.Tensor, logs: dict, step_time: float, waited: float) -> None:
        acc, parts = self.parts.accelerator, self.parts
        values = torch.stack([loss.float()] + [torch.as_tensor(v, dtype=torch.float32, device=loss.device)
                                               for v in logs.values()])
        values = acc.reduce(values, reduction="mean")  # collective: every rank logs the same steps
        wd = self._weight_decay_at(self.step - 1)  # of the step just taken, when scheduled
        row = {"epoch": epoch, "loss": values[0].item(),
               **{k: v.item() for k, v in zip(logs, values[1:])},
               "lr": parts.optimizer.param_groups[0]["lr"],
               **({"weight_decay": wd} if wd is not None else {}),
               "images_per_sec": parts.global_batch / max(step_time, 1e-9),
               "samples_seen": self.step * parts.global_batch,
               "step_time": step_time,
               "data_wait_fraction": min(waited / max(step_time, 1e-9), 1.0),
               **memory_stats(acc.device)}
        if not math.isfinite(row["loss"]):
            raise FloatingPointError(f"loss is {row['loss']} at step {self.step}; lower optim.base_lr "
                                     "or enable optim.clip_grad")
        self.sinks.log(self.step, row)

    def _save(self) -> None:
        self.ckpt.save(self.step, self.parts.accelerator,
                       {"epoch": self.step // self.parts.steps_per_epoch,
                        "steps_per_epoch": self.parts.steps_per_epoch,
                        "global_batch": self.parts.global_batch,
                        "num_processes": self.parts.accelerator.num_processes},
                       stateful=self.stateful)

    def _export_backbone(self) -> None:
        acc = self.parts.accelerator
        # collective for FSDP2 / ZeRO-3 (gathers the shards); rank 0 gets the full state dict
        state = acc.get_state_dict(self.parts.method.student)
        if self.is_main:
            backbone = self.parts.method.backbone()
            state = _backbone_state(state, self.parts.method.student, backbone)
            export_backbone(backbone, self.out / BACKBONE_FILE, state_dict=state)
            if self.parts.method.exports_head:  # the classifier, for a continuation (method.init_head)
                export_head(backbone, self.out / HEAD_FILE, state_dict=state)
        acc.wait_for_everyone()

    def _evaluate(self, tag: str) -> Optional[dict]:
        if self.parts.eval_loader is None:
            return None
        acc = self.parts.accelerator
        result = evaluate_topk(self.parts.method, self.parts.eval_loader, acc.device,
                               acc.num_processes, self.parts.input_dtype)
        if result is None:
            return None
        self.sinks.log(self.step, result, kind="eval")
        log.info("eval %s: top1 %.4f top5 %.4f on %d images", tag, result["top1"], result["top5"],
                 result["num_samples"])
        return result

    def _final_eval(self) -> None:
        result = self._evaluate("final")
        if result is None or not self.is_main:
            return
        atomic_write_json(self.out / EVAL_FILE, {"step": self.step, **result})


def _check_output_dir(out: Path) -> None:
    """output_dir (or a parent of it) that is an existing file: one line instead of a traceback."""
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                what = "is an existing file" if p == out else f"is inside {p}, an existing file"
                raise ConfigError("output_dir", f"{out} {what}, not a directory; choose a directory path")
            return


def _is_deepspeed(acc) -> bool:
    return acc.distributed_type.name == "DEEPSPEED"


def _to_device(batch: dict, device: torch.device, dtype: Optional[torch.dtype], loader) -> dict:
    """The batch on the device with normalised float views (decoded there for data.decode=gpu):
    the loader's uint8 views are normalised on the device (dist_ssl.data.device_views)."""
    return loader.to_device(batch, device, dtype)
