"""`accelerate launch` for one node of a SLURM job: what each srun task of a dist_ssl batch
script runs (see sbatch.py).

    python -m dist_ssl.slurm.node_launch [--status-dir DIR] -- ACCELERATE_LAUNCH_OPTIONS...
        [-m] SCRIPT_OR_MODULE [SCRIPT_ARGS...]

Differences from plain `accelerate launch`:
- ``--machine_rank`` is this task's ``$SLURM_NODEID`` (one srun task per node), so one command
  line serves every node; ``--num_machines`` must equal ``$SLURM_NNODES``.
- Preemption: srun hands the batch script's USR1 to EVERY process of the step (this launcher,
  the trainers, their DataLoader workers and forkserver). USR1 is blocked here before anything
  starts, so every process started from here inherits the block and never sees it; a watcher
  thread takes it (sigwait) and sends SIGTERM to the trainer processes only (our direct
  children), which finish the step, checkpoint and exit 75. DataLoader workers are never
  signalled, so the last step and the checkpoint cannot lose a worker.
- Exit code: torchrun turns a failed worker into exit 1; this exits with the first failed
  worker's own code (75 = checkpointed, requeue me; killed by signal N: 128 + N) and writes it
  to ``DIR/node<k>`` for the batch script (srun --kill-on-bad-exit reports another task's
  code when it kills the slower nodes). A trainer killed by our forwarded SIGTERM before it
  could install its handler (still starting) also counts as 75: requeue, resume from the last
  checkpoint.
"""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

REQUEUE_EXIT_CODE = 75  # dist_ssl.engine.preemption.REQUEUE_EXIT_CODE
log = logging.getLogger("node_launch")


def direct_children() -> list[int]:
    """PIDs whose parent is this process (the trainers torchrun / accelerate started)."""
    me, kids = os.getpid(), []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="utf-8", errors="replace") as f:
                stat = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == me:  # ppid follows the ")" of the name
            kids.append(int(entry.name))
    return kids


class PreemptionForwarder:
    """Blocks USR1 in this process (and, inherited, in all it starts); turns each USR1 into a
    SIGTERM to our direct children. Must be created before any other thread starts."""

    def __init__(self) -> None:
        self.forwarded = False
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        threading.Thread(target=self._watch, name="preemption", daemon=True).start()

    def _watch(self) -> None:
        while True:
            signal.sigwait({signal.SIGUSR1})
            kids = direct_children()
            while not kids:  # signalled before the trainers exist: deliver once they do
                time.sleep(0.2)
                kids = direct_children()
            log.warning("USR1 (preemption): SIGTERM to trainer pid(s) %s", kids)
            self.forwarded = True
            for pid in kids:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass


def run_accelerate(argv: list[str]) -> int:
    """accelerate launch in this process; the first failed worker's exit code (or 0)."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    nnodes = int(os.environ["SLURM_NNODES"])
    if args.num_machines is not None and args.num_machines != nnodes:
        log.error("--num_machines %s but the allocation has %d nodes", args.num_machines, nnodes)
        return 2
    if args.num_processes == 1 and nnodes == 1:
        # one process in all: the trainer runs without a process group (as `python train.py`);
        # a launcher would build a 1-process DDP group, which the engine rejects as a fallback
        log.info("1 process: running %s directly", args.training_script)
        script = ["-m", args.training_script] if args.module else [args.training_script]
        return subprocess.run([sys.executable, *script, *args.training_script_args], check=False).returncode
    try:
        launch_command(args)
        return 0
    except ChildFailedError as exc:
        return exc.get_first_failure()[1].exitcode
    except subprocess.CalledProcessError as exc:  # single-process launch (simple_launcher)
        return exc.returncode


def write_status(status_dir: str | None, node: str, code: int) -> None:
    if not status_dir:
        return
    path = Path(status_dir) / f"node{node}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(f"{code}\n", encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    forwarder = PreemptionForwarder()  # first: before any thread or child exists
    argv = sys.argv[1:] if argv is None else argv
    own, sep, rest = argv, [], []
    if "--" in argv:
        i = argv.index("--")
        own, sep, rest = argv[:i], ["--"], argv[i + 1:]
    parser = argparse.ArgumentParser(prog="python -m dist_ssl.slurm.node_launch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--status-dir", help="write this node's exit code to DIR/node<SLURM_NODEID>")
    opts = parser.parse_args(own)
    if not sep or not rest:
        parser.error("expected `-- ACCELERATE_LAUNCH_OPTIONS... [-m] SCRIPT [ARGS...]`")
    node = os.environ.get("SLURM_NODEID")
    if node is None or "SLURM_NNODES" not in os.environ:
        parser.error("not inside a SLURM step (SLURM_NODEID / SLURM_NNODES unset); use accelerate launch")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s [node{node}] %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    launch = ["--machine_rank", node, *rest]
    log.info("accelerate launch %s", shlex.join(launch))
    code = run_accelerate(launch)
    if code < 0:  # killed by a signal
        code = REQUEUE_EXIT_CODE if forwarder.forwarded and -code == signal.SIGTERM else 128 - code
    log.info("exit code %d", code)
    write_status(opts.status_dir, node, code)
    return code


if __name__ == "__main__":
    sys.exit(main())
